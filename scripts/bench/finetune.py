"""Body of scripts/bench/finetune (see there).

Each side runs in its own process (qcoder first; then this script with
--peft-worker), and each peak RSS is that process's own (wait4). Tokens/s is
the median over the optimizer steps after the first (which pays one-time
allocations). With --rounds N the two sides alternate N times and the
medians of the rounds are printed too: the host's speed drifts over minutes,
so one round's ratio depends on what each half saw.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QCODER = ROOT / "target" / "release" / "qcoder"
CACHE = Path(os.environ.get("QCODER_CACHE", Path.home() / ".cache" / "qcoder"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_measured(cmd):
    """Runs `cmd`; returns its stdout, stderr and its own peak RSS in MB."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        out, err = out.read(), err.read()
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{err}")
    return out, err, usage.ru_maxrss / 1024


def qcoder_side(args, model):
    work = Path(tempfile.mkdtemp(prefix="qcoder-bench-ft-"))
    data = Path(sysconfig.get_paths()["stdlib"]) / "email"
    recipe = f"""
[model]
path = "{model}"
dtype = "{args.dtype}"
device = "cpu"
int8_base = {"true" if args.int8_base else "false"}
[data]
train = ["{data}"]
seq_len = {args.seq}
eval_fraction = 0.01
[lora]
r = 16
alpha = 32
target_modules = "all-linear"
[train]
lr = 2e-4
schedule = "constant"
max_steps = {args.steps}
micro_batch = 1
grad_accum = 1
gradient_checkpointing = {"true" if args.grad_ckpt else "false"}
[eval]
max_batches = 1
[output]
dir = "{work / 'out'}"
"""
    (work / "recipe.toml").write_text(recipe)
    _, _, peak_mb = run_measured([str(QCODER), "--threads", str(args.threads), "finetune",
                                  str(work / "recipe.toml")])
    rows = [json.loads(l) for l in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print(f"qcoder step {r['step']}: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:])
    return tps, peak_mb, rows[0]["loss"], rows[-1]["loss"]


def peft_worker(args):
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    if dtype != torch.float32:
        # PEFT's best CPU setting: bf16 base, f32 LoRA weights (as qcoder).
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if args.grad_ckpt:
        # transformers' own checkpointing (non-reentrant, as it recommends);
        # PEFT needs the embedding output to require grad for it.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    vocab = model.config.vocab_size
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (1, args.seq))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        print(f"PEFT step {len(times)}: {args.seq / times[-1]:.1f} tokens/s", file=sys.stderr)
    tps = statistics.median(args.seq / t for t in times[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": tps, "peak_mb": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(CACHE / "models" / "qwen2.5-coder-0.5b-instruct"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--peft-worker", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate qcoder and PEFT this many times (the host's speed drifts)")
    ap.add_argument("--int8-base", action="store_true",
                    help="qcoder's base products in int8 ([model] int8_base); PEFT as it is")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="gradient checkpointing on both sides")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.peft_worker:
        return peft_worker(args)
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"{args.model}: no model (see recipes/demo.toml for the import command)")
    rounds = []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        q_tps, q_mb, first, last = qcoder_side(args, args.model)
        out, err, _ = run_measured([sys.executable, __file__, "--peft-worker", "--model", args.model,
                                    "--steps", str(args.steps), "--threads", str(args.threads),
                                    "--dtype", args.dtype, "--seq", str(args.seq)]
                                   + (["--grad-ckpt"] if args.grad_ckpt else []))
        p = json.loads(out.strip().splitlines()[-1])
        sys.stderr.write("".join(l + "\n" for l in err.splitlines() if l.startswith("PEFT step")))
        rounds.append((q_tps, q_mb, p["tokens_per_s"], p["peak_mb"]))
    ckpt = ", gradient checkpointing" if args.grad_ckpt else ""
    ckpt += ", qcoder with int8_base" if args.int8_base else ""
    print(f"model {args.model}, {args.dtype}, seq {args.seq}{ckpt}, r 16 all-linear, micro batch 1, "
          f"{args.threads} threads, {args.steps} steps (median of steps 2..)")
    print(f"{'':10} {'qcoder tokens/s':>16} {'PEFT tokens/s':>14} {'speed':>6} "
          f"{'qcoder peak MB':>15} {'PEFT peak MB':>13} {'memory':>7}")
    for i, (qt, qm, pt, pm) in enumerate(rounds):
        print(f"{f'round {i + 1}':10} {qt:16.1f} {pt:14.1f} {qt / pt:5.2f}x {qm:15.0f} {pm:13.0f} "
              f"{qm / pm:6.2f}x")
    if len(rounds) > 1:
        med = [statistics.median(col) for col in zip(*rounds)]
        ratios = [qt / pt for qt, _, pt, _ in rounds]
        print(f"{'median':10} {med[0]:16.1f} {med[2]:14.1f} {med[0] / med[2]:5.2f}x {med[1]:15.0f} "
              f"{med[3]:13.0f} {med[1] / med[3]:6.2f}x")
        print(f"speed ratio by round: {min(ratios):.2f}x-{max(ratios):.2f}x")
    print(f"(qcoder loss {first:.3f} -> {last:.3f})")

if __name__ == "__main__":
    main()

"""Does `[model] int8_base = true` train as well as an f32 base?

Runs `qcoder finetune` twice on the same corpus, recipe and seed, once with an
f32 base and once with int8 base products, then scores each adapter the
reference way: transformers + PEFT load it onto the f32 base and compute the
next-token loss on held-out blocks (the corpus's eval split, packed
`--seq`-token blocks with <|endoftext|> between documents). Prints the loss of
the base model and of each adapter, and each run's training speed.

    .venv/bin/python scripts/bench/int8_quality.py --corpus INGEST_DIR \
        [--model DIR] [--steps 40] [--seq 512] [--threads 2] [--blocks 24]
        [--int8-dtype f32|bf16]

INGEST_DIR is a `qcoder ingest` output (train-*.parquet, eval-*.parquet).
With --adapters NAME=DIR ... it only scores existing adapters.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QCODER = ROOT / "target" / "release" / "qcoder"
CACHE = Path(os.environ.get("QCODER_CACHE", Path.home() / ".cache" / "qcoder"))


def recipe(args, out, int8):
    return f"""
[model]
path = "{args.model}"
dtype = "{args.int8_dtype if int8 else 'f32'}"
device = "cpu"
int8_base = {"true" if int8 else "false"}
[data]
train = ["{args.corpus}"]
seq_len = {args.seq}
fim_rate = 0.5
fim_spm_rate = 0.5
[lora]
r = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"
[train]
lr = 2e-4
schedule = "cosine"
warmup_steps = 4
max_steps = {args.steps}
micro_batch = 1
grad_accum = 2
max_grad_norm = 1.0
seed = 42
[eval]
every = {args.steps}
max_batches = 4
[output]
dir = "{out}"
"""


def train(args, work, name, int8):
    out = work / name
    path = work / f"{name}.toml"
    path.write_text(recipe(args, out, int8))
    print(f"training {name} ...", file=sys.stderr, flush=True)
    subprocess.run([str(QCODER), "--threads", str(args.threads), "finetune", str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tps = statistics.median(r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
    return out / "adapter", tps


def eval_blocks(args, tok):
    import pyarrow.parquet as pq
    import torch

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for f in sorted(glob.glob(str(Path(args.corpus) / "eval-*.parquet"))):
        for text in pq.read_table(f).column("content").to_pylist():
            ids += tok(text).input_ids + [eos]
    n = min(args.blocks, len(ids) // args.seq)
    if n == 0:
        sys.exit(f"{args.corpus}: the eval split has fewer than {args.seq} tokens")
    return torch.tensor(ids[: n * args.seq]).view(n, args.seq)


def mean_loss(model, blocks):
    import torch

    total = 0.0
    with torch.no_grad():
        for b in blocks:
            total += model(input_ids=b[None], labels=b[None]).loss.item()
    return total / len(blocks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="a qcoder ingest output directory")
    ap.add_argument("--model", default=str(CACHE / "models" / "qwen2.5-coder-0.5b-instruct"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--blocks", type=int, default=24, help="held-out blocks to score")
    ap.add_argument("--int8-dtype", default="f32", choices=["f32", "bf16"],
                    help="[model] dtype of the int8 run (its activations)")
    ap.add_argument("--adapters", nargs="*", default=None, metavar="NAME=DIR")
    args = ap.parse_args()
    if args.steps < 1 or args.blocks < 1:
        ap.error("--steps and --blocks must be at least 1")
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"{args.model}: no model (see recipes/demo.toml for the import command)")

    speeds = {}
    if args.adapters is None:
        work = Path(tempfile.mkdtemp(prefix="qcoder-int8-quality-"))
        adapters = {}
        for name, int8 in [("f32 base", False), ("int8 base", True)]:
            adapters[name], speeds[name] = train(args, work, name.replace(" ", "-"), int8)
    else:
        adapters = dict(a.split("=", 1) for a in args.adapters)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    blocks = eval_blocks(args, tok)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    print(f"model {args.model}, {args.steps} steps of 2 x {args.seq} tokens, scored by PEFT "
          f"(f32 base) on {len(blocks)} held-out blocks of {args.seq} tokens")
    print(f"{'':12} {'held-out loss':>14} {'train tokens/s':>15}")
    print(f"{'base model':12} {mean_loss(base, blocks):14.4f}")
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(base, str(path))
        speed = f"{speeds[name]:15.1f}" if name in speeds else ""
        print(f"{name:12} {mean_loss(model, blocks):14.4f} {speed}")
        base = model.unload()


if __name__ == "__main__":
    main()

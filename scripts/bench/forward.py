"""Body of scripts/bench/forward (see there)."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QCODER = ROOT / "target" / "release" / "qcoder"
CACHE = Path(os.environ.get("QCODER_CACHE", Path.home() / ".cache" / "qcoder"))

# Qwen2.5-Coder-0.5B(-Instruct) config.json, as published.
QWEN25_CODER_05B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151643, hidden_act="silu",
)


def random_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = CACHE / "bench" / "qwen2.5-coder-0.5b-shape-random"
    if (out / "config.json").exists():
        return out
    tok_dir = subprocess.run([str(ROOT / "scripts" / "fetch-assets"), "qwen3-tokenizer"], check=True,
                             capture_output=True, text=True).stdout.split()[1]
    cfg = dict(QWEN25_CODER_05B)
    model_type = cfg.pop("model_type")
    theta = cfg.pop("rope_theta")
    config = AutoConfig.for_model(model_type, rope_parameters={"rope_type": "default", "rope_theta": theta}, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        (tmp / f).write_bytes((Path(tok_dir) / f).read_bytes())
    tmp.rename(out)
    return out


def prompt_text(model_dir, n_tokens):
    """Standard-library code cut to exactly n_tokens tokens."""
    import sysconfig
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tok.encode(text).ids
    while len(ids) < n_tokens:
        ids = ids + ids
    for cut in range(n_tokens, n_tokens + 64):
        candidate = tok.decode(ids[:cut])
        if len(tok.encode(candidate).ids) == n_tokens:
            return candidate
    raise SystemExit("could not build a prompt of the requested length")


def run_qcoder(model_dir, prompt, new_tokens, dtype, threads):
    out = subprocess.run(
        [str(QCODER), "generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens",
         str(new_tokens), "--dtype", dtype, "--device", "cpu", "--threads", str(threads), "--json"],
        check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return r["prompt_tokens"], r["prefill_tokens_per_s"], r["decode_tokens_per_s"], len(r["token_ids"])


def run_transformers(model, tok, prompt, new_tokens):
    import torch

    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        nxt = out.logits[0, -1].argmax()
        t1 = time.perf_counter()
        past = out.past_key_values
        steps = 0
        for _ in range(new_tokens - 1):
            out = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[0, -1].argmax()
            steps += 1
        t2 = time.perf_counter()
    return ids.shape[1], ids.shape[1] / (t1 - t0), steps / (t2 - t1), steps + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else random_model()
    prompt = prompt_text(model_dir, args.prompt_tokens)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = []
    for dtype in args.dtypes.split(","):
        torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa").eval()
        q_runs, t_runs = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            q_runs.append(run_qcoder(model_dir, prompt, args.new_tokens, dtype, args.threads))
            t_runs.append(run_transformers(hf, tok, prompt, args.new_tokens))
        del hf
        med = lambda runs, i: statistics.median(r[i] for r in runs)
        rows.append((dtype, med(q_runs, 1), med(t_runs, 1), med(q_runs, 2), med(t_runs, 2)))
        print(f"# {dtype}: qcoder runs {q_runs}\n# {dtype}: transformers runs {t_runs}", file=sys.stderr)

    print(f"model: {model_dir.name}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, CPU, median of {args.repeats}")
    print("| dtype | prefill tok/s qcoder | prefill tok/s transformers | ratio | "
          "decode tok/s qcoder | decode tok/s transformers | ratio |")
    print("|---|---|---|---|---|---|---|")
    for dtype, qp, tp, qd, td in rows:
        print(f"| {dtype} | {qp:.1f} | {tp:.1f} | {qp / tp:.2f}x | {qd:.2f} | {td:.2f} | {qd / td:.2f}x |")


if __name__ == "__main__":
    main()

"""Decode tokens/s at batch 1: qcoder's int4 path vs llama.cpp, one run.

The same weights on both sides: the real Qwen2.5-Coder-0.5B (imported from
its GGUF) quantized by qcoder to 4 bits in symmetric groups of 32 (RTN: how the
integers were chosen does not change the speed), run by qcoder's int4 path
(its own AVX2 kernels on CPU), and exported with `qcoder export --type q4_0`, which repacks the
same integers into llama.cpp's Q4_0 blocks. llama.cpp also runs a Q4_K_M export
of the base model, its most used type. The bound: bytes of weights read per
generated token divided by the machine's measured copy bandwidth.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def prepare(args, cache: Path):
    qcoder = args.qcoder
    base = cache / "qwen2.5-coder-0.5b-f32"
    if not base.exists():
        run([qcoder, "import", args.gguf, "-o", base, "--dtype", "f32"])
    q4 = cache / "qwen2.5-coder-0.5b-rtn4-g32"
    if not q4.exists():
        run([qcoder, "quantize", "-m", base, "--method", "rtn", "--bits", "4",
             "--group-size", "32", "-o", q4])
    q4_0 = cache / "qwen2.5-coder-0.5b-rtn4-g32.q4_0.gguf"
    if not q4_0.exists():
        out = run([qcoder, "export", "-m", q4, "--format", "gguf", "--type", "q4_0", "-o", q4_0])
        print(out.stderr.strip().splitlines()[-2], file=sys.stderr)
    q4_k_m = cache / "qwen2.5-coder-0.5b.q4_k_m.gguf"
    if not q4_k_m.exists():
        run([qcoder, "export", "-m", base, "--format", "gguf", "--type", "q4_k_m", "-o", q4_k_m])
    return q4, q4_0, q4_k_m


PROMPT = "def quicksort(xs):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


def qcoder_decode(args, model: Path, head: str):
    best = 0.0
    for _ in range(args.runs):
        out = run([args.qcoder, "--threads", str(args.threads), "generate", "-m", model,
                   "--prompt", PROMPT, "--max-new-tokens", str(args.new_tokens),
                   "--head", head, "--json", "--ignore-eos"])
        best = max(best, json.loads(out.stdout)["decode_tokens_per_s"])
    return best


def llama_decode(args, gguf: Path):
    out = run([Path(args.llama_bin) / "llama-bench", "-m", gguf, "-t", str(args.threads),
               "-p", "0", "-n", str(args.new_tokens), "-r", str(args.runs), "-o", "json"])
    rows = json.loads(out.stdout)
    return max(r["avg_ts"] for r in rows)


def copy_bandwidth():
    """Bytes per second of a large memcpy (read + write counted once each as read)."""
    a = np.ones(1 << 28, dtype=np.uint8)  # 256 MiB, far beyond the caches
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    # A copy reads and writes every byte; a decode step mostly reads.
    return 2 * a.nbytes / best


def bytes_per_token_qcoder(q4: Path):
    """Packed int4 weights + f16 scales of every linear, plus the int8 head."""
    from safetensors import safe_open
    total = 0
    for f in sorted(q4.glob("*.safetensors")):
        with safe_open(f, "np") as st:
            for k in st.keys():
                if k.endswith((".qweight", ".scales", ".qzeros", ".bias")) or "norm" in k:
                    t = st.get_slice(k)
                    n = int(np.prod(t.get_shape()))
                    total += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[t.get_dtype()]
    cfg = json.loads((q4 / "config.json").read_text())
    total += cfg["vocab_size"] * cfg["hidden_size"]  # int8 head
    return total


def bytes_per_token_gguf(gguf: Path):
    sys.path.insert(0, str(Path(args_global.llama_bin).parent.parent / "src"))
    from gguf import GGUFReader
    r = GGUFReader(str(gguf))
    # token_embd: one row per token; everything else is read whole.
    return sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")


def main():
    global args_global
    p = argparse.ArgumentParser()
    p.add_argument("--qcoder", required=True)
    p.add_argument("--llama-bin", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/qcoder/bench-decode"))
    args = p.parse_args()
    args_global = args
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    q4, q4_0, q4_k_m = prepare(args, cache)

    bw = copy_bandwidth()
    rows = []
    b = bytes_per_token_qcoder(q4)
    rows.append(("qcoder int4 g32 + int8 head", qcoder_decode(args, q4, "int8"), b))
    rows.append(("llama.cpp Q4_0 (same integers)", llama_decode(args, q4_0), bytes_per_token_gguf(q4_0)))
    rows.append(("llama.cpp Q4_K_M", llama_decode(args, q4_k_m), bytes_per_token_gguf(q4_k_m)))
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s; threads {args.threads}; "
          f"{args.new_tokens} new tokens; best of {args.runs}")
    print("| engine | decode tok/s | MB read / token | bandwidth bound tok/s | share of bound |")
    print("|---|---|---|---|---|")
    for name, tps, nbytes in rows:
        bound = bw / nbytes
        print(f"| {name} | {tps:.1f} | {nbytes / 1e6:.0f} | {bound:.0f} | {tps / bound:.0%} |")
    q = rows[0][1]
    print(f"ratio qcoder / llama.cpp Q4_0: {q / rows[1][1]:.2f}x; "
          f"qcoder / llama.cpp Q4_K_M: {q / rows[2][1]:.2f}x")


if __name__ == "__main__":
    main()

"""Speed of torch's matrix products at the shapes of one LoRA training step
of Qwen2.5-Coder-0.5B (seq 512) on this CPU, per dtype, and of the
152k-vocabulary output layer per chunk height: the measurements behind the
dtype advice and `train::loss::chunk_tokens` (see BENCHMARKS.md, issue 5).

    .venv/bin/python scripts/bench/matmul_shapes.py [--threads 2]

Each product is timed for about a second after warm-up; prints GFLOP/s.
"""

import argparse
import time

import torch


def seconds_per_call(f, budget=1.0):
    for _ in range(3):
        f()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        f()
        n += 1
    return (time.perf_counter() - start) / n


def layer_shapes(threads):
    print(f"decoder products, {threads} threads: GFLOP/s (int8: GOP/s, torch._int_mm, what")
    print("[model] int8_base uses where it is fast) of (m x k) @ (k x n)")
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "int8": torch.int8}
    print(f"{'m x k x n':>22} " + " ".join(f"{d:>6}" for d in dtypes))
    for m, k, n in [(512, 896, 4864), (512, 4864, 896), (512, 896, 896), (512, 896, 128)]:
        row = []
        for dt in dtypes.values():
            if dt == torch.int8:
                a = torch.randint(-127, 128, (m, k), dtype=dt)
                b = torch.randint(-127, 128, (k, n), dtype=dt)
                f = lambda: torch._int_mm(a, b)  # noqa: E731
            else:
                a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
                f = lambda: a @ b  # noqa: E731
            row.append(2 * m * k * n / seconds_per_call(f) / 1e9)
        print(f"{f'{m} x {k} x {n}':>22} " + " ".join(f"{g:6.0f}" for g in row))


def head_chunks(vocab=151936, hidden=896, tokens=511):
    print(f"output layer (vocab {vocab}) in f32 by chunk height: logits x·Wᵀ and input gradient g·W,")
    print("into preallocated outputs (as qcoder's loss does)")
    w = torch.randn(vocab, hidden)
    for rows in [32, 48, 51, 64, 96, 128, 256, 512]:
        x, g = torch.randn(rows, hidden), torch.randn(rows, vocab)
        logits, grad = torch.empty(rows, vocab), torch.empty(rows, hidden)
        t = seconds_per_call(lambda: torch.mm(x, w.t(), out=logits))
        t += seconds_per_call(lambda: torch.mm(g, w, out=grad))
        print(f"  {rows:4} rows: {2 * 2 * rows * hidden * vocab / t / 1e9:5.0f} GFLOP/s, "
              f"{t * tokens / rows * 1e3:6.0f} ms per {tokens} tokens")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer_shapes(args.threads)
    head_chunks()


if __name__ == "__main__":
    main()

"""Python MinHash LSH baseline for scripts/bench/ingest (datasketch).

Same work as qcoder's near-dedup, nothing more: tokens are runs of
[A-Za-z0-9_], shingles are 5 consecutive tokens, 256 permutations,
MinHashLSH at the same Jaccard threshold (datasketch picks bands/rows with
the same optimal-parameter search qcoder mirrors), files in sorted order,
query-then-insert keeping the first of each group. No filtering, redaction
or output writing: the baseline does strictly less than qcoder.

Walks the directory like qcoder's --languages Python: *.py files, skipping
hidden directories, __pycache__ and site-packages. Prints one JSON object.
"""

import json
import os
import re
import sys
import time

from datasketch import MinHash, MinHashLSH

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "node_modules"}
NON_TOKEN = re.compile(rb"[^A-Za-z0-9_]+")


def files(root):
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in SKIP_DIRS]
        out.extend(os.path.join(d, n) for n in names if n.endswith(".py") and not n.startswith("."))
    return sorted(out)


def main():
    root = sys.argv[1]
    threshold = float(sys.argv[2]) if len(sys.argv) > 2 else 0.85
    num_perm, k = 256, 5
    started = time.perf_counter()
    cpu_started = time.process_time()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    n_files = n_bytes = near = 0
    for i, path in enumerate(files(root)):
        with open(path, "rb") as f:
            data = f.read()
        n_files += 1
        n_bytes += len(data)
        tokens = [t for t in NON_TOKEN.split(data) if t]
        if not tokens:
            continue
        shingles = {b" ".join(tokens[j : j + k]) for j in range(max(1, len(tokens) - k + 1))}
        m = MinHash(num_perm=num_perm)
        m.update_batch(list(shingles))
        if lsh.query(m):
            near += 1
            continue
        lsh.insert(str(i), m)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    print(json.dumps({
        "files": n_files,
        "bytes": n_bytes,
        "near_duplicates": near,
        "bands": lsh.b,
        "rows": lsh.r,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "mb_per_s": n_bytes / 1e6 / seconds,
    }))


if __name__ == "__main__":
    main()

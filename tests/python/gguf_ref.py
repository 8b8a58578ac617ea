#!/usr/bin/env python3
"""Reference side of qcoder's GGUF tests, using llama.cpp's own `gguf` package.

  gguf_ref.py hashes FILE            sha256 of every tensor dequantized by
                                     gguf.quants.dequantize (f32, C order)
  gguf_ref.py read FILE              metadata (arrays: length, first items and
                                     a few picked items) and the tensor table
  gguf_ref.py quantize TYPE IN OUT   quantize the raw f32 rows in IN (shape
                                     given by IN.json) with gguf.quants.quantize
                                     and write the bytes to OUT

Output is one JSON document on stdout.
"""
import hashlib
import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize, quantize


def hashes(path):
    reader = GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype="<f4")
        out[t.name] = {
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],
            "n": int(values.size),
            "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
        }
    return out


def plain(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def read(path):
    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        types = [t.name for t in field.types]
        if isinstance(value, list):
            entry = {"types": types, "len": len(value), "head": [plain(x) for x in value[:16]]}
            if key == "tokenizer.ggml.tokens":
                entry["index"] = {tok: i for i, tok in enumerate(value) if tok.startswith("<")}
            if key == "tokenizer.ggml.token_type":
                entry["all"] = [int(x) for x in value]
            meta[key] = entry
        else:
            meta[key] = {"types": types, "value": plain(value)}
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape], "offset": int(t.data_offset)}
        for t in reader.tensors
    ]
    return {"metadata": meta, "tensors": tensors, "alignment": int(reader.alignment)}


def quantize_cmd(type_name, src, dst):
    with open(src + ".json") as f:
        shape = json.load(f)["shape"]
    x = np.fromfile(src, dtype="<f4").reshape(shape)
    q = quantize(x, GGMLQuantizationType[type_name])
    q.tofile(dst)
    return {"bytes": int(q.nbytes)}


def main():
    cmd = sys.argv[1]
    if cmd == "hashes":
        result = hashes(sys.argv[2])
    elif cmd == "read":
        result = read(sys.argv[2])
    elif cmd == "quantize":
        result = quantize_cmd(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown command {cmd}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()

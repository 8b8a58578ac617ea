#!/usr/bin/env python3
"""Loads a model directory with transformers (as a user would) and writes the
f32 logits of one prompt.

  hf_logits.py MODEL_DIR OUT IDS_JSON     OUT: raw little-endian f32 logits
Prints {"shape": [...], "dtype": <dtype transformers loaded>, "n_shards": ...}.
"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, out, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # Load in the checkpoint's own dtype first: this is what users get.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    loaded = str(next(model.parameters()).dtype)
    model = model.float().eval()
    AutoTokenizer.from_pretrained(model_dir)  # the tokenizer files load too
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    np.ascontiguousarray(logits.numpy(), dtype="<f4").tofile(out)
    json.dump({"shape": list(logits.shape), "dtype": loaded}, sys.stdout)


if __name__ == "__main__":
    main()

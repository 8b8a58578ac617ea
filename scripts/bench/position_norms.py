"""How much larger position 0's input to each linear group is than the other
positions' (squared norm over the mean of positions 1..), per layer, on the
first window of a `qcoder quantize --save-calibration` file. Run with the
project venv (transformers, test tool only):

  .venv/bin/python scripts/bench/position_norms.py MODEL_DIR CALIB.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
model_dir, calib = sys.argv[1], sys.argv[2]
ids = torch.tensor(json.load(open(calib))[0]).view(1, -1)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ratios = {}


def hook(name):
    def record(_module, inputs):
        sq = inputs[0][0].pow(2).sum(-1)
        ratios[name] = sq[0].item() / sq[1:].mean().item()

    return record


groups = {"gate": "mlp.gate_proj", "o": "self_attn.o_proj", "down": "mlp.down_proj"}
for i, layer in enumerate(model.model.layers):
    for short, path in groups.items():
        layer.get_submodule(path).register_forward_pre_hook(hook(f"{i}.{short}"))
with torch.no_grad():
    model(ids)
for i in range(len(model.model.layers)):
    print(i, " ".join(f"{s}={ratios[f'{i}.{s}']:.1f}" for s in groups))

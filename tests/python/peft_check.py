#!/usr/bin/env python3
"""PEFT's view of a qcoder adapter, for tests/finetune.rs.

    peft_check.py BASE ADAPTER MERGED QCODER_LOGITS

Loads ADAPTER (qcoder's output) onto BASE with PEFT, computes logits for the
`input_ids` stored in QCODER_LOGITS and compares them with qcoder's `logits`
there, and PEFT's gradients of the mean next-token loss on them with qcoder's
`grad.{adapter key}` tensors (every trainable adapter tensor: A, B and, for
DoRA, the magnitude); then compares PEFT's `merge_and_unload()` weights with
qcoder's merged model directory MERGED. Prints the largest differences as JSON.
"""

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    base_dir, adapter_dir, merged_dir, logits_path = sys.argv[1:5]
    ref = load_file(logits_path)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    logits_diff = (logits - ref["logits"]).abs().max().item()

    # Gradients, from a trainable copy (eval mode: no dropout).
    trainable = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir,
        is_trainable=True)
    trainable.eval()
    ids = ref["input_ids"]
    trainable(input_ids=ids, labels=ids).loss.backward()
    grad_rel, compared, missing_grads = 0.0, 0, []
    for name, p in trainable.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
        key = key.replace(".default.weight", ".weight")
        if f"grad.{key}" not in ref:
            missing_grads.append(key)
            continue
        ours = ref[f"grad.{key}"]
        scale = p.grad.abs().max().item()
        grad_rel = max(grad_rel, (p.grad - ours).abs().max().item() / max(scale, 1e-12))
        compared += 1
    merged = model.merge_and_unload().state_dict()
    ours = load_file(f"{merged_dir}/model.safetensors")
    tied = base.config.tie_word_embeddings
    missing = sorted(k for k in merged if k not in ours and not (tied and k == "lm_head.weight"))
    merge_diff = max((merged[k].float() - ours[k].float()).abs().max().item() for k in ours)
    print(json.dumps({
        "logits_max_diff": logits_diff,
        "logits_max_abs": logits.abs().max().item(),
        "merge_max_diff": merge_diff,
        "grad_max_rel_diff": grad_rel,
        "grads_compared": compared,
        "grads_missing": missing_grads,
        "missing_in_merged": missing,
        "n_tensors": len(ours),
    }))


if __name__ == "__main__":
    main()

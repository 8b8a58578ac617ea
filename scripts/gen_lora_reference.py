#!/usr/bin/env python3
"""Writes tests/fixtures/lora/: a LoRA training reference computed by PEFT.

Run with the project venv (peft and accelerate from scripts/requirements-test.txt):

    .venv/bin/python scripts/gen_lora_reference.py

On the tiny Qwen2 fixture (tests/fixtures/models/qwen2) it
* writes initial LoRA weights in PEFT's layout to init/ (A Kaiming-uniform as
  PEFT draws it, B random instead of zero so that A gets a gradient at step 1),
* loads them with `PeftModel.from_pretrained(is_trainable=True)`, and takes two
  optimizer steps with `torch.optim.AdamW` after `clip_grad_norm_`, on two
  fixed batches, the loss being transformers' own causal-LM loss;
* stores in reference.safetensors the batches, the step-1 gradients (before
  clipping), the LoRA weights after steps 1 and 2, and in reference.json the
  hyper-parameters, losses and gradient norms.

qcoder's one-step result must match every tensor within 1e-4 relative
(tests/finetune.rs). Seeded: a rerun reproduces the same files.
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "fixtures" / "models" / "qwen2"
OUT = ROOT / "tests" / "fixtures" / "lora"

R, ALPHA = 4, 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.05
SEQ, BATCH = 24, 2


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(OUT / "init")
    # Keep the committed files machine-independent and minimal.
    (OUT / "init" / "README.md").unlink(missing_ok=True)
    cfg_path = OUT / "init" / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = "tests/fixtures/models/qwen2"
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")

    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, OUT / "init", is_trainable=True)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(2)]

    def key(name):
        # PEFT's saved name: drop the adapter name `.default`.
        return name.replace(".default", "")

    tensors = {"batch1": batches[0], "batch2": batches[1]}
    losses, norms, max_norms = [], [], []
    for step, ids in enumerate(batches, start=1):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for _, p in named])
        # Clip to half the norm so clipping is exercised.
        max_norm = float(norm) / 2
        if step == 1:
            for n, p in named:
                tensors[f"grad1.{key(n)}"] = p.grad.detach().clone()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm)
        opt.step()
        for n, p in named:
            tensors[f"step{step}.{key(n)}"] = p.detach().clone()
        losses.append(loss.item())
        norms.append(float(norm))
        max_norms.append(max_norm)

    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "reference.safetensors")
    meta = {
        "r": R, "alpha": ALPHA, "target_modules": TARGETS, "lr": LR, "betas": list(BETAS),
        "eps": EPS, "weight_decay": WD, "losses": losses, "grad_norms": norms,
        "max_grad_norms": max_norms,
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    (OUT / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()

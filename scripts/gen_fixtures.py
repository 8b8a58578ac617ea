#!/usr/bin/env python3
"""Writes the committed test fixtures under tests/fixtures/.

Run with the project venv after `scripts/setup --test`:

    .venv/bin/python scripts/gen_fixtures.py

* tokenizer/: a tiny byte-level BPE tokenizer trained on Python standard-library
  code, with the Qwen special and FIM tokens added at the end of the vocabulary.
* models/<name>/: tiny random Qwen2, Qwen3, Llama and Mistral models (each well
  under 2 MB) covering q/k/v bias, q/k norm, explicit head_dim, GQA, tied and
  untied embeddings, f32/bf16/f16 storage, a sharded checkpoint, both
  config.json generations (top-level rope_theta/rope_scaling vs
  rope_parameters), RoPE scaling none/linear/llama3/yarn and sliding windows.
  Beside each: reference.safetensors (transformers' f32 logits over a 32-token
  prompt) and reference.json (prompt ids, 16 greedy tokens).
* qwen3_tokenizer_ref.json: ids that Python `tokenizers` gives the real Qwen3
  tokenizer (scripts/fetch-assets qwen3-tokenizer) for a code snippet and a FIM
  prompt.

Everything is seeded, so a rerun reproduces the same files.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
VOCAB = 512
PROMPT_LEN = 32
GREEDY_STEPS = 16


def training_text():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py", "keyword.py"]
    return [(stdlib / n).read_text(encoding="utf-8") for n in names if (stdlib / n).exists()]


def make_tokenizer(out_dir: Path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(SPECIALS) - 8,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 256,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


def legacy_merges(tokenizer_json: Path):
    """Rewrites merges as "a b" strings (the form older `tokenizers` wrote)."""
    data = json.loads(tokenizer_json.read_text())
    merges = data["model"]["merges"]
    if merges and isinstance(merges[0], list):
        data["model"]["merges"] = [" ".join(pair) for pair in merges]
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


# name -> (config overrides, storage dtype, shard size, config.json form)
MODELS = {
    # Qwen2: q/k/v bias, untied head, GQA 2:1, rope_parameters (transformers 5 form).
    "qwen2": dict(
        cfg=dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_key_value_heads=2,
                 tie_word_embeddings=False, rope_theta=1e6),
        dtype=torch.float32, shard=None, legacy=False, legacy_merges=True),
    # Qwen2 with its sliding window on layer 1 only (max_window_layers = 1).
    "qwen2-swa": dict(
        cfg=dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_key_value_heads=2,
                 tie_word_embeddings=False, rope_theta=1e6, use_sliding_window=True,
                 sliding_window=8, max_window_layers=1),
        dtype=torch.float32, shard=None, legacy=False, legacy_merges=False),
    # Qwen3: q/k norm, explicit head_dim != hidden/heads, tied, bf16 storage, YaRN in the old form.
    "qwen3": dict(
        cfg=dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_key_value_heads=2,
                 head_dim=32, tie_word_embeddings=True, rope_theta=1e6,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 64}),
        dtype=torch.bfloat16, shard=None, legacy=True, legacy_merges=False),
    # Llama: GQA 4:1, tied, llama3 rope scaling, f16 storage, sharded.
    "llama": dict(
        cfg=dict(model_type="llama", architectures=["LlamaForCausalLM"], num_key_value_heads=1,
                 tie_word_embeddings=True, rope_theta=10000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        dtype=torch.float16, shard="100KB", legacy=False, legacy_merges=False),
    # Mistral: sliding window 8 < prompt, linear rope scaling, untied.
    "mistral": dict(
        cfg=dict(model_type="mistral", architectures=["MistralForCausalLM"], num_key_value_heads=2,
                 tie_word_embeddings=False, rope_theta=10000.0, sliding_window=8,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
        dtype=torch.float32, shard=None, legacy=True, legacy_merges=False),
}

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=0, hidden_act="silu")


def build_config(name, spec):
    from transformers import AutoConfig

    cfg = dict(COMMON)
    cfg.update(spec["cfg"])
    model_type = cfg.pop("model_type")
    rope_scaling = cfg.pop("rope_scaling", None)
    rope_theta = cfg.pop("rope_theta")
    params = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        params.update(rope_scaling)
    config = AutoConfig.for_model(model_type, rope_parameters=params, **cfg)
    config.eos_token_id = cfg["eos_token_id"]
    return config


def to_legacy_config(path: Path):
    """Rewrites config.json the way transformers < 5 wrote it."""
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", "default")
    if rope_type != "default":
        cfg["rope_scaling"] = {"type": rope_type, **params}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def greedy_margin(model, ids):
    """Greedy tokens and the smallest top-1/top-2 logit gap along the way."""
    tokens, margin = [], float("inf")
    seq = ids.clone()
    for _ in range(GREEDY_STEPS):
        logits = model(seq).logits[0, -1]
        top = torch.topk(logits, 2).values
        margin = min(margin, float(top[0] - top[1]))
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return tokens, margin


def make_model(name, spec, tok_dir: Path):
    out = FIX / "models" / name
    if out.exists():
        shutil.rmtree(out)
    config = build_config(name, spec)
    seed = sum(map(ord, name))
    for attempt in range(20):
        torch.manual_seed(seed + attempt)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Larger-than-default init so logits are spread and greedy paths robust.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.08)
        model = model.to(spec["dtype"])
        kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(tok_dir / f, out / f)
        if spec["legacy_merges"]:
            legacy_merges(out / "tokenizer.json")
        if spec["legacy"]:
            to_legacy_config(out / "config.json")
        gen = out / "generation_config.json"
        if gen.exists():
            gen.unlink()

        # References come from what is on disk, loaded the way users load it.
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
        ref.eval()
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(len(SPECIALS), VOCAB - len(SPECIALS) - 8, (1, PROMPT_LEN), generator=g)
        with torch.no_grad():
            logits = ref(prompt).logits[0].float().contiguous()
            tokens, margin = greedy_margin(ref, prompt)
        if margin > 2e-3:
            break
        print(f"{name}: greedy margin {margin:.2e} too small, reseeding")
    save_file({"logits": logits}, out / "reference.safetensors")
    meta = {
        "prompt_ids": prompt[0].tolist(),
        "greedy_tokens": tokens,
        "greedy_min_margin": margin,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 2_000_000, f"{name} fixture is {size} bytes"
    print(f"{name}: {size/1e3:.0f} kB, greedy margin {margin:.3f}")


QWEN3_SNIPPET = (
    "def fibonacci(n: int) -> int:\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a  # 12345 café ñ 日本語 🚀\n"
    "\tif x != 0x1F and y <= 3.14e-2:\n"
    "        print(f\"{x!r:>10}\")   \n\n\n"
)


def qwen3_tokenizer_reference():
    out = subprocess.run([str(ROOT / "scripts" / "fetch-assets"), "qwen3-tokenizer"],
                         check=True, capture_output=True, text=True).stdout.split()
    tok = Tokenizer.from_file(str(Path(out[1]) / "tokenizer.json"))
    fim = "<|fim_prefix|>def fibonacci(n):\n    <|fim_suffix|>\n    return a\n<|fim_middle|>"
    repo = "<|repo_name|>qcoder\n<|file_sep|>src/main.rs\nfn main() {}\n<|endoftext|>"
    ref = {
        "tokenizer_sha256": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
        "cases": [
            {"name": "code", "text": QWEN3_SNIPPET, "ids": tok.encode(QWEN3_SNIPPET).ids},
            {"name": "fim", "text": fim, "ids": tok.encode(fim).ids},
            {"name": "repo", "text": repo, "ids": tok.encode(repo).ids},
        ],
        "fim_parts": {"prefix": "def fibonacci(n):\n    ", "suffix": "\n    return a\n"},
    }
    (FIX / "qwen3_tokenizer_ref.json").write_text(json.dumps(ref, ensure_ascii=False, indent=1) + "\n")
    print("qwen3 tokenizer reference:", [len(c["ids"]) for c in ref["cases"]], "ids")


def main():
    torch.set_num_threads(2)
    tok_dir = FIX / "tokenizer"
    make_tokenizer(tok_dir)
    only = sys.argv[1:]
    for name, spec in MODELS.items():
        if not only or name in only:
            make_model(name, spec, tok_dir)
    qwen3_tokenizer_reference()


if __name__ == "__main__":
    main()

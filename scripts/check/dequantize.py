#!/usr/bin/env python3
"""Dequantizes a GPTQ or AWQ checkpoint the way AutoGPTQ / AutoAWQ do and
compares with weights qcoder dequantized itself, bit for bit.

    .venv/bin/python scripts/check/dequantize.py QUANT_DIR QCODER_DEQUANT.safetensors

GPTQ: the unpacking of AutoGPTQ's `qlinear_cuda_old.QuantLinear.forward`
(torch fallback): shift each int32 by `wf` and mask, with the explicit 3-bit
word split; zeros + 1 (v1 format); W = scales[g_idx] * (q - zeros[g_idx]).
AWQ: AutoAWQ `awq/utils/packing_utils.py`: unpack, undo the [0,2,4,6,1,3,5,7]
order, W = (q - z) * s, transposed to (out, in).
Arithmetic is done in f32 (exact for f16 scales times small integers), the
product AutoGPTQ rounds to f16 afterwards.
Exits 1 on any mismatch, printing the tensor.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_dir(d: Path):
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def unpack_gptq_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows*bits/32, cols] -> ints [rows, cols], packing along dim 0."""
    if bits in (2, 4, 8):
        wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
        w = torch.bitwise_right_shift(packed.unsqueeze(1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1))
        w = torch.bitwise_and(w, (1 << bits) - 1)
        return w.reshape(-1, packed.shape[1])
    assert bits == 3
    wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                       [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                       [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
    w = packed.reshape(packed.shape[0] // 3, 3, 1, packed.shape[1]).expand(-1, -1, 12, -1)
    w = (w >> wf.unsqueeze(-1)) & 0x7
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = w & 0x7
    w = torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1)
    return w.reshape(-1, packed.shape[1])


def gptq_weight(t, prefix, bits, v2):
    qweight, qzeros, scales, g_idx = (t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    q = unpack_gptq_rows(qweight, bits)                       # (in, out)
    zeros = unpack_gptq_rows(qzeros.t().contiguous(), bits).t()  # (groups, out)
    if not v2:
        zeros = zeros + 1
    g = g_idx.long()
    w = scales.float()[g] * (q.float() - zeros.float()[g])    # (in, out)
    return w.t().contiguous()


AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    v = torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]).to(torch.int8)
    v = v.view(packed.shape[0], -1)
    order = torch.arange(v.shape[-1], dtype=torch.int32).view(-1, 8)[:, AWQ_REVERSE].view(-1)
    return torch.bitwise_and(v[:, order], 0xF)


def awq_weight(t, prefix, group_size):
    qweight, qzeros, scales = (t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
    q = unpack_awq(qweight)               # (in, out)
    z = unpack_awq(qzeros)                # (groups, out)
    z = z.repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q.float() - z.float()) * s).t().contiguous()


def main():
    qdir, ours = Path(sys.argv[1]), sys.argv[2]
    cfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    t = load_dir(qdir)
    mine = load_file(ours)
    bad = 0
    for name, w_ours in sorted(mine.items()):
        prefix = name[: -len(".weight")]
        if cfg["quant_method"] == "gptq":
            w = gptq_weight(t, prefix, cfg["bits"], cfg.get("checkpoint_format") == "gptq_v2")
        else:
            in_f = t[f"{prefix}.qweight"].shape[0]
            groups = t[f"{prefix}.scales"].shape[0]
            w = awq_weight(t, prefix, in_f // groups)
        if w.shape != w_ours.shape or not torch.equal(w, w_ours.float()):
            diff = (w - w_ours.float()).abs().max().item() if w.shape == w_ours.shape else "shape"
            print(f"MISMATCH {name}: {diff}")
            bad += 1
    print(f"{len(mine) - bad}/{len(mine)} tensors equal bit for bit ({cfg['quant_method']}, {cfg['bits']} bits)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

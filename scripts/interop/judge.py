#!/usr/bin/env python3
"""The checks of scripts/interop/llama-cpp-judge (run with the llama.cpp build
venv: llama_cpp binding, numpy, llama.cpp's own gguf-py)."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from llama_cpp import Llama

TYPES = ["f16", "q8_0", "q4_0", "q4_k_m"]
EXACT = ["f16", "q8_0"]
PROMPTS = [
    {"prompt": "def quicksort(arr):\n    "},
    {"prompt": 'import numpy as np\n\n\ndef softmax(x):\n    """Compute softmax values for each row of x."""\n'},
    {"fim_prefix": "def fibonacci(n):\n    ", "fim_suffix": "\n    return a\n"},
]
N_NEW = 32
N_TEXT = 1024
THREADS = 2


def run(cmd, **kw):
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(map(str, cmd))}\n{out.stderr[-3000:]}")
    return out.stdout, time.time() - t0


def log(*a, **kw):
    print(*a, flush=True, **kw)


def qcoder_generate(qcoder, model_dir, p):
    args = [qcoder, "generate", "--model", model_dir, "--max-new-tokens", str(N_NEW), "--json"]
    if "prompt" in p:
        args += ["--prompt", p["prompt"]]
    else:
        args += ["--fim-prefix", p["fim_prefix"], "--fim-suffix", p["fim_suffix"]]
    out, _ = run(args)
    r = json.loads(out)
    ids = list(r["token_ids"])
    if r["stop_reason"].startswith("stop token "):
        ids.append(int(r["stop_reason"].split()[-1]))
    return r["prompt_ids"], ids


def llama_greedy(llm, prompt_ids, n):
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


# GGUF tensor names of a decoder layer's linears -> the HF module names.
GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
ST_DTYPES = {"I32": np.int32, "F16": np.float16, "F32": np.float32}


def read_safetensors(d):
    """All tensors of a directory's *.safetensors files (numpy only: the llama.cpp venv has no torch)."""
    out = {}
    for name in sorted(os.listdir(d)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(d, name)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        for k, v in header.items():
            if k == "__metadata__" or v["dtype"] not in ST_DTYPES:
                continue
            b, e = v["data_offsets"]
            out[k] = raw[b:e].view(ST_DTYPES[v["dtype"]]).reshape(v["shape"])
    return out


def gptq4_dequantize(t, prefix):
    """W (out, in) of a 4-bit GPTQ v1 linear, as AutoGPTQ's torch fallback computes it:
    qweight packs 8 input rows per int32 (low nibble first), qzeros 8 output columns
    per int32 with the format's -1 offset, W = scales[g] * (q - (z + 1))."""
    shifts = np.arange(0, 32, 4, dtype=np.int32)
    qw = t[f"{prefix}.qweight"]
    q = ((qw[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qw.shape[1])       # (in, out)
    qz = t[f"{prefix}.qzeros"]
    z = ((qz[:, :, None] >> shifts[None, None, :]) & 15).reshape(qz.shape[0], -1) + 1  # (groups, out)
    g = t[f"{prefix}.g_idx"].astype(np.int64)
    s = t[f"{prefix}.scales"].astype(np.float32)
    return (s[g] * (q.astype(np.float32) - z[g].astype(np.float32))).T


def gptq_repack(a, hf, report, failures):
    """A GPTQ 4-bit group-32 checkpoint exported as Q4_0: the GGUF blocks hold GPTQ's own
    integers and scales (dequantized equal bit for bit), and llama.cpp runs the file."""
    w = a.work
    gptq = a.gptq or os.path.join(w, "gptq-g32")
    if not a.gptq and not os.path.isfile(os.path.join(gptq, "config.json")):
        calib = os.path.join(sysconfig.get_paths()["stdlib"], "json")
        _, t = run([a.qcoder, "quantize", "--model", hf, "--method", "gptq", "--bits", "4", "--group-size", "32",
                    "--calib", calib, "--samples", "16", "--seq-len", "256", "-o", gptq])
        report["times_s"]["gptq_quantize"] = t
        log(f"GPTQ 4-bit g32 of the imported model in {t:.0f} s")
    path = os.path.join(w, "gptq-g32.q4_0.gguf")
    t0 = time.time()
    exp = subprocess.run([a.qcoder, "export", "--model", gptq, "--format", "gguf", "--type", "q4_0", "-o", path],
                         capture_output=True, text=True)
    if exp.returncode != 0:
        sys.exit(f"qcoder export of {gptq} failed:\n{exp.stderr[-3000:]}")
    report["times_s"]["export_gptq_q4_0"] = time.time() - t0
    log(f"exported the GPTQ checkpoint as q4_0: {(exp.stdout + exp.stderr).strip()[-400:]}")

    st = read_safetensors(gptq)
    res = {"tensors": 0, "bit_identical": 0, "mismatches": []}
    for tensor in GGUFReader(path).tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in GGUF_TO_HF or parts[3] != "weight":
            continue
        prefix = f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}"
        res["tensors"] += 1
        if tensor.tensor_type.name != "Q4_0":
            res["mismatches"].append(f"{tensor.name}: {tensor.tensor_type.name}, not Q4_0")
            continue
        ours = dequantize(tensor.data, tensor.tensor_type)
        ref = gptq4_dequantize(st, prefix)
        if ours.shape == ref.shape and np.array_equal(ours, ref):
            res["bit_identical"] += 1
        else:
            diff = float(np.abs(ours - ref).max()) if ours.shape == ref.shape else f"shapes {ours.shape} {ref.shape}"
            res["mismatches"].append(f"{tensor.name}: max |diff| {diff}")
    log(f"GPTQ -> Q4_0: {res['bit_identical']}/{res['tensors']} linears dequantize bit for bit to the "
        f"GPTQ checkpoint's weights (gguf-py vs AutoGPTQ's unpacking in numpy)")
    if res["tensors"] == 0 or res["mismatches"]:
        failures.append(f"GPTQ -> Q4_0 repack: {res['mismatches'][:5] or 'no linear found'}")

    fim = PROMPTS[2]
    fim_text = f"<|fim_prefix|>{fim['fim_prefix']}<|fim_suffix|>{fim['fim_suffix']}<|fim_middle|>"
    out, _ = run([os.path.join(a.llama_bin, "llama-completion"), "-m", path, "-p", fim_text,
                  "-n", "64", "--temp", "0", "-no-cnv", "--no-display-prompt", "-t", str(THREADS)])
    res["llama_completion"] = out
    log(f"llama-completion GPTQ q4_0: {out!r}")

    # llama.cpp runs the file as qcoder does: qcoder on the file imported back
    # (its linears are the checkpoint's weights exactly, as checked above; the
    # embedding and head are stored as the q4_0 mix stores them).
    back = os.path.join(w, "back-gptq-q4_0")
    shutil.rmtree(back, ignore_errors=True)
    run([a.qcoder, "import", path, "-o", back])
    llm = Llama(model_path=path, n_ctx=2048, n_threads=THREADS, logits_all=True, verbose=False)
    res["prompts"] = []
    for p in PROMPTS:
        prompt_ids, ours = qcoder_generate(a.qcoder, back, p)
        theirs = llama_greedy(llm, prompt_ids, len(ours))
        first_diff = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
        res["prompts"].append({"qcoder": ours, "llama_cpp": theirs, "equal": ours == theirs,
                               "first_difference": first_diff})
        log(f"GPTQ q4_0: greedy {'EQUAL' if ours == theirs else f'differs at {first_diff}'} "
            f"(qcoder vs llama.cpp on the repacked file)")
    with open(os.path.join(w, "text_ids.json")) as f:
        ids = json.load(f)
    llm.reset()
    llm.eval(ids)
    theirs = np.argmax(llm.scores[: len(ids)], axis=-1)
    llm.close()
    for key, model, what in (("top1_agreement", back, "the repacked file imported back"),
                             ("top1_agreement_vs_checkpoint", gptq, "the GPTQ checkpoint, f16 embedding and head")):
        out, _ = run([a.argmax, model, os.path.join(w, "text_ids.json")])
        res[key] = float((np.array(json.loads(out)["argmax"]) == theirs).mean())
        log(f"GPTQ q4_0: top-1 agreement qcoder ({what}) vs llama.cpp (repacked file) over "
            f"{len(ids)} tokens: {100 * res[key]:.2f}%")
    if res["top1_agreement"] < 0.98:
        failures.append(f"GPTQ q4_0: top-1 agreement {res['top1_agreement']:.4f} < 0.98")
    report["checks"]["gptq_q4_0_repack"] = res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qcoder", required=True)
    ap.add_argument("--argmax", required=True)
    ap.add_argument("--llama-bin", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--gptq-only", action="store_true",
                    help="only the GPTQ repack check (after a full run filled WORK)")
    ap.add_argument("--gptq", help="a qcoder GPTQ 4-bit checkpoint in symmetric groups of 32 "
                    "(default: GPTQ-quantize the imported model on the stdlib's json package)")
    a = ap.parse_args()
    w = a.work
    report = {"checks": {}, "times_s": {}}
    failures = []

    hf = os.path.join(w, "hf-f16")
    if a.gptq_only:
        gptq_repack(a, hf, report, failures)
        return finish(w, report, failures)
    if not os.path.isdir(hf):
        _, t = run([a.qcoder, "import", a.gguf, "-o", hf, "--dtype", "f16"])
        report["times_s"]["import_f16"] = t
    files, back = {}, {}
    for ty in TYPES:
        files[ty] = os.path.join(w, f"qwen-{ty}.gguf")
        _, t = run([a.qcoder, "export", "--model", hf, "--format", "gguf", "--type", ty, "-o", files[ty]])
        report["times_s"][f"export_{ty}"] = t
        back[ty] = os.path.join(w, f"back-{ty}")
        shutil.rmtree(back[ty], ignore_errors=True)
        run([a.qcoder, "import", files[ty], "-o", back[ty]])
        log(f"exported {ty}: {os.path.getsize(files[ty]) / 2**20:.1f} MiB in {t:.1f} s")

    # llama.cpp's command-line tool loads every file and stops on its own.
    fim = PROMPTS[2]
    fim_text = f"<|fim_prefix|>{fim['fim_prefix']}<|fim_suffix|>{fim['fim_suffix']}<|fim_middle|>"
    for ty in TYPES:
        out, t = run([os.path.join(a.llama_bin, "llama-completion"), "-m", files[ty], "-p", fim_text,
                      "-n", "64", "--temp", "0", "-no-cnv", "--no-display-prompt", "-t", str(THREADS)])
        report["checks"][f"llama_completion_{ty}"] = out
        log(f"llama-completion {ty} ({t:.1f} s): {out!r}")

    # Held-out code text: a Python standard library module.
    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")).read()

    for ty in TYPES:
        llm = Llama(model_path=files[ty], n_ctx=2048, n_threads=THREADS, logits_all=True, verbose=False)
        res = {"prompts": []}
        for p in PROMPTS:
            prompt_ids, ours = qcoder_generate(a.qcoder, back[ty], p)
            prompt_text = p.get("prompt") or fim_text
            llama_tok = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
            theirs = llama_greedy(llm, prompt_ids, len(ours))
            same = ours == theirs
            first_diff = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
            res["prompts"].append({
                "prompt": prompt_text, "tokenization_equal": llama_tok == prompt_ids,
                "qcoder": ours, "llama_cpp": theirs, "equal": same, "first_difference": first_diff,
                "text": llm.detokenize(theirs).decode("utf-8", "replace"),
            })
            log(f"{ty}: greedy {'EQUAL' if same else f'differs at {first_diff}'} "
                f"({len(ours)} tokens, tokenization {'equal' if llama_tok == prompt_ids else 'DIFFERS'}) "
                f"{llm.detokenize(theirs).decode('utf-8', 'replace')!r}")
            if ty in EXACT and not same:
                failures.append(f"{ty}: greedy continuation of {prompt_text!r} differs at token {first_diff}")
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:N_TEXT]
        llm.reset()
        llm.eval(ids)
        theirs = np.argmax(llm.scores[: len(ids)], axis=-1)
        ids_path = os.path.join(w, "text_ids.json")
        with open(ids_path, "w") as f:
            json.dump(ids, f)
        out, _ = run([a.argmax, back[ty], ids_path])
        ours = np.array(json.loads(out)["argmax"])
        agree = float((ours == theirs).mean())
        res["top1_agreement"] = agree
        res["top1_positions"] = len(ids)
        log(f"{ty}: top-1 agreement qcoder vs llama.cpp over {len(ids)} tokens of textwrap.py: {100 * agree:.2f}%")
        if ty.startswith("q4") and agree < 0.98:
            failures.append(f"{ty}: top-1 agreement {agree:.4f} < 0.98")
        report["checks"][ty] = res
        llm.close()

    # qcoder's Q4_K_M against llama-quantize's from the same f16 file.
    ref = os.path.join(w, "llama-quantize-q4_k_m.gguf")
    _, t = run([os.path.join(a.llama_bin, "llama-quantize"), files["f16"], ref, "Q4_K_M", str(THREADS)])
    report["times_s"]["llama_quantize_q4_k_m"] = t
    src = {t.name: t for t in GGUFReader(files["f16"]).tensors}
    mine = {t.name: t for t in GGUFReader(files["q4_k_m"]).tensors}
    theirs = {t.name: t for t in GGUFReader(ref).tensors}
    by_type = {}
    type_mismatch = []
    for name, t in theirs.items():
        m = mine[name]
        if m.tensor_type != t.tensor_type:
            type_mismatch.append((name, m.tensor_type.name, t.tensor_type.name))
            continue
        ty = t.tensor_type.name
        e = by_type.setdefault(ty, {"tensors": 0, "identical": 0, "rmse_qcoder": [], "rmse_llama": [], "blocks_identical": 0.0})
        e["tensors"] += 1
        a_bytes, b_bytes = np.asarray(m.data).tobytes(), np.asarray(t.data).tobytes()
        e["identical"] += a_bytes == b_bytes
        if ty not in ("F32", "F16"):
            x = dequantize(src[name].data, src[name].tensor_type).astype(np.float64)
            for key, tt in (("rmse_qcoder", m), ("rmse_llama", t)):
                y = dequantize(tt.data, tt.tensor_type).astype(np.float64)
                e[key].append(float(np.sqrt(np.mean((x - y) ** 2))))
    summary = {}
    for ty, e in sorted(by_type.items()):
        s = {"tensors": e["tensors"], "byte_identical": e["identical"]}
        if e["rmse_qcoder"]:
            ratios = np.array(e["rmse_qcoder"]) / np.maximum(np.array(e["rmse_llama"]), 1e-30)
            s.update(rmse_ratio_mean=float(ratios.mean()), rmse_ratio_max=float(ratios.max()),
                     rmse_qcoder_mean=float(np.mean(e["rmse_qcoder"])), rmse_llama_mean=float(np.mean(e["rmse_llama"])))
        summary[ty] = s
        log(f"Q4_K_M vs llama-quantize, {ty}: {s}")
    log(f"tensor types differing from llama-quantize: {type_mismatch}")
    report["checks"]["q4_k_m_vs_llama_quantize"] = {"by_type": summary, "type_mismatch": type_mismatch}
    if type_mismatch:
        failures.append(f"{len(type_mismatch)} tensors typed differently from llama-quantize")
    for ty, s in summary.items():
        if s.get("rmse_ratio_max", 1.0) > 1.0 + 1e-6:
            failures.append(f"{ty}: qcoder's error exceeds llama-quantize's on some tensor (max ratio {s['rmse_ratio_max']})")

    gptq_repack(a, hf, report, failures)
    finish(w, report, failures)


def finish(w, report, failures):
    report["failures"] = failures
    with open(os.path.join(w, "report.json" if "q4_k_m_vs_llama_quantize" in report["checks"] else "report-gptq.json"), "w") as f:
        json.dump(report, f, indent=1)
    log("FAILURES:" if failures else "all checks passed", *failures, sep="\n  ")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

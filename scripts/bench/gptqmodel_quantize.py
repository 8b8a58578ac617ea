"""GPTQModel on the same model and calibration windows as qcoder (run in the
separate GPTQModel venv, which needs torch >= 2.14.1; see scripts/bench/quantize).

    python gptqmodel_quantize.py MODEL_DIR CALIB.json OUT_DIR BITS GROUP ACT_ORDER(0|1)

Prints one JSON line: seconds, peak RSS (bytes).

Settings: GPTQModel's defaults (including its act-group-aware ordering when
act-order is off, and offloading to disk) except the dtype: the model is
loaded in f32, as qcoder calibrates, instead of GPTQModel's CPU default of
bf16, which would also round the embeddings, head and norms it saves.
"""

import json
import os
import resource
import sys
import tempfile
import time

import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402


def main():
    model_dir, calib, out, bits, group, act = sys.argv[1:7]
    model_dir, calib, out = (os.path.abspath(p) for p in (model_dir, calib, out))
    os.chdir(tempfile.mkdtemp(prefix="gptqmodel-"))  # it writes logs/ into the cwd
    windows = json.load(open(calib))
    data = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    qc = QuantizeConfig(bits=int(bits), group_size=int(group), desc_act=act == "1", sym=True,
                        damp_percent=0.01, device="cpu")
    t0 = time.time()
    # qc.device="cpu"; load() refuses a device= of its own.
    model = GPTQModel.load(model_dir, qc, dtype=torch.float32)
    model.quantize(data, batch_size=1)
    model.save(out)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The one command that goes to the lent GPU machine: `make gpu-run` (or `bash bench/gpu_run.sh`
# where make is missing). It runs from the source tree on that machine's own Python, torch and
# transformers (no registry there, nothing installed): bench/fullsize.py at Mantis-8B-Idefics2's
# real shape with random bf16 weights, S=30 T=5 R=6 L=2, list and parallel mode at batch 1 and 8.
# Results go to $OUT (the device tool brings that folder back) or bench/results/quick/.
# `make gpu-rehearsal` runs this same script on the CPU at a tiny shape in .venv-gpu, a
# virtualenv with that machine's torch and transformers (bench/gpu_machine.txt).
#   SHAPE=8b|like  DEVICE=cuda|cpu  BATCHES=1,8  REPEATS=2  BUDGET_S=420  PY=python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SHAPE=${SHAPE:-8b}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-1,8}
REPEATS=${REPEATS:-2}
BUDGET_S=${BUDGET_S:-420}   # no new configuration after 7 minutes: the call's limit is 10
DEST=${OUT:-bench/results/quick}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "tokenizers", "accelerate", "numpy", "PIL", "hnswlib", "cv2"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError:
        print(name, "not installed")
import cv2
print("cv2.saliency", "present" if hasattr(cv2, "saliency") else "absent (no contrib modules: the no-VLM fallback cannot run)")
import torch
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print("gpu", torch.cuda.get_device_name(0), f"{free / 1e9:.1f} of {total / 1e9:.1f} GB free")
from cropper_engine.models.hf_compat import version_note
print(version_note() or "transformers inside the supported range")
# the 8B model, its 32,003-token tokenizer and processor, built on the meta device (no memory): the
# full-size construction path, checked in seconds wherever this runs (the rehearsal too)
import tempfile
from cropper_engine.models.tiny_vlm import build_idefics2
_, meta = build_idefics2(tempfile.mkdtemp(), "8b", save_weights=False, device="meta")
print(f"8b shape on the meta device: {sum(p.numel() for p in meta.parameters()) / 1e9:.2f} B parameters, "
      f"sliding window {meta.config.text_config.sliding_window}")
PYEOF
"$PY" bench/fullsize.py --shape "$SHAPE" --device "$DEVICE" --batches "$BATCHES" --modes list,parallel \
  --repeats "$REPEATS" --budget-s "$BUDGET_S" --json "$DEST/fullsize-$SHAPE.json" --strict

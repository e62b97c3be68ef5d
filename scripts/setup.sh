#!/usr/bin/env bash
# Creates .venv with everything the package, its tests and its exports need.
# Safe to run again: an existing, complete .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import convnextv2, torch, timm, transformers, onnxruntime, hypothesis, pycocotools, tensorboard, yaml, webdataset, submitit" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  # torch and torchvision first, pinned: these builds lie on the project's machines' disk
  # (a CUDA build that also runs on the CPU); PyPI's torchvision does not pair with other torch files.
  .venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install --quiet -e ".[test,export]"
fi
echo "ready: $(.venv/bin/python -c 'import torch, convnextv2; print("convnextv2", convnextv2.__version__, "torch", torch.__version__)')"

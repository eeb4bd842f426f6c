#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with asyncrl and its test tools.
# The CPU build of torch goes in first (TORCH_SPEC overrides it, e.g. TORCH_SPEC=torch for CUDA
# machines); otherwise pip resolves `torch` to the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install --quiet "$TORCH_SPEC"
.venv/bin/pip install --quiet -e '.[test]'
# torchvision/torchaudio/torchcodec from the index are CUDA builds that break CPU torch imports.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, transformers, zmq; print('asyncrl setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"

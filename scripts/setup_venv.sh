#!/usr/bin/env bash
# Create .venv at the repository root (if missing) and install hf_zero into it.
# The CPU build of torch is pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, transformers, accelerate, safetensors, datasets, pytest, hf_zero, _hf_zero_autostart" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[test]"
fi
# The start-up hook (hf_zero_autostart.pth, see _hf_zero_autostart.py): a wheel install ships it,
# an editable one does not, so write it here.
.venv/bin/python -m _hf_zero_autostart install >/dev/null

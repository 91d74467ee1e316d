#!/usr/bin/env bash
# Set up mgcl in ./.venv: PyTorch (+ torchvision for the model adapters), then
# mgcl itself, editable, with its test extras. The build compiles mgcl._C
# (C++/OpenMP) and, when nvcc is on PATH, mgcl._C_cuda (MGCL_CUDA=AUTO|ON|OFF).
# Safe to run again: it reuses the venv and rebuilds the native modules.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MGCL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and on its own: where pip is capped (see README) this takes the
# local wheels; torchvision is needed by open_clip.
"$VENV/bin/python" -m pip install -q ${MGCL_TORCH_SPEC:-torch torchvision}
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m mgcl info

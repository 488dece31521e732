#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch and moeforge installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # CPU torch first: an unpinned torch would pull a multi-GB CUDA build. Set TORCH_SPEC to choose another.
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install --quiet -e ".[test]"
# llama.cpp's converter and gguf-py, from the llama-cpp-python sdist on PyPI (cached under benchmarks/work/)
.venv/bin/python -c 'import sys; sys.path.insert(0, "tests"); import llamacpp_kit; llamacpp_kit.source(download=True)'

#!/usr/bin/env bash
# Set up (if needed), make small dense models locally, build an MoE from them and generate with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"

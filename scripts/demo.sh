#!/usr/bin/env bash
# Set up (if needed), train four small experts locally, build an MoE with fitted routers, and show what
# it generates and which expert its routers choose for each prompt (no network; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"

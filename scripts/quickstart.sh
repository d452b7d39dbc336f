#!/usr/bin/env bash
# Fresh machine -> environment -> train the tiny Flash model on the CPU -> 12-task eval.
# Usage: bash scripts/quickstart.sh [WORKDIR]   (default: /tmp/flashmm_tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-/tmp/flashmm_tiny}"
bash scripts/setup.sh
.venv/bin/python train.py --config=configs/flash.py:tiny --workdir="$workdir"
.venv/bin/python eval.py --config=configs/flash.py:tiny --workdir="$workdir"

#!/usr/bin/env bash
# Train a model on one GPU within a wall-clock budget, score the 12 tasks, and report
# throughput (tokens/s, MFU) with the eval table.
# Usage: bash benchmarks/spine_gpu.sh OUT_DIR CONFIG MINUTES [extra train.py flags...]
#   e.g. bash benchmarks/spine_gpu.sh $OUT configs/pro.py:small 7 --config.train.total_steps=6000
set -euo pipefail
out=$1 config=$2 minutes=$3
shift 3
workdir="$out/run"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python train.py --config="$config" --workdir="$workdir" \
  --config.train.max_time_minutes="$minutes" --config.data.num_workers="${NUM_WORKERS:-12}" \
  --alsologtostderr "$@" 2>&1 | grep -v "^W" | tee "$out/train.log"
python eval.py --config="$config" --workdir="$workdir" "$@" 2>&1 | tee "$out/eval.log"
python benchmarks/training_report.py --workdir="$workdir" --out="$out/report"
rm -rf "$workdir/checkpoints"   # large; the report and eval tables are what come back

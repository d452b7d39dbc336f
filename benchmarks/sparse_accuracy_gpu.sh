#!/usr/bin/env bash
# The accuracy half of issue #10 on one GPU: train a dense model, fine-tune the
# sparse-attention gate from it (everything else frozen), score both on the 12
# tasks, and tabulate accuracy, sparsity and attention FLOPs saved per task.
# Usage: bash benchmarks/sparse_accuracy_gpu.sh OUT CONFIG DENSE_STEPS GATE_STEPS [flags for every run]
#   e.g. bash benchmarks/sparse_accuracy_gpu.sh $OUT configs/flash.py:small 2500 400 --config.data.image_size=128
set -euo pipefail
out=$1 config=$2 dense_steps=$3 gate_steps=$4
shift 4
dense="$out/dense" sparse="$out/sparse"
workers="--config.data.num_workers=${NUM_WORKERS:-12}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python train.py --config="$config" --workdir="$dense" --config.train.total_steps="$dense_steps" \
  $workers --alsologtostderr "$@" 2>&1 | grep -v "^W" | tee "$out/dense_train.log"
python eval.py --config="$config" --workdir="$dense" "$@" 2>&1 | tee "$out/dense_eval.log"
python train.py --config="$config,sparse" --workdir="$sparse" --config.train.init_from="$dense" \
  --config.train.total_steps="$gate_steps" $workers --alsologtostderr "$@" 2>&1 \
  | grep -v "^W" | tee "$out/sparse_train.log"
python eval.py --config="$config,sparse" --workdir="$sparse" "$@" 2>&1 | tee "$out/sparse_eval.log"
# The same gate at other thresholds (eval only): the sparsity / accuracy curve.
sweep=()
for thr in ${THRESHOLDS:-0.05 0.1 0.5}; do
  python eval.py --config="$config,sparse" --workdir="$out/thr_$thr" --checkpoint="$sparse" \
    --config.model.sparse.threshold="$thr" "$@" 2>&1 | tail -3
  sweep+=("$out/thr_$thr/eval/results.json")
done
python benchmarks/sparse_report.py "$out/sparse_accuracy" "$dense/eval/results.json" \
  "$sparse/eval/results.json" "${sweep[@]}"
rm -rf "$dense/checkpoints" "$sparse/checkpoints"   # large; the tables are what come back

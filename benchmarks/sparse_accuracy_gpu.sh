#!/usr/bin/env bash
# The accuracy half of issue #10 on one GPU, the whole recipe:
#   dense      train the dense model;
#   gate       fine-tune the gate alone on it (LM frozen), one gate per TARGETS entry;
#   sweep      score each gate under every selection rule in RULES (eval only);
#   joint      train the whole model through the sparse kernels, from the first
#              target's gate, under JOINT_RULE if set (one of RULES), else the rule
#              picked by sparsity alone (the densest swept rule reaching MIN_SPARSITY);
#   dense_ft   the dense model trained as many further steps at the same rate: the
#              fair baseline for the joint model;
#   report     per-task table (joint vs dense_ft), sparsity/accuracy curves.
# Usage: bash benchmarks/sparse_accuracy_gpu.sh OUT CONFIG DENSE_STEPS [flags for every run]
#   e.g. bash benchmarks/sparse_accuracy_gpu.sh $OUT configs/flash.py:small 1500 \
#          --config.data.image_size=128 --config.data.eval_examples=500
# Env: TARGETS, RULES (eval.py --sweep settings), MIN_SPARSITY, JOINT_RULE, GATE_STEPS, JOINT_STEPS,
# NUM_WORKERS (defaults below).
#   FT_GPU=1 (MAIN_GPU=0): the dense model's eval and dense_ft run on that GPU beside the
#     gate and joint stages (the whole recipe at 256 px took ~39 minutes on one H100, over
#     a machine's 30-minute hold). DENSE_GPUS=0,1 trains the dense model data-parallel on
#     both (not yet timed on GPUs: the grain workers must then feed twice the rate).
#   GATE_EVAL=0 skips the gate-only sweep (its curve); the joint stage then needs JOINT_RULE.
#   SPARSE_DECODE=1: also scores the joint model with sparse decode steps
#     (model.sparse.decode) under its rule, a reference row in the report.
#   STAGES (default "dense dense_ft gate joint"): the stages to run, in that order; a
#     stage needs the checkpoints of those before it in OUT. Split over two machines
#     (each held at most 30 minutes): STAGES="dense dense_ft" KEEP_CHECKPOINTS=1 on the
#     first, `ship_params.sh pack OUT/dense ...` and the results archive back, then
#     STAGES="gate joint" on the second from the unpacked dense params and results (README).
# Writes OUT/DONE when it ends, well or not (benchmarks/device_poll.sh waits for it).
set -euo pipefail
out=$1 config=$2 dense_steps=$3
shift 3
read -r -a targets <<< "${TARGETS:-mass peak}"
read -r -a rules <<< "${RULES:-threshold=0.3 threshold=0.5 threshold=0,coverage=0.5 threshold=0,coverage=0.6 threshold=0,coverage=0.7 threshold=0,coverage=0.8}"
workers="--config.data.num_workers=${NUM_WORKERS:-12}"
# One persistent compilation cache for every process: the evals of a model under
# the same rule, and dense and dense_ft's, compile the same programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
gate_steps=${GATE_STEPS:-500} joint_steps=${JOINT_STEPS:-400}
mkdir -p "$out"
trap 'touch "$out/DONE"' EXIT

phase() { echo "== $1 $(date +%T)"; }
train() {  # DIR CONFIG [flags]: trains, keeps the log beside DIR, prints its last lines
  local dir=$1 cfg=$2
  shift 2
  python train.py --config="$cfg" --workdir="$dir" $workers --alsologtostderr "$@" 2>&1 \
    | grep --line-buffered -v "^W" > "$dir.train.log" || { tail -n 30 "$dir.train.log"; return 1; }
  grep -E "step|Stopping" "$dir.train.log" | tail -n 2 || true
}
evaluate() {  # DIR CONFIG [flags]: the latest checkpoint in DIR, results in DIR/eval
  local dir=$1 cfg=$2 log=${EVAL_LOG:-$1.eval.log}
  shift 2
  python eval.py --config="$cfg" --workdir="$dir" "$@" 2>&1 | grep -v "^W" > "$log" \
    || { tail -n 30 "$log"; return 1; }
  grep -E "^\| \*\*mean|^## " "$log" || true
}
sweep_flags() { for r in "${rules[@]}"; do echo "--sweep=$r"; done; }

dense_ft() {  # [flags]: the fair baseline, from the dense checkpoint
  need "$out/dense/checkpoints"
  phase dense_ft
  train "$out/dense_ft" "$config,joint" --config.model.sparse.enabled=False \
    --config.train.init_from="$out/dense" --config.train.total_steps="$joint_steps" "$@"
  evaluate "$out/dense_ft" "$config,joint" --config.model.sparse.enabled=False "$@"
  phase "dense_ft done"
}

want() { [[ " ${STAGES:-dense dense_ft gate joint} " == *" $1 "* ]]; }
need() { [ -e "$1" ] || { echo "missing $1: run the stage that writes it first (STAGES)"; exit 1; }; }

dense_side() {  # [flags]: the dense model's eval, then dense_ft: all the dense stages after training
  if want dense; then
    phase "dense eval"
    evaluate "$out/dense" "$config" "$@"
  fi
  if want dense_ft; then dense_ft "$@"; fi
}

[ "${GATE_EVAL:-1}" != 0 ] || [ -n "${JOINT_RULE:-}" ] || ! want joint \
  || { echo "GATE_EVAL=0 leaves no sweep to pick the joint rule from: set JOINT_RULE"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if want dense; then
  phase dense
  # All visible GPUs, or MAIN_GPU alone where FT_GPU is set, unless DENSE_GPUS says.
  gpus=${DENSE_GPUS:-${FT_GPU:+${MAIN_GPU:-0}}}
  ( [ -z "$gpus" ] || export CUDA_VISIBLE_DEVICES=$gpus
    train "$out/dense" "$config" --config.train.total_steps="$dense_steps" "$@" )
fi
if [ -n "${FT_GPU:-}" ]; then   # two GPUs: the dense side beside the gate and joint stages
  CUDA_VISIBLE_DEVICES=$FT_GPU dense_side "$@" &
  export CUDA_VISIBLE_DEVICES=${MAIN_GPU:-0}
else
  dense_side "$@"
fi

first=${targets[0]}
if want gate; then
  need "$out/dense/checkpoints"
  phase "gate $first"
  train "$out/gate_$first" "$config,sparse" --config.train.init_from="$out/dense" \
    --config.model.sparse.target="$first" --config.train.total_steps="$gate_steps" "$@"
  if [ "${GATE_EVAL:-1}" != 0 ]; then
    evaluate "$out/gate_$first" "$config,sparse" --config.model.sparse.target="$first" \
      $(sweep_flags) "$@"
  fi
fi

if want joint; then
  need "$out/gate_$first/checkpoints"
  if [ -n "${JOINT_RULE:-}" ]; then   # one of RULES, e.g. threshold=0,coverage=0.5
    pick=$(python benchmarks/sparse_report.py name "$JOINT_RULE")
    rule_flags=$(python benchmarks/sparse_report.py rule_flags "$JOINT_RULE")
  else
    pick=$(python benchmarks/sparse_report.py pick "${MIN_SPARSITY:-0.6}" "$out/gate_$first/eval")
    rule_flags=$(python benchmarks/sparse_report.py flags "$out/gate_$first/eval/$pick/results.json")
  fi
  echo "$pick" > "$out/joint_rule"
  phase "joint ($pick)"
  train "$out/joint" "$config,sparse,joint" --config.train.init_from="$out/gate_$first" \
    --config.model.sparse.target="$first" --config.train.total_steps="$joint_steps" $rule_flags "$@"
  evaluate "$out/joint" "$config,sparse,joint" --config.model.sparse.target="$first" \
    $(sweep_flags) "$@"
  if [ -n "${SPARSE_DECODE:-}" ]; then   # optional: a failure here leaves the rest running
    phase "joint, sparse decode steps"
    EVAL_LOG="$out/joint.decode.eval.log" evaluate "$out/joint" "$config,sparse,joint" \
      --config.model.sparse.target="$first" $rule_flags --config.model.sparse.decode=True \
      --out="$out/joint/eval_sparse_decode" "$@" || echo "sparse-decode eval failed"
  fi
fi
wait   # for dense_ft on FT_GPU

report() {  # once the dense_ft and joint stages' results are in OUT
  if [ ! -s "$out/dense_ft/eval/results.json" ] || [ ! -e "$out/joint_rule" ]; then
    echo "no report: it needs the dense_ft and joint stages' results in $out"
    return
  fi
  local pick
  pick=$(cat "$out/joint_rule")
  python benchmarks/sparse_report.py report "$out/sparse_accuracy" \
    --dense "$out/dense_ft/eval/results.json" --sparse "$out/joint/eval/$pick/results.json" \
    --dense_label "dense + ${joint_steps} steps (dense_ft, the fair baseline)" \
    --curve "joint=$out/joint/eval" --reference "dense_${dense_steps}_steps=$out/dense/eval/results.json" \
    $(d=$out/joint/eval_sparse_decode/results.json; [ -e "$d" ] && echo "--reference=joint_sparse_decode=$d") \
    $(for t in "${targets[@]}"; do [ -d "$out/gate_$t/eval" ] && echo "--curve=gate_$t=$out/gate_$t/eval"; done)
}
report
if want gate; then
  for target in "${targets[@]:1}"; do  # further gate targets: gate-only curves
    phase "gate $target"
    train "$out/gate_$target" "$config,sparse" --config.train.init_from="$out/dense" \
      --config.model.sparse.target="$target" --config.train.total_steps="$gate_steps" "$@"
    evaluate "$out/gate_$target" "$config,sparse" --config.model.sparse.target="$target" \
      $(sweep_flags) "$@"
    report
  done
fi
# Large; the tables are what come back. KEEP_CHECKPOINTS=1 keeps them (ship_params.sh).
[ -n "${KEEP_CHECKPOINTS:-}" ] || rm -rf "$out"/*/checkpoints
phase done

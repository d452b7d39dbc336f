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
#     both (8.0 steps/s at 256 px on two H200s, against 4.1 on one; docs/results.md).
#   GATE_EVAL=0 skips the gate-only sweep (its curve); the joint stage then needs JOINT_RULE.
#   SERVE_RULE: the rule (one of RULES) the report scores the joint model under, where
#     it serves under another than it trained with (e.g. trained at coverage 0.65,
#     served at 0.6: docs/results.md, seventh run); default the joint rule.
#   JOINT_FLAGS: flags for the joint stage and its evals alone (a recipe change under
#     test); with ABLATE=1 (needs FT_GPU and JOINT_RULE) a second joint run,
#     joint_ablated, with ABLATE_FLAGS in their place (e.g.
#     --config.model.sparse.dense_text=False, the fourth run's recipe), trains on FT_GPU
#     after dense_ft from the same gate, so one hold measures what the difference does.
#   SPARSE_DECODE=1: also scores the joint model with sparse decode steps
#     (model.sparse.decode, and so dense_text off) under its rule, a reference row in
#     the report.
#   STAGES (default "dense dense_ft gate joint"): the stages to run, in that order; a
#     stage needs the checkpoints of those before it in OUT. Split over two machines
#     (each held at most 30 minutes): STAGES="dense dense_ft" KEEP_CHECKPOINTS=1 on the
#     first, `ship_params.sh pack OUT/dense ...` and the results archive back, then
#     STAGES="gate joint" on the second from the unpacked dense params and results (README).
#   DENSE_GPUS=0,1 falls back to MAIN_GPU alone if the data-parallel run fails (it
#     resumes from its last checkpoint).
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
gate_steps=${GATE_STEPS:-500} joint_steps=${JOINT_STEPS:-600}   # the joint config's 600
read -r -a joint_flags <<< "${JOINT_FLAGS:-}"
read -r -a ablate_flags <<< "${ABLATE_FLAGS:-}"
mkdir -p "$out"
# A run that died can leave its dense side (FT_GPU) training on; a second run into
# the same OUT would train beside it on the same GPU (the eighth accuracy run's rerun
# ran out of memory so, docs/results.md). Its DONE and markers are left alone.
for f in "$out/recipe.pid" "$out/side.pid"; do
  if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
    echo "an earlier run into $out is still running ($(basename "$f") $(cat "$f")): wait for it or kill it"
    exit 1
  fi
done
echo $$ > "$out/recipe.pid"
rm -f "$out/DONE" "$out"/*.done   # a results archive unpacked here holds the last run's
trap 'rm -f "$out/recipe.pid"; touch "$out/DONE"' EXIT

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

# DIR [flags]: the whole model trained from the first target's gate under the joint
# rule ($pick, $rule_flags), then scored under every rule in RULES.
joint() {
  local dir=$1
  shift
  need "$out/gate_$first/checkpoints"
  phase "$(basename "$dir") ($pick)"
  train "$dir" "$config,sparse,joint" --config.train.init_from="$out/gate_$first" \
    --config.model.sparse.target="$first" --config.train.total_steps="$joint_steps" $rule_flags "$@"
  evaluate "$dir" "$config,sparse,joint" --config.model.sparse.target="$first" \
    $(sweep_flags) "$@"
}

want() { [[ " ${STAGES:-dense dense_ft gate joint} " == *" $1 "* ]]; }
need() { [ -e "$1" ] || { echo "missing $1: run the stage that writes it first (STAGES)"; exit 1; }; }

gate_ready() {  # waits for the gate stage on the main GPU (its marker), or the recipe's end
  until [ -e "$out/gate_$first.done" ]; do
    [ ! -e "$out/DONE" ] || { echo "no gate checkpoint: the ablated joint run is skipped"; return 1; }
    sleep 5
  done
}

dense_side() {  # [flags]: the dense model's eval, dense_ft, then (ABLATE) joint_ablated
  if want dense; then
    phase "dense eval"
    evaluate "$out/dense" "$config" "$@"
  fi
  if want dense_ft; then dense_ft "$@"; fi
  if [ -n "${ABLATE:-}" ] && want joint && gate_ready; then
    joint "$out/joint_ablated" "$@" ${ablate_flags[@]+"${ablate_flags[@]}"}
    touch "$out/joint_ablated.done"
    phase "joint_ablated done"
  fi
  rm -f "$out/side.pid"
}

[ "${GATE_EVAL:-1}" != 0 ] || [ -n "${JOINT_RULE:-}" ] || ! want joint \
  || { echo "GATE_EVAL=0 leaves no sweep to pick the joint rule from: set JOINT_RULE"; exit 1; }
[ -z "${ABLATE:-}" ] || { [ -n "${FT_GPU:-}" ] && [ -n "${JOINT_RULE:-}" ]; } \
  || { echo "ABLATE=1 runs beside the joint stage: set FT_GPU and JOINT_RULE"; exit 1; }
[ -z "${SERVE_RULE:-}" ] || [[ " ${rules[*]} " == *" $SERVE_RULE "* ]] \
  || { echo "SERVE_RULE=$SERVE_RULE is not one of RULES (${rules[*]}): nothing scores it"; exit 1; }
first=${targets[0]}
if [ -n "${JOINT_RULE:-}" ]; then   # one of RULES, e.g. threshold=0,coverage=0.5
  pick=$(python benchmarks/sparse_report.py name "$JOINT_RULE")
  rule_flags=$(python benchmarks/sparse_report.py rule_flags "$JOINT_RULE")
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if want dense; then
  phase dense
  # All visible GPUs, or MAIN_GPU alone where FT_GPU is set, unless DENSE_GPUS says.
  gpus=${DENSE_GPUS:-${FT_GPU:+${MAIN_GPU:-0}}}
  ( [ -z "$gpus" ] || export CUDA_VISIBLE_DEVICES=$gpus
    train "$out/dense" "$config" --config.train.total_steps="$dense_steps" "$@" ) \
  || { [[ "${DENSE_GPUS:-}" == *,* ]] || exit 1
       echo "dense on GPUs $DENSE_GPUS failed: again on GPU ${MAIN_GPU:-0}, from its last checkpoint"
       CUDA_VISIBLE_DEVICES=${MAIN_GPU:-0} train "$out/dense" "$config" \
         --config.train.total_steps="$dense_steps" "$@"; }
fi
side=
if [ -n "${FT_GPU:-}" ]; then   # two GPUs: the dense side beside the gate and joint stages
  CUDA_VISIBLE_DEVICES=$FT_GPU dense_side "$@" &
  side=$!
  echo "$side" > "$out/side.pid"
  export CUDA_VISIBLE_DEVICES=${MAIN_GPU:-0}
else
  dense_side "$@"
fi

if want gate; then
  need "$out/dense/checkpoints"
  phase "gate $first"
  train "$out/gate_$first" "$config,sparse" --config.train.init_from="$out/dense" \
    --config.model.sparse.target="$first" --config.train.total_steps="$gate_steps" "$@"
fi
[ ! -e "$out/gate_$first/checkpoints" ] || touch "$out/gate_$first.done"
if want gate && [ "${GATE_EVAL:-1}" != 0 ]; then
  evaluate "$out/gate_$first" "$config,sparse" --config.model.sparse.target="$first" \
    $(sweep_flags) "$@"
fi

if want joint; then
  if [ -z "${JOINT_RULE:-}" ]; then  # the densest swept rule reaching MIN_SPARSITY
    pick=$(python benchmarks/sparse_report.py pick "${MIN_SPARSITY:-0.6}" "$out/gate_$first/eval")
    rule_flags=$(python benchmarks/sparse_report.py flags "$out/gate_$first/eval/$pick/results.json")
  fi
  echo "$pick" > "$out/joint_rule"
  joint "$out/joint" "$@" ${joint_flags[@]+"${joint_flags[@]}"}
  if [ -n "${SPARSE_DECODE:-}" ]; then   # optional: a failure here leaves the rest running
    phase "joint, sparse decode steps"
    EVAL_LOG="$out/joint.decode.eval.log" evaluate "$out/joint" "$config,sparse,joint" \
      --config.model.sparse.target="$first" $rule_flags --config.model.sparse.decode=True \
      --out="$out/joint/eval_sparse_decode" "$@" ${joint_flags[@]+"${joint_flags[@]}"} \
      --config.model.sparse.dense_text=False || echo "sparse-decode eval failed"
  fi
fi

report() {  # once the dense_ft and joint stages' results are in OUT
  if [ ! -s "$out/dense_ft/eval/results.json" ] || [ ! -e "$out/joint_rule" ]; then
    echo "no report: it needs the dense_ft and joint stages' results in $out"
    return
  fi
  local pick arm curves=()
  pick=$(cat "$out/joint_rule")
  [ -z "${SERVE_RULE:-}" ] || pick=$(python benchmarks/sparse_report.py name "$SERVE_RULE")
  local arms=(joint)   # the ablated run once its eval is complete
  [ ! -e "$out/joint_ablated.done" ] || arms+=(joint_ablated)
  for arm in "${arms[@]}"; do
    [ ! -d "$out/$arm/eval" ] || curves+=("--curve=$arm=$out/$arm/eval")
  done
  for t in "${targets[@]}"; do
    [ ! -d "$out/gate_$t/eval" ] || curves+=("--curve=gate_$t=$out/gate_$t/eval")
  done
  local d=$out/joint/eval_sparse_decode/results.json
  [ ! -e "$d" ] || curves+=("--reference=joint_sparse_decode=$d")
  for arm in "${arms[@]}"; do   # one table per joint run against dense_ft
    [ -s "$out/$arm/eval/$pick/results.json" ] || continue
    python benchmarks/sparse_report.py report "$out/sparse_accuracy${arm#joint}" \
      --dense "$out/dense_ft/eval/results.json" --sparse "$out/$arm/eval/$pick/results.json" \
      --dense_label "dense + ${joint_steps} steps (dense_ft, the fair baseline)" \
      --reference "dense_${dense_steps}_steps=$out/dense/eval/results.json" "${curves[@]}"
  done
}
# The report as soon as dense_ft's results are in; again once an ablated run has ended.
while [ -n "$side" ] && kill -0 "$side" 2>/dev/null && [ ! -s "$out/dense_ft/eval/results.json" ]; do
  sleep 5
done
report
wait   # for the dense side on FT_GPU
[ -z "${ABLATE:-}" ] || report
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

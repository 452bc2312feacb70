#!/usr/bin/env bash
# Settle phase 2's open defaults on a lent GPU: each lever against the alternative, paired over several batch
# seeds (same batches for both settings of a seed), on validation only, from models/dense.safetensors.
# On 2 CPU cores one such run takes ~30 minutes, so there each comparison rests on one or three seeds
# (docs/training.md); on a GPU a run should take seconds.
# Usage: bash scripts/gpu_levers.sh [BUDGET_S]   (DATA, SEEDS and OUT from the environment; summaries under $OUT;
#        STEPS overrides every run's step count, e.g. STEPS=2 SEEDS="0 1" for a smoke test of the script itself)
set -uo pipefail
budget=${1:-540}
data=${DATA:-.gpu/cifar10-jpeg.tar.gz}
seeds=${SEEDS:-0 1 2 3 4}
out=${OUT:-levers-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)"
t0=$(date +%s)

compare() {  # NAME ARGS...: one phase2_ablation.py comparison, cut at what is left of the budget
  local name=$1 left
  shift
  left=$(( budget - ($(date +%s) - t0) ))
  if [ "$left" -lt 60 ]; then echo "$name: skipped, budget spent"; return; fi
  # shellcheck disable=SC2086  # the seeds are words
  timeout "$left" python3 scripts/phase2_ablation.py --data "$data" "$@" --batch-seeds $seeds ${STEPS:+--steps $STEPS} \
    > "$out/$name.txt" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - t0 )) s"
  sed -n '/^over batch seeds/,$p' "$out/$name.txt" | grep -v -E "^survivors|^  \.\.\."
}

compare share-keep0.1 --granularity weight --keep 0.1 --steps 600 --prune-shares 0.5 0.75
compare share-keep0.05 --granularity weight --keep 0.05 --steps 600 --prune-shares 0.5 0.75
compare ranking-keep0.625 --keep 0.625 --steps 300 --rankings mass taylor
compare ranking-keep0.5 --keep 0.5 --steps 300 --rankings mass taylor

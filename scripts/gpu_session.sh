#!/usr/bin/env bash
# One lent-GPU session: the phase-1 recipe ablation on validation, then the full pipeline with the
# winning setting, inside a wall-clock budget (seconds, $1); results packed under $OUT. The work dir
# (/tmp/w/runs) resumes, so a run cut by the budget finishes on a second call to the same machine.
# ABLATION=0 skips the ablation (110 s) and runs the pipeline with its defaults (the ablation's past winner).
# PRUNE_FLAGS adds prune-train flags (e.g. PRUNE_FLAGS="--soup 1"); a work dir resumes only with the same ones.
set -uo pipefail
budget=${1:-570}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)"
t0=$(date +%s)
data=.gpu/cifar10-jpeg.tar.gz
flags="${PRUNE_FLAGS:-}"
if [ "${ABLATION:-1}" != 0 ]; then
  timeout 110 python3 scripts/recipe_ablation.py "$data" 2>&1 | tee "$OUT/ablation.txt"
  flags="$flags $(grep '^FLAGS' "$OUT/ablation.txt" | cut -c7-)"
fi
left=$(( budget - ($(date +%s) - t0) ))
echo "full pipeline with flags [$flags], $left s left"
timeout "$left" python3 -m training.pipeline --data "$data" --out /tmp/w/models --work-dir /tmp/w/runs $flags \
  2>&1 | tr '\r' '\n' > "$OUT/log.txt"
echo "pipeline exit ${PIPESTATUS[0]} at $(( $(date +%s) - t0 )) s"
grep -E "^prune-train|^exported|error|Error" "$OUT/log.txt" | tail -8
cd /tmp/w && tar -cf - runs/run-config.json runs/seed-*/results.json runs/seed-*/sweep runs/seed-*/channel runs/seed-0/dense.safetensors \
  runs/seed-0/variants 2>/dev/null | split -b 15m - "$OUT/pack.tar.part-"
ls -la "$OUT"

#!/usr/bin/env bash
# The full pipeline on a GPU machine, timed: a 1-epoch smoke run first (fails fast on a broken
# environment), then `prune-train` with default flags (3 seeds, sweep, channel variants).
# Usage: scripts/gpu_pipeline.sh DATA WORK_DIR OUT_DIR [LOG]   (runs from a source checkout: PYTHONPATH=.)
set -euo pipefail
data=$1 work=$2 out=$3 log=${4:-/dev/null}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
python3 -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name(0))'
smoke=$(mktemp -d)
began=$(date +%s)
python3 -m training.pipeline --data "$data" --out "$smoke/models" --work-dir "$smoke/runs" --seeds 1 \
  --epochs 1 --train-limit 4096 --keeps 0.5 --prune-steps 5 --channel-keeps 0.5 --channel-steps 5 >"$smoke/log" 2>&1 \
  || { tail -30 "$smoke/log"; exit 1; }
echo "smoke run passed in $(( $(date +%s) - began )) s (includes decoding the data set once)"
began=$(date +%s)
status=0
timeout "${FULL_TIMEOUT:-480}" python3 -m training.pipeline --data "$data" --out "$out" --work-dir "$work" \
  2>&1 | tr '\r' '\n' | tee "$log" | grep -v -E "it/s|variant/s|epoch/s|s/variant|s/epoch|\?" || status=$?
echo "full pipeline: exit $status after $(( $(date +%s) - began )) s"
exit "$status"

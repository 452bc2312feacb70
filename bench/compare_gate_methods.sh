#!/usr/bin/env bash
# How the gate-training method was chosen: short runs of a small network (widths 32/64/128, 5 epochs,
# one seed) per method, compared on the VALIDATION split (val_acc_mean in each results.csv).
#   bash bench/compare_gate_methods.sh ../shared/data/cifar10-jpeg.tar.gz /tmp/gate-compare
set -euo pipefail
data=${1:?usage: compare_gate_methods.sh DATA OUTDIR}
out=${2:-/tmp/gate-compare}
run() {
  local tag=$1; shift
  prune-train --data "$data" --out "$out/$tag/models" --work-dir "$out/$tag/runs" --seeds 1 --epochs 5 \
    --widths 32 64 128 --stem-width 16 --keeps 0.5 0.3 0.1 0.05 --criteria gate gate_magnitude magnitude \
    --finetune-steps 0 --gate-rank score "$@"
}
run none --gate-method none
run penalty --gate-method penalty --gate-lr 0.01
run st_eff_p5_lr003 --gate-method st_topk --gate-rank effective --gate-dense-prob 0.5 --gate-lr 0.003  # shipped
run st_p5 --gate-method st_topk --gate-dense-prob 0.5 --gate-lr 0.01
run st_p5_uniform --gate-method st_topk --gate-dense-prob 0.5 --gate-lr 0.01 --gate-keep-dist uniform
run st_p5_lr003 --gate-method st_topk --gate-dense-prob 0.5 --gate-lr 0.003
run st_p5_lr001 --gate-method st_topk --gate-dense-prob 0.5 --gate-lr 0.001
run st_p7_lr003 --gate-method st_topk --gate-dense-prob 0.7 --gate-lr 0.003
for f in "$out"/*/models/results.csv; do echo "== $f"; cut -d, -f1,2,8 "$f"; done

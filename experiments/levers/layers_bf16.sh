#!/usr/bin/env bash
# The drafter layers' products in bf16 as well as the head's (issue 11, training throughput):
# the quick recipe's drafter (two layers that start as the target's top two, 28-29, taps [1, 27];
# AUF, lr 0.002, 2 × 32 anchors, 600 steps) trained with `layer_precision = "bf16"` and
# `head.precision = "bf16"`, one run per seed in SEEDS (default "0 1 2 3": OUT/sN), beside the
# arms of experiments/levers/head_bf16.sh (its OUT is HEAD, holding f32 and bf16-head arms for the
# same seeds; F32 is its seed-0 f32 arm). Seed 0's three drafters are evaluated in one run. The
# held-out figures are in the logs. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/bf16all HEAD=/work/runs/rec/bf16 F32=/work/runs/rec/freeze/whole experiments/levers/layers_bf16.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
HEAD=${HEAD:?the output folder of experiments/levers/head_bf16.sh}
F32=${F32:?its seed-0 f32 arm}
. experiments/levers/lib.sh
quick_arm_args "$DATA"
common=("${QUICK_ARM[@]}" --set steps=600 --set head.precision=bf16 --set layer_precision=bf16)
mkdir -p "$OUT"
for seed in ${SEEDS:-0 1 2 3}; do
    train_arm "$OUT/s$seed" "$OUT/s$seed.log" "${common[@]}" --set seed="$seed"
done
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$F32,$HEAD/bf16/final,$OUT/s0/final" \
    --label f32,bf16-head,bf16-all --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

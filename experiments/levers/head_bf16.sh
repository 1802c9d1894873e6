#!/usr/bin/env bash
# The head's products in bf16 (issue 11, training throughput): the quick recipe's drafter (two
# layers that start as the target's top two, 28-29, taps [1, 27]; AUF, lr 0.002, 2 × 32 anchors,
# 600 steps) trained with `head.precision = "bf16"` against the same drafter trained with the f32
# head (F32: a finished arm of that recipe, e.g. the lever-12 "whole" arm; without it, one is
# trained here with head.precision = "f32"). Both draft over the same draft vocabulary and are
# evaluated in one run. SEEDS="1 2 3" adds a pair per seed (OUT/sN-f32, OUT/sN-bf16), trained
# only, for the held-out figures in their logs. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/bf16 F32=/work/runs/rec/freeze/whole SEEDS="1 2 3" experiments/levers/head_bf16.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
quick_arm_args "$DATA"
common=("${QUICK_ARM[@]}" --set steps=600)
mkdir -p "$OUT"
if [ -n "${F32:-}" ]; then
    f32=$F32
else
    train_arm "$OUT/f32" "$OUT/f32.log" "${common[@]}" --set head.precision=f32
    f32=$OUT/f32/final
fi
train_arm "$OUT/bf16" "$OUT/bf16.log" "${common[@]}" --set head.precision=bf16
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$f32,$OUT/bf16/final" --label f32-head,bf16-head \
    --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"
for seed in ${SEEDS:-}; do
    train_arm "$OUT/s$seed-bf16" "$OUT/s$seed-bf16.log" "${common[@]}" --set seed="$seed" --set head.precision=bf16
    train_arm "$OUT/s$seed-f32" "$OUT/s$seed-f32.log" "${common[@]}" --set seed="$seed" --set head.precision=f32
done

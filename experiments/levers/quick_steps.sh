#!/usr/bin/env bash
# The quick recipe trained longer: with the faster pipeline the quickstart finishes in about 8
# minutes of its 15, so would 1000 steps instead of 600 (the same 313 sequences, the same
# target-initialised drafter, AUF, lr 0.002, 2 × 32 anchors) buy τ? Evaluated in one run beside
# the 600-step arm (WHOLE: a finished 600-step drafter with a draft vocabulary, e.g. the `whole`
# arm of freeze_mlp.sh). Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/steps1000 WHOLE=/work/runs/rec/freeze/whole experiments/levers/quick_steps.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
WHOLE=${WHOLE:?a finished 600-step drafter}
. experiments/levers/lib.sh
quick_arm_args "$DATA"
common=("${QUICK_ARM[@]}" --set steps=1000)
mkdir -p "$OUT"
train_arm "$OUT/s1000" "$OUT/s1000.log" "${common[@]}"
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$WHOLE,$OUT/s1000/final" --label s600,s1000 \
    --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

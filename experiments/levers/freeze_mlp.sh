#!/usr/bin/env bash
# Lever "freeze the copied MLPs" (issue 11): the quick recipe's drafter (two layers that start as
# the target's top two, 28-29, taps [1, 27]) with its MLP weights frozen at the target's
# (`optim.freeze = ["mlp."]`) against the same drafter trained whole. The drafters memorise their
# few hundred sequences (training accuracy at position 1 near 0.75 against 0.29 held out,
# docs/recipe.md), and most of a layer's weights are its MLP: fewer trained weights might
# generalise better. AUF, lr 0.002, 2 × 32 anchors, 600 steps; both draft over the same draft
# vocabulary, evaluated in one run. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/freeze TWO=/work/runs/rec/tinit/top/final experiments/levers/freeze_mlp.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
quick_arm_args "$DATA"
common=("${QUICK_ARM[@]}" --set steps=600)
mkdir -p "$OUT"
if [ -n "${TWO:-}" ]; then
    vocab_copy "$TWO" "$OUT/whole" "$DATA"
    whole=$OUT/whole
else
    train_arm "$OUT/w" "$OUT/w.log" "${common[@]}"
    whole=$OUT/w/final
fi
train_arm "$OUT/frozen" "$OUT/frozen.log" "${common[@]}" --set 'optim.freeze=["mlp."]'
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$whole,$OUT/frozen/final" --label whole,frozen-mlp \
    --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

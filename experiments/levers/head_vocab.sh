#!/usr/bin/env bash
# Lever "the head's vocabulary" (issue 11): the quick recipe's drafter (2 layers, block 8, top
# layers 28-29 copied, taps [1, 27], AUF, lr 0.002, 2 × 32 anchors, 600 steps) trained with its
# cross-entropy over the draft vocabulary (`head.vocab = draft`, DESIGN §7.13: every id of the
# training replies, at least the top 8192) against the whole vocabulary (target_init.sh's top arm
# is that point). Both then draft over the same draft vocabulary (draft_vocab.json of the same
# data), evaluated in one run. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/head_vocab FULL=/work/runs/rec/tinit/top/final experiments/levers/head_vocab.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
quick_arm_args "$DATA"
common=("${QUICK_ARM[@]}" --set steps=600)
mkdir -p "$OUT"
if [ -n "${FULL:-}" ]; then
    vocab_copy "$FULL" "$OUT/full" "$DATA"
    full=$OUT/full
else
    train_arm "$OUT/vfull" "$OUT/vfull.log" "${common[@]}"
    full=$OUT/vfull/final
fi
train_arm "$OUT/vdraft" "$OUT/vdraft.log" "${common[@]}" --set head.vocab=draft
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$full,$OUT/vdraft/final" --label full,draft \
    --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

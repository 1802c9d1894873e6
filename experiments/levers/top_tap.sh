#!/usr/bin/env bash
# Lever 16 (docs/recipe.md): the target's last layer as a third tap. The recipes' drafter reads
# taps [1, 27]: layer 27's output is the input of the target layers 28-29 its own layers start
# as, so the copy starts with exact context. Nothing the drafter reads carries what the target's
# top two layers computed, the states its LM head reads. This arm adds tap 29 (the last layer's
# output, before the final norm): taps [1, 27, 29], `fc` still the identity on the layer-27 tap
# and zero on the others, so it starts as the same function as the two-tap drafter. Otherwise
# the quick recipe's drafter (800-conversation data, 1200 steps, bf16 products, AUF, lr 0.002,
# 2 × 32 anchors), evaluated beside BASE (the two-tap drafter on the same conversations) at
# B = 8, 8 prompts × 96 tokens on each of the six benchmarks. Training takes one thread
# (TRAIN_THREADS), to run beside another job. Resumable.
#   DATA=<prepare --features 1,27,29 of the quick data> BASE=DIR OUT=DIR experiments/levers/top_tap.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data with features of layers 1, 27 and 29}
BASE=${BASE:?the two-tap drafter on the same conversations}
OUT=${OUT:?output folder}
SEED=${SEED:-0}
. experiments/levers/lib.sh
mkdir -p "$OUT"
quick_arm_args "$DATA"
RAYON_NUM_THREADS=${TRAIN_THREADS:-1} train_arm "$OUT/tap29-s$SEED" "$OUT/tap29-s$SEED.log" "${QUICK_ARM[@]}" --set steps=1200 --set head.precision=bf16 \
    --set layer_precision=bf16 --set eval_every=100 --set checkpoint_every=100 --set seed="$SEED" \
    --set "drafter.target_layer_ids=[1,27,29]"
[ -f "$OUT/eval-s$SEED/results.json" ] || env -u RAYON_NUM_THREADS "$BIN" eval --model smollm2 --drafter "$BASE,$OUT/tap29-s$SEED/final" \
    --label two-taps,tap29 --limit 8 --max-new-tokens 96 --block-size 8 --out "$OUT/eval-s$SEED" > "$OUT/eval-s$SEED.log" 2>&1

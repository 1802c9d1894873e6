#!/usr/bin/env bash
# Lever 20 (docs/recipe.md): a block-2 drafter. At the acceptance reached here, `eval` and
# `quickstart` choose B = 2 for the quick recipe's block-4 drafter: one draft a cycle, and only
# position 1 pays. A block-2 drafter is trained for exactly that: a block is the anchor and one
# MASK row, so every drafter row a step is a position-1 example, and a step of 64 anchors costs
# what the recipe's 32 block-4 anchors do. Arms on lever 18's data (OUT/data-mix1500, the quick
# recipe's own), everything else the quick recipe's (2000 steps, bf16 products, layers starting as
# the target's 28-29, taps [1, 27], AUF, lr 0.002, 2 sequences a step):
#   b2a64m  block 2, 64 anchors (the recipe's drafter rows a step);
#   b2a32m  block 2, 32 anchors (the recipe's anchors, half its rows);
# beside lever 18's b4a32m-s* (the quick recipe's drafter). One run per arm and seed in SEEDS
# (default "0"), two at a time with one thread each; per seed one evaluation of the three at
# B = 2 (six benchmarks, 8 prompts × 96 tokens). Resumable.
#   OUT=/work/runs/domain experiments/levers/block2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?output folder with data-mix1500 and b4a32m-s* from small_block.sh}
. experiments/levers/lib.sh
[ -f "$OUT/data-mix1500/manifest.json" ] || { echo "run small_block.sh with OUT=$OUT first" >&2; exit 2; }
run() { # arm seed threads
    local anchors
    case $1 in
        b2a64m) anchors=64 ;;
        b2a32m) anchors=32 ;;
        *) echo "arm $1?" >&2; exit 2 ;;
    esac
    quick_arm_args "$OUT/data-mix1500"
    RAYON_NUM_THREADS=$3 train_arm "$OUT/$1-s$2" "$OUT/$1-s$2.log" "${QUICK_ARM[@]}" --set steps=2000 \
        --set drafter.block_size=2 --set num_anchors=$anchors \
        --set head.precision=bf16 --set layer_precision=bf16 --set eval_every=100 --set checkpoint_every=100 --set seed="$2"
}
SEEDS=${SEEDS:-0}
train_pairs "b2a64m b2a32m"
for seed in $SEEDS; do
    evaluate "block2-b2-s$seed" "$OUT/b4a32m-s$seed/final,$OUT/b2a64m-s$seed/final,$OUT/b2a32m-s$seed/final" \
        b4a32m,b2a64m,b2a32m --block-size 2
done

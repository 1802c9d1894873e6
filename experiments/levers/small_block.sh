#!/usr/bin/env bash
# Lever 18 (docs/recipe.md): a smaller training block with more anchors. The quick recipe's drafter
# is trained at block 8, but position 3 is almost never accepted and the evaluation chooses B = 2
# or 3, so six of a block's eight rows buy nothing at inference. A block of 4 costs half the drafter
# rows per anchor, so twice the anchors fit about the same step: more position-1 examples per
# minute, the position that makes τ here. Arms on lever 15's mix data (OUT/data-mix, the quick
# recipe's own, made by domain.sh), everything else the quick recipe's (1200 steps, bf16 products,
# layers starting as the target's 28-29, taps [1, 27], AUF, lr 0.002, 2 sequences a step):
#   b4a64  block 4, 64 anchors (about the quick step's drafter rows);
#   b4a32  block 4, 32 anchors (the quick step's anchors, half its rows);
# beside lever 15's mix-s* drafters (block 8, 32 anchors). Then what the time saved buys, at
# about the quick step's minutes (2000 block-4 steps cost what 1200 block-8 steps do):
#   b4a32l  block 4, 32 anchors, 2000 steps on the same data;
#   b4a32m  the same on more of it: OUT/data-mix1500, the first 1500 conversations of lever 15's
#           mix.json (its first 980 are data-mix's, whose replies it reuses).
# One run per arm and seed in SEEDS (default "0 1"), two at a time with one thread each; per seed
# one evaluation of the first three at B = 4 (the smaller block's largest) and one at the block
# size each one's measured costs choose, and one of b8a32, b4a32l and b4a32m at the chosen block
# size and at B = 4; six benchmarks, 8 prompts × 96 tokens. Resumable.
#   OUT=/work/runs/domain experiments/levers/small_block.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?output folder with data-mix and mix-s* from domain.sh}
. experiments/levers/lib.sh
[ -f "$OUT/data-mix/manifest.json" ] || { echo "run domain.sh with OUT=$OUT first" >&2; exit 2; }
if [ ! -f "$OUT/data-mix1500/manifest.json" ]; then
    mkdir -p "$OUT/data-mix1500"
    cp "$OUT/data-mix/regenerated.jsonl" "$OUT/data-mix/regenerated.settings.json" "$OUT/data-mix1500/"
    "$BIN" prepare --model smollm2 --data "$OUT/mix.json" --out "$OUT/data-mix1500" --max-conversations 1500 \
        --max-len 320 --regenerate greedy --max-new-tokens 96 --workers 2 --features 1,27 --feature-weights auto \
        > "$OUT/prepare-mix1500.log" 2>&1
fi
run() { # arm seed threads
    local block anchors steps=1200 data=data-mix
    case $1 in
        b4a64) block=4 anchors=64 ;;
        b4a32) block=4 anchors=32 ;;
        b4a32l) block=4 anchors=32 steps=2000 ;;
        b4a32m) block=4 anchors=32 steps=2000 data=data-mix1500 ;;
        *) echo "arm $1?" >&2; exit 2 ;;
    esac
    quick_arm_args "$OUT/$data"
    RAYON_NUM_THREADS=$3 train_arm "$OUT/$1-s$2" "$OUT/$1-s$2.log" "${QUICK_ARM[@]}" --set steps=$steps \
        --set drafter.block_size=$block --set num_anchors=$anchors \
        --set head.precision=bf16 --set layer_precision=bf16 --set eval_every=100 --set checkpoint_every=100 --set seed="$2"
}
SEEDS=${SEEDS:-0 1}
train_pairs "b4a64 b4a32 b4a32l b4a32m"
for seed in $SEEDS; do
    first="$OUT/mix-s$seed/final,$OUT/b4a64-s$seed/final,$OUT/b4a32-s$seed/final"
    longer="$OUT/mix-s$seed/final,$OUT/b4a32l-s$seed/final,$OUT/b4a32m-s$seed/final"
    evaluate "small-b4-s$seed" "$first" b8a32,b4a64,b4a32 --block-size 4
    evaluate "small-auto-s$seed" "$first" b8a32,b4a64,b4a32
    evaluate "small-steps-s$seed" "$longer" b8a32,b4a32l,b4a32m
    evaluate "small-steps-b4-s$seed" "$longer" b8a32,b4a32l,b4a32m --block-size 4
done

#!/usr/bin/env bash
# Levers "learning rate" and "block size" on the target-initialised drafter (issue 11): the
# top-28-29 drafter of experiments/levers/target_init.sh (600 steps × 32 anchors, lr 0.002,
# block 8) against the same at lr 0.001, and the same trained at block 16 (evaluated at B = 16 and,
# cut down, at B = 8); B is fixed in every evaluation. Arms run one after the other with one thread; resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/tinit2 TOP=/work/runs/rec/tinit/top experiments/levers/block_lr.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
TOP=${TOP:?the top-28-29 arm of target_init.sh}
. experiments/levers/lib.sh
common=(--set "data=$DATA" --set objective=auf --set drafter.layers=2 --set "drafter.init_layers_from_target=[28,29]"
        --set "drafter.target_layer_ids=[1,27]" --set batch_sequences=2 --set num_anchors=32
        --set steps=600 --set eval_every=50 --set eval_sequences=12 --set checkpoint_every=50)
arm() { # name block lr
    RAYON_NUM_THREADS=1 train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "drafter.block_size=$2" --set "optim.lr=$3"
}
mkdir -p "$OUT"
arm top-lr1e-3 8 0.001
arm top-b16 16 0.002
# B fixed (no block-size choice): every drafter at B = 8 (the block-16 one cut down), then the
# block-16 one at its full block.
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$TOP/final,$OUT/top-lr1e-3/final,$OUT/top-b16/final" \
    --label top-lr2e-3,top-lr1e-3,top-b16-at-B8 --block-size 8 --limit 4 --max-new-tokens 64 --out "$OUT/eval"
[ -f "$OUT/eval-b16/results.json" ] || "$BIN" eval --model smollm2 --drafter "$OUT/top-b16/final" --label top-b16 \
    --block-size 16 --limit 4 --max-new-tokens 64 --out "$OUT/eval-b16"

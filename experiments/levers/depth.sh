#!/usr/bin/env bash
# Lever "drafter depth" (issue 11): 1 and 3 drafter layers, 600 steps × 32 anchors, otherwise as
# experiments/levers/anchors.sh (whose 32-anchor arm is the 2-layer point), both arms at once with
# one thread each, then both evaluated on the six benchmarks. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/depth experiments/levers/depth.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
common=(--set "data=$DATA" --set objective=auf --set drafter.block_size=8
        --set "drafter.target_layer_ids=[1,27]" --set batch_sequences=2 --set num_anchors=32 --set optim.lr=0.002
        --set steps=600 --set eval_every=50 --set eval_sequences=12 --set checkpoint_every=50)
arm() { # name layers
    RAYON_NUM_THREADS=1 train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "drafter.layers=$2"
}
mkdir -p "$OUT"
arm layers1 1 & p1=$!
arm layers3 3 & p2=$!
wait $p1 $p2
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$OUT/layers1/final,$OUT/layers3/final" --label layers-1,layers-3 \
    --limit 4 --max-new-tokens 64 --out "$OUT/eval"

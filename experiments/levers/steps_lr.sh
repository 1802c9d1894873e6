#!/usr/bin/env bash
# Levers "training length" and "lr" (issue 11): 1500 steps × 32 anchors at lr 0.002 and at lr 0.005,
# otherwise as experiments/levers/anchors.sh, both arms at once with one thread each, then both
# evaluated on the six benchmarks. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/steps experiments/levers/steps_lr.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
common=(--set "data=$DATA" --set objective=auf --set drafter.layers=2 --set drafter.block_size=8
        --set "drafter.target_layer_ids=[1,27]" --set batch_sequences=2 --set num_anchors=32
        --set steps=1500 --set eval_every=100 --set eval_sequences=12 --set checkpoint_every=100)
arm() { # name lr
    RAYON_NUM_THREADS=1 train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "optim.lr=$2"
}
mkdir -p "$OUT"
arm lr2e-3 0.002 & p1=$!
arm lr5e-3 0.005 & p2=$!
wait $p1 $p2
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$OUT/lr2e-3/final,$OUT/lr5e-3/final" --label steps1500-lr2e-3,steps1500-lr5e-3 \
    --limit 4 --max-new-tokens 64 --out "$OUT/eval"

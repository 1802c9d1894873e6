#!/usr/bin/env bash
# Lever "anchors per sequence" (issue 11): the same supervised blocks, spent as 600 steps × 32
# anchors or 150 steps × 128 anchors (one context forward per sequence per step either way), both
# arms trained at once with one thread each; held-out in-block accept length against training
# wall-clock is in each run's metrics.jsonl, and both drafters are then evaluated on the six
# benchmarks. Resumable: a finished arm or evaluation is skipped.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec experiments/levers/anchors.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data: specauf prepare --regenerate greedy --features 1,27 ...}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
common=(--set "data=$DATA" --set objective=auf --set drafter.layers=2 --set drafter.block_size=8
        --set "drafter.target_layer_ids=[1,27]" --set batch_sequences=2 --set optim.lr=0.002
        --set eval_every=50 --set eval_sequences=12 --set checkpoint_every=50)
arm() { # name steps anchors
    RAYON_NUM_THREADS=1 train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "steps=$2" --set "num_anchors=$3"
}
mkdir -p "$OUT"
arm a32 600 32 & p1=$!
arm a128 150 128 & p2=$!
wait $p1 $p2
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$OUT/a32/final,$OUT/a128/final" --label anchors-32,anchors-128 \
    --limit 4 --max-new-tokens 64 --out "$OUT/eval"

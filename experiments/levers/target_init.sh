#!/usr/bin/env bash
# Lever "drafter layers initialised from the target's own layers" (issue 11): two 2-layer drafters
# at the anchors lever's budget (600 steps × 32 anchors, lr 0.002, taps [1, 27]; its a32 arm is
# the random-init point), one copying the target's top layers 28-29 (fc = identity on the layer-27
# tap, the input those layers see in the target; final norm = the target's), one copying the
# bottom layers 0-1 (whose input, token embeddings, is what the drafter's block feeds them). Both
# arms at once with one thread each, then both evaluated on the six benchmarks. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/tinit experiments/levers/target_init.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
STEPS=${STEPS:-600}
common=(--set "data=$DATA" --set objective=auf --set drafter.block_size=8 --set drafter.layers=2
        --set "drafter.target_layer_ids=[1,27]" --set batch_sequences=2 --set num_anchors=32 --set optim.lr=0.002
        --set "steps=$STEPS" --set eval_every=50 --set eval_sequences=12 --set checkpoint_every=50)
arm() { # name from-layers
    RAYON_NUM_THREADS=1 train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "drafter.init_layers_from_target=$2"
}
mkdir -p "$OUT"
arm top '[28,29]' & p1=$!
arm bottom '[0,1]' & p2=$!
wait $p1 $p2
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$OUT/top/final,$OUT/bottom/final" --label tinit-top,tinit-bottom \
    --limit 4 --max-new-tokens 64 --out "$OUT/eval"

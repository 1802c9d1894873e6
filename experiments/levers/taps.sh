#!/usr/bin/env bash
# Lever "number of target taps, 2 vs 5" (issue 11), at the quick recipe's budget: a 2-layer,
# block-8 drafter starting from the target's top layers 28-29 (fc = identity on the layer-27 tap),
# AUF, 600 steps × 2 sequences × 32 anchors, lr 0.002, tapping [1, 27] (the recipes' choice) or
# [1, 8, 14, 20, 27] (five taps spread over the 30 layers, as DFlash spreads them). Same
# conversations and held-out split; the 5-tap data is the same prepare with more feature layers.
# The arms train one after the other on all cores, then both are evaluated in one run. Resumable.
#   DATA2=/work/runs/rec/data OUT=/work/runs/rec/taps experiments/levers/taps.sh
# TAPS2=DIR reuses an already trained 2-tap arm of this budget (e.g. target_init.sh's top arm).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA2=${DATA2:?prepared data with features 1,27}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
mkdir -p "$OUT"
STEPS=${STEPS:-600}
DATA5=${DATA5:-$OUT/data5}
if [ ! -f "$DATA5/manifest.json" ]; then
    "$BIN" prepare --model smollm2 --data sharegpt --out "$DATA5" --max-conversations 400 --max-len 320 \
        --regenerate greedy --max-new-tokens 96 --features 1,8,14,20,27 --feature-weights q8 > "$OUT/prepare5.log" 2>&1
fi
common=(--set objective=auf --set drafter.block_size=8 --set drafter.layers=2 --set batch_sequences=2
        --set num_anchors=32 --set optim.lr=0.002 --set "steps=$STEPS" --set eval_every=50 --set eval_sequences=12
        --set checkpoint_every=50 --set "drafter.init_layers_from_target=[28,29]")
arm() { # name data taps
    train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "data=$2" --set "drafter.target_layer_ids=$3"
}
if [ -n "${TAPS2:-}" ]; then two=$TAPS2; else arm taps2 "$DATA2" '[1,27]'; two=$OUT/taps2/final; fi
arm taps5 "$DATA5" '[1,8,14,20,27]'
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$two,$OUT/taps5/final" --label taps2,taps5 \
    --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

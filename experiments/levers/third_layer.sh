#!/usr/bin/env bash
# Lever "a third copied layer" (issue 11): the quick recipe's drafter with three layers that start
# as the target's top three (27-29) against two that start as 28-29 (the recipes' choice;
# target_init.sh's top arm is that point). Each taps layer 1 and the layer right below its first
# copied layer (26 for three, 27 for two), so `fc` starts as the identity on that tap and the
# copied layers start from the context the target gives them; the data caches taps [1, 27], so
# the three-layer arm computes its layer-26 features online (slower steps, the same values).
# AUF, lr 0.002, 2 × 32 anchors, 600 steps. Both draft over the same draft vocabulary,
# evaluated in one run. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/third TWO=/work/runs/rec/tinit/top/final experiments/levers/third_layer.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
common=(--set "data=$DATA" --set objective=auf --set drafter.block_size=8 --set num_anchors=32 --set optim.lr=0.002 --set eval_sequences=12
        --set batch_sequences=2 --set steps=600 --set eval_every=50 --set checkpoint_every=50)
mkdir -p "$OUT"
if [ -n "${TWO:-}" ]; then
    vocab_copy "$TWO" "$OUT/two" "$DATA"
    two=$OUT/two
else
    train_arm "$OUT/l2" "$OUT/l2.log" "${common[@]}" --set drafter.layers=2 --set "drafter.target_layer_ids=[1,27]" --set "drafter.init_layers_from_target=[28,29]"
    two=$OUT/l2/final
fi
train_arm "$OUT/l3" "$OUT/l3.log" "${common[@]}" --set drafter.layers=3 --set "drafter.target_layer_ids=[1,26]" --set "drafter.init_layers_from_target=[27,28,29]"
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$two,$OUT/l3/final" --label top2,top3 \
    --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

#!/usr/bin/env bash
# Lever 17 (docs/recipe.md): weight decay against the memorisation the training metrics show
# (position-1 accuracy 0.7-0.8 on training batches against about 0.3 held out). The quick
# recipe's drafter (800-conversation data, 1200 steps, bf16 products, two layers that start as
# the target's 28-29, taps [1, 27], AUF, lr 0.002, 2 × 32 anchors) with AdamW's decoupled decay
# at each value in DECAYS (default "0.1 0.5"; the recipes use 0), every tensor decayed. Two runs
# at a time with one thread each, then one evaluation beside BASE (the same drafter without
# decay) at B = 8, 8 prompts × 96 tokens on each of the six benchmarks. Resumable.
#   DATA=<the quick data> BASE=DIR OUT=DIR experiments/levers/weight_decay.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?the prepared data of the quick recipe}
BASE=${BASE:?the same drafter trained without weight decay}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
mkdir -p "$OUT"
quick_arm_args "$DATA"
pids=()
for wd in ${DECAYS:-0.1 0.5}; do
    RAYON_NUM_THREADS=1 train_arm "$OUT/wd$wd" "$OUT/wd$wd.log" "${QUICK_ARM[@]}" --set steps=1200 --set head.precision=bf16 \
        --set layer_precision=bf16 --set eval_every=100 --set checkpoint_every=100 --set optim.weight_decay="$wd" & pids+=($!)
done
wait "${pids[@]}"
drafters=$BASE labels=wd0
for wd in ${DECAYS:-0.1 0.5}; do drafters+=",$OUT/wd$wd/final"; labels+=",wd$wd"; done
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$drafters" --label "$labels" --limit 8 \
    --max-new-tokens 96 --block-size 8 --out "$OUT/eval" > "$OUT/eval.log" 2>&1

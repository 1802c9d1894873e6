#!/usr/bin/env bash
# Lever "sequences per step" (issue 11), at equal supervision and equal training time: the quick
# recipe's drafter (2 layers, block 8, top layers 28-29 copied, taps [1, 27], AUF, lr 0.002,
# 32 anchors) trained with 1 sequence per step for 1200 steps against 2 per step for 600 (the
# recipes' choice; target_init.sh's top arm is that point). Since optimizer steps, not
# supervision per step, broke the plateau in the anchors lever, this asks whether smaller batches
# and more steps buy more in the same minutes. Both evaluated in one run. Resumable.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/batch BATCH2=/work/runs/rec/tinit/top/final experiments/levers/batch.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
common=(--set "data=$DATA" --set objective=auf --set drafter.block_size=8 --set drafter.layers=2
        --set "drafter.target_layer_ids=[1,27]" --set num_anchors=32 --set optim.lr=0.002 --set eval_sequences=12
        --set "drafter.init_layers_from_target=[28,29]")
arm() { # name sequences-per-step steps eval-every
    train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "batch_sequences=$2" --set "steps=$3" --set "eval_every=$4" --set "checkpoint_every=$4"
}
mkdir -p "$OUT"
if [ -n "${BATCH2:-}" ]; then two=$BATCH2; else arm b2 2 600 50; two=$OUT/b2/final; fi
arm b1 1 1200 100
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$two,$OUT/b1/final" --label b2x600,b1x1200 \
    --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

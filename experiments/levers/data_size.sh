#!/usr/bin/env bash
# Lever "more regenerated data" (issue 11). The drafters of the quick and cpu-60min recipes
# overfit: at the end of cpu-60min (811 sequences, 1500 steps ≈ 3.7 epochs) the training accept
# length is 1.93 against 1.40 held out, and the held-out curve is flat. This runs the same two
# budgets on more conversations:
#   - q1000: the quick recipe's 600 steps on 1000 conversations (DATA1000, e.g. the cpu-60min data)
#     instead of 400;
#   - c3000: the cpu-60min recipe's 1500 steps on 3000 conversations instead of 1000;
# and evaluates them beside the recipes' own drafters (QUICK, CPU60) at B = 8, 8 prompts per
# benchmark, 96 new tokens. Resumable.
#   OUT=/work/runs/data3k DATA1000=/work/runs/big/data QUICK=/work/runs/distill/hard/final \
#   CPU60=/work/runs/cpu60/drafter experiments/levers/data_size.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?output folder}
DATA1000=${DATA1000:?1000-conversation data}
QUICK=${QUICK:?the quick recipe drafter}
CPU60=${CPU60:?the cpu-60min recipe drafter}
. experiments/levers/lib.sh
mkdir -p "$OUT"
if [ ! -f "$OUT/data/manifest.json" ]; then
    "$BIN" prepare --model smollm2 --data sharegpt --max-conversations 3000 --max-len 320 --max-turns 1 \
        --regenerate greedy --max-new-tokens 96 --workers 2 --weights q8 \
        --features 1,27 --feature-dtype f16 --feature-weights q8 --out "$OUT/data" > "$OUT/prepare.log" 2>&1
fi
common=(--set objective=auf --set drafter.block_size=8 --set drafter.layers=2
        --set "drafter.target_layer_ids=[1,27]" --set "drafter.init_layers_from_target=[28,29]"
        --set batch_sequences=2 --set num_anchors=32 --set optim.lr=0.002
        --set eval_every=50 --set eval_sequences=12 --set checkpoint_every=50)
arm() { # name data steps
    train_arm "$OUT/$1" "$OUT/$1.log" "${common[@]}" --set "data=$2" --set "steps=$3"
}
arm q1000 "$DATA1000" 600
arm c3000 "$OUT/data" 1500
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$QUICK,$OUT/q1000/final,$CPU60,$OUT/c3000/final" \
    --label quick-400,quick-1000,cpu60-1000,cpu60-3000 --block-size 8 --limit 8 --max-new-tokens 96 --out "$OUT/eval"

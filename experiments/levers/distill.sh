#!/usr/bin/env bash
# Lever "distillation from the target's distribution" (issue 11): the quick recipe's data
# (400 ShareGPT conversations, greedy regeneration, taps [1, 27], q8 features) prepared again with
# the target's top-32 next-token logits beside the features, then the quick recipe's drafter
# (2 layers from target layers 28-29, AUF, 600 steps × 2 sequences × 32 anchors, lr 0.002)
# trained with hard labels only and with distill.weight 0.5 and 1.0 (one thread each, side by
# side, on the same prepared data). All arms evaluated at B = 8 on the six benchmarks. Resumable.
#   OUT=/work/runs/distill experiments/levers/distill.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
STEPS=${STEPS:-600}
mkdir -p "$OUT"
if [ ! -f "$OUT/data/manifest.json" ]; then
    "$BIN" prepare --model smollm2 --data sharegpt --max-conversations 400 --max-len 320 --max-turns 1 \
        --regenerate greedy --max-new-tokens 96 --workers 2 --weights q8 \
        --features 1,27 --feature-dtype f16 --feature-weights q8 --soft-labels 32 --out "$OUT/data" > "$OUT/prepare.log" 2>&1
fi
common=(--set "data=$OUT/data" --set objective=auf --set drafter.block_size=8 --set drafter.layers=2
        --set "drafter.target_layer_ids=[1,27]" --set "drafter.init_layers_from_target=[28,29]"
        --set batch_sequences=2 --set num_anchors=32 --set optim.lr=0.002
        --set "steps=$STEPS" --set eval_every=50 --set eval_sequences=12 --set checkpoint_every=50)
arm() { # name [--set distill.weight=W]
    local name=$1; shift
    RAYON_NUM_THREADS=1 train_arm "$OUT/$name" "$OUT/$name.log" "${common[@]}" "$@"
}
arm hard & p1=$!
arm soft05 --set distill.weight=0.5 & p2=$!
wait $p1 $p2
arm soft10 --set distill.weight=1.0
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$OUT/hard/final,$OUT/soft05/final,$OUT/soft10/final" \
    --label hard,distill-0.5,distill-1.0 --block-size 8 --limit 4 --max-new-tokens 64 --out "$OUT/eval"

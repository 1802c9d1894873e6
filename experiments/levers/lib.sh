# Shared by the lever scripts, which source it after `cd` to the repository root.
# BIN: the specauf binary (default: the release build).
BIN=${BIN:-target/release/specauf}

# train_arm DIR LOG [train arguments...]: trains one arm into DIR, its output in LOG. Does nothing
# when DIR already holds a finished drafter, and resumes a run that was stopped (a lever script
# can be started again after an interruption and picks up where it was).
train_arm() {
    local dir=$1 log=$2
    shift 2
    [ -f "$dir/final/model.safetensors" ] && return 0
    local resume=()
    [ -f "$dir/config.json" ] && resume=(--resume)
    "$BIN" train "$@" --set "out=$dir" "${resume[@]}" > "$log" 2>&1
}

# vocab_copy SRC DST DATA: makes DST a copy of the finished drafter SRC with the draft vocabulary
# of DATA (a baseline arm trained before draft vocabularies existed has none), so that both arms of
# a comparison draft over the same vocabulary. Does nothing when DST is complete.
vocab_copy() {
    local src=$1 dst=$2 data=$3
    [ -f "$dst/model.safetensors" ] || { rm -rf "$dst"; cp -r "$src" "$dst"; }
    [ -f "$dst/draft_vocab.json" ] || "$BIN" draft-vocab --data "$data" --drafter "$dst" > /dev/null
}

# quick_arm_args DATA: sets QUICK_ARM to the train arguments of the quick recipe's drafter as the
# lever scripts train it (AUF, B = 8, two layers starting as the target's 28-29, taps [1, 27],
# 2 × 32 anchors, lr 0.002, held-out metrics every 50 steps), all but the step count.
quick_arm_args() {
    QUICK_ARM=(--set "data=$1" --set objective=auf --set drafter.block_size=8 --set drafter.layers=2
               --set "drafter.target_layer_ids=[1,27]" --set "drafter.init_layers_from_target=[28,29]"
               --set num_anchors=32 --set batch_sequences=2 --set optim.lr=0.002 --set eval_sequences=12
               --set eval_every=50 --set checkpoint_every=50)
}

# train_pairs "ARM ...": for each seed in SEEDS and each ARM whose OUT/ARM-sSEED holds no finished
# drafter, calls the script's own `run ARM SEED THREADS`, two runs at a time with one thread each
# (a last one alone with two): two one-thread trainings use the 2 cores better than one
# two-thread one.
train_pairs() {
    local jobs=() seed arm i p1
    for seed in $SEEDS; do
        for arm in $1; do
            [ -f "$OUT/$arm-s$seed/final/model.safetensors" ] || jobs+=("$arm $seed")
        done
    done
    for ((i = 0; i < ${#jobs[@]}; i += 2)); do
        # shellcheck disable=SC2086
        if [ $((i + 1)) -lt ${#jobs[@]} ]; then
            run ${jobs[i]} 1 & p1=$!
            run ${jobs[i + 1]} 1
            wait $p1
        else
            run ${jobs[i]} 2
        fi
    done
}

# evaluate NAME DRAFTERS LABELS [eval arguments...]: one evaluation of the comma-separated drafters
# on the six benchmarks (8 prompts × 96 tokens) into OUT/NAME, its output in OUT/NAME.log; skipped
# once OUT/NAME holds results.
evaluate() {
    local name=$1 drafters=$2 labels=$3
    shift 3
    [ -f "$OUT/$name/results.json" ] || "$BIN" eval --model smollm2 --drafter "$drafters" --label "$labels" \
        --limit 8 --max-new-tokens 96 "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}

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

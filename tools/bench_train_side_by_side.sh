#!/usr/bin/env bash
# specauf's training step next to the PyTorch-eager peer (tools/bench_train_torch.py), at the same
# shape and thread count, alternating ROUNDS times on the same machine so that both see the same
# load; prints every round and the median ratio. A benchmark, not a test: CI never runs it.
#
#   tools/bench_train_side_by_side.sh                 # decay, 3 rounds of 5 steps each
#   OBJECTIVE=auf ROUNDS=5 tools/bench_train_side_by_side.sh
#   HEAD_VOCAB=draft tools/bench_train_side_by_side.sh   # both heads over 8192 rows (head.vocab = draft)
#   HEAD_PRECISION=bf16 tools/bench_train_side_by_side.sh   # both heads' products in bf16 (ours:
#       head.precision = bf16; PyTorch: the head under CPU autocast); PEER_HEAD_PRECISION=f32 keeps
#       the peer in f32
#   LAYER_PRECISION=bf16 tools/bench_train_side_by_side.sh   # the drafter layers' linears in bf16 too
#       (ours: layer_precision = bf16; PyTorch: its forward under CPU autocast); PEER_LAYER_PRECISION=f32
#       keeps the peer's layers in f32
#
# The peer runs in a venv this script creates on first use (VENV, default tools/.venv-torch; torch
# from PyPI, about 3 GiB with its CUDA libraries, used on CPU here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-5}
THREADS=${THREADS:-2}
OBJECTIVE=${OBJECTIVE:-decay}
case "$OBJECTIVE" in decay|auf) ;; *) echo "OBJECTIVE is decay or auf (the peer implements those two)" >&2; exit 2 ;; esac
HEAD_VOCAB=${HEAD_VOCAB:-full}
HEAD_PRECISION=${HEAD_PRECISION:-f32}
PEER_HEAD_PRECISION=${PEER_HEAD_PRECISION:-$HEAD_PRECISION}
case "$PEER_HEAD_PRECISION" in f32) PEER_BF16=() ;; bf16) PEER_BF16=(--head-bf16) ;; *) echo "PEER_HEAD_PRECISION is f32 or bf16" >&2; exit 2 ;; esac
LAYER_PRECISION=${LAYER_PRECISION:-f32}
PEER_LAYER_PRECISION=${PEER_LAYER_PRECISION:-$LAYER_PRECISION}
case "$PEER_LAYER_PRECISION" in f32) ;; bf16) PEER_BF16+=(--layers-bf16) ;; *) echo "PEER_LAYER_PRECISION is f32 or bf16" >&2; exit 2 ;; esac
case "$HEAD_VOCAB" in full) TORCH_ROWS=0 ;; draft) TORCH_ROWS=8192 ;; *) echo "HEAD_VOCAB is full or draft" >&2; exit 2 ;; esac
VENV=${VENV:-tools/.venv-torch}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "creating $VENV with torch (first use only)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch numpy
fi
cargo build --release -q
ours=(); theirs=()
for r in $(seq 1 "$ROUNDS"); do
    line=$(RAYON_NUM_THREADS=$THREADS target/release/specauf bench train --objectives "$OBJECTIVE" --runs "$RUNS" --head-vocab "$HEAD_VOCAB" --head-precision "$HEAD_PRECISION" --layer-precision "$LAYER_PRECISION" 2>/dev/null | grep "^| $OBJECTIVE |")
    o=$(echo "$line" | awk -F'|' '{gsub(/ /,"",$4); print $4}')
    o_ms=$(echo "$line" | awk -F'|' '{gsub(/ /,"",$3); print $3}')
    o_rss=$(echo "$line" | awk -F'|' '{gsub(/ /,"",$10); print $10}')
    j=$("$VENV/bin/python" tools/bench_train_torch.py --runs "$RUNS" --threads "$THREADS" --head-vocab "$TORCH_ROWS" --objective "$OBJECTIVE" "${PEER_BF16[@]}")
    t=$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["supervised_tokens_per_s"])')
    t_ms=$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["step_ms"])')
    t_rss=$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_rss_mib"])')
    echo "round $r: specauf $OBJECTIVE (head $HEAD_PRECISION, layers $LAYER_PRECISION) ${o_ms} ms/step ${o} tok/s ${o_rss} MiB | pytorch $OBJECTIVE (head $PEER_HEAD_PRECISION, layers $PEER_LAYER_PRECISION) ${t_ms} ms/step ${t} tok/s ${t_rss} MiB | ratio $(python3 -c "print(round($o/$t, 2))")"
    ours+=("$o"); theirs+=("$t")
done
python3 - "${ours[*]}" "${theirs[*]}" <<'PY'
import statistics, sys
o = [float(x) for x in sys.argv[1].split()]
t = [float(x) for x in sys.argv[2].split()]
r = [a / b for a, b in zip(o, t)]
print(f"median supervised tokens/s: specauf {statistics.median(o):.0f}, pytorch {statistics.median(t):.0f}; median ratio {statistics.median(r):.2f}x")
PY

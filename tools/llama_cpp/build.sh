#!/usr/bin/env bash
# Build llama.cpp (the peer for `specauf bench spec`) from the llama.cpp vendored in the
# llama-cpp-python==0.3.36 sdist on PyPI (llama.cpp 0c1e570, which has `--spec-type draft-dflash`).
#
#   tools/llama_cpp/build.sh OUT_DIR        # e.g. tools/llama_cpp/build.sh /work/peer/llama.cpp
#
# Writes OUT_DIR/src (the unpacked llama.cpp tree, with convert_hf_to_gguf.py and gguf-py),
# OUT_DIR/build (the CMake build) and OUT_DIR/bin (the binaries `specauf bench spec --llama-cpp`
# wants: llama-bench, llama-server, llama-speculative-simple, llama-simple, llama-cli).
# cmake and ninja come from PyPI into a venv (VENV, default tools/.venv-llama). The build is
# CPU-only with AVX-512/VNNI/BF16 on and every AMX path off (AMX is advertised on the project
# machine but traps with SIGILL); GGML_NATIVE is off so the flags are exactly these. On a CPU
# without AVX-512 VNNI and BF16 (ISA=avx2, chosen from /proc/cpuinfo unless set) the AVX-512
# flags are off and the build is AVX2 + FMA + F16C, what specauf's own AVX2 kernel uses.
# Takes about 15 minutes on 2 cores; run it under `nice -n 10` on a shared machine.
set -euo pipefail

OUT=${1:?usage: build.sh OUT_DIR}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-$HERE/../.venv-llama}
JOBS=${JOBS:-2}
TARGETS=${TARGETS:-llama-bench llama-server llama-speculative-simple llama-simple llama-cli}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[build] creating venv $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade cmake ninja
export PATH="$VENV/bin:$PATH"

if [ ! -f "$OUT/src/CMakeLists.txt" ]; then
    DL="$OUT/download"
    mkdir -p "$DL"
    tarball=$(ls "$DL"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
    if [ -z "$tarball" ]; then
        echo "[build] downloading llama-cpp-python==$VERSION sdist"
        # pip may fail after the download while preparing metadata; the tarball is what we want.
        "$VENV/bin/pip" download --no-deps --no-binary llama-cpp-python \
            -d "$DL" "llama-cpp-python==$VERSION" || true
        tarball=$(ls "$DL"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
        [ -n "$tarball" ] || { echo "[build] error: sdist not downloaded into $DL" >&2; exit 1; }
    fi
    echo "[build] unpacking $tarball"
    tmp="$OUT/unpack.tmp"
    rm -rf "$tmp"; mkdir -p "$tmp"
    tar -xzf "$tarball" -C "$tmp"
    rm -rf "$OUT/src"
    mv "$tmp"/llama_cpp_python-"$VERSION"/vendor/llama.cpp "$OUT/src"
    rm -rf "$tmp"
fi

if [ -z "${ISA:-}" ]; then
    if grep -qw avx512_vnni /proc/cpuinfo && grep -qw avx512_bf16 /proc/cpuinfo; then ISA=avx512; else ISA=avx2; fi
fi
case "$ISA" in
    avx512) AVX512=ON ;;
    avx2) AVX512=OFF ;;
    *) echo "[build] error: ISA must be avx512 or avx2, not $ISA" >&2; exit 1 ;;
esac
echo "[build] configuring ($ISA)"
cmake -S "$OUT/src" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=$AVX512 -DGGML_AVX512_VBMI=$AVX512 -DGGML_AVX512_VNNI=$AVX512 -DGGML_AVX512_BF16=$AVX512 \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF

echo "[build] building $TARGETS with $JOBS jobs"
start=$(date +%s)
# shellcheck disable=SC2086
ninja -C "$OUT/build" -j "$JOBS" $TARGETS
echo "[build] built in $(( $(date +%s) - start )) s"

mkdir -p "$OUT/bin"
for t in $TARGETS; do
    cp -f "$OUT/build/bin/$t" "$OUT/bin/$t"
done
# Shared libraries, if the build produced any (BUILD_SHARED_LIBS defaults to on).
find "$OUT/build/bin" -maxdepth 1 -name '*.so*' -exec cp -f {} "$OUT/bin/" \;
echo "[build] done: $OUT/bin"
ls -l "$OUT/bin"

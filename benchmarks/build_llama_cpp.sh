#!/usr/bin/env bash
# llama.cpp's own binaries (llama-server, llama-bench, llama-batched-bench, llama-quantize,
# llama-perplexity): the peer semline's benchmarks compare against, built from the llama.cpp
# sources that the llama-cpp-python sdist vendors (PyPI is the one source this needs). Prints
# the binaries' folder.
#
#   benchmarks/build_llama_cpp.sh [native|noamx]     (default: $SEMLINE_LLAMA_BUILD, else native,
#                                                     or noamx on a CPU that lists AMX)
#
# native: -DGGML_NATIVE=ON, every instruction this CPU has. noamx: the AVX2/AVX-512 kernels with
# the AMX ones off (a native build on a VM whose CPU lists AMX but whose kernel refuses its
# tiles died with SIGILL in prompt processing); on an AVX2-only CPU it builds AVX2 alone.
# About 6 minutes on 2 cores, once: the build is kept under $SEMLINE_CACHE/llama.cpp.
set -euo pipefail
VERSION=0.3.36
CACHE="${SEMLINE_CACHE:-$HOME/.cache/semline}/llama.cpp"
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
kind="${1:-${SEMLINE_LLAMA_BUILD:-$(has amx_tile && echo noamx || echo native)}}"
out="$CACHE/build-$kind"
binaries=(llama-server llama-bench llama-batched-bench llama-quantize llama-perplexity)
built=1
for binary in "${binaries[@]}"; do [[ -x "$out/bin/$binary" ]] || built=0; done
if (( built )); then
  echo "$out/bin"
  exit 0
fi
mkdir -p "$CACHE"
src="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
  pip=$(dirname "$0")/../.venv/bin/pip
  [[ -x "$pip" ]] || pip=pip
  "$pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist" >&2
  tar xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
common=(-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release)
case "$kind" in
  native) options=(-DGGML_NATIVE=ON) ;;
  noamx)
    options=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
             -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    if has avx512f; then
      options+=(-DGGML_AVX512=ON)
      has avx512_vbmi && options+=(-DGGML_AVX512_VBMI=ON)
      has avx512_vnni && options+=(-DGGML_AVX512_VNNI=ON)
      has avx512_bf16 && options+=(-DGGML_AVX512_BF16=ON)
    fi
    has avx_vnni && options+=(-DGGML_AVX_VNNI=ON)
    ;;
  *) echo "usage: $0 [native|noamx]" >&2; exit 2 ;;
esac
cmake -S "$src" -B "$out" "${common[@]}" "${options[@]}" >&2
cmake --build "$out" --target "${binaries[@]}" -j "$(nproc)" >&2
echo "$out/bin"

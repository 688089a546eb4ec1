#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI, with `make setup` done) before lending a GPU
# machine to benchmarks/gpu_check.sh. Fills .gpu/ (git-ignored) with what a bare GPU
# machine lacks: Python 3.12 wheels of the packages its image does not hold, the
# embedded model's GGUF file cut in two (one call of the device tool carries at most
# 64 MiB), and the commit being checked.
#
#   benchmarks/gpu_prepare.sh
#   device run 1: carry [".gpu/model.1"],  command: benchmarks/gpu_check.sh stage
#   device run 2: carry [".gpu/whl", ".gpu/model.2", ".gpu/commit"],
#                 command: benchmarks/gpu_check.sh          (within ~30 s of run 1,
#                 while the machine is still warm; results come back from $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl
# Not in the GPU image (its list: the device tool's KINDS.md); versions as in .venv here.
PACKAGES=(gguf xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection
          jsonschema jsonschema-specifications referencing rpds-py)
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$($PY -m pip show "$name" | sed -n 's/^Version: //p')")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .gpu/whl "${pins[@]}"
gguf_file=$($PY -c "from engine.loader import embedded_gguf_path; print(embedded_gguf_path())")
head -c 56M "$gguf_file" > .gpu/model.1
tail -c +$((56 * 1024 * 1024 + 1)) "$gguf_file" > .gpu/model.2
sha256sum "$gguf_file" | cut -d' ' -f1 > .gpu/model.sha256
cp .gpu/model.sha256 .gpu/whl/  # travels with the second run
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)" > .gpu/commit
du -sh .gpu/model.1 && du -ch .gpu/whl .gpu/model.2 | tail -1

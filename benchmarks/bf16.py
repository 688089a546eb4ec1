"""bfloat16 against float32 on the CPU, and against Hugging Face generate in bf16, in one run.

Workload: benchmarks/throughput.py's (32 requests, prompts 16-512 tokens, outputs
32-512 tokens, greedy, EOS ignored), all submitted at once to the engine in
float32 and in bfloat16, and run by HF generate in bf16 as one static batch.
Also the engine's perplexity of tests/data/public_domain.txt in both dtypes.
Targets (issue 6): bf16 >= 2x fp32 engine throughput at 32 running requests and
>= 1.5x HF bf16 static batching, perplexity within 1 %. The 2x assumes bf16
matrix instructions (AVX512-BF16 / AMX); `cpu_native_bf16` in the result says
whether this CPU has them. Writes benchmarks/results/bf16.json.

    .venv/bin/python benchmarks/bf16.py [--num-requests 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info  # noqa: E402
from throughput import make_workload, run_hf_static, run_semline  # noqa: E402

from engine import LLM  # noqa: E402
from engine.config import cpu_has_native_bf16  # noqa: E402
from engine.loader import hf_folder  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent.parent / "tests" / "data" / "public_domain.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {}
    perplexity = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(device="cpu", dtype=dtype, quantization="none", max_num_seqs=args.num_requests)
        workload = make_workload(llm.tokenizer, args.num_requests)
        results[f"semline_{dtype}"] = run_semline(llm, workload)
        ids = llm.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
        logprobs = llm.engine.score(ids, chunk_size=64)
        perplexity[dtype] = math.exp(-sum(logprobs) / len(logprobs))
        model_dir = hf_folder(llm.config.model, llm.config.resolve_cache_dir())
        del llm
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    results["hf_static_batch_bfloat16"] = run_hf_static(model, workload, 0)
    rate = {name: r["output_tokens_per_s"] for name, r in results.items()}
    result = {
        "benchmark": "bf16",
        "machine": {**machine_info(), "threads": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16()},
        "workload": {"num_requests": args.num_requests, "source": "benchmarks/throughput.py"},
        "runs": results,
        "perplexity": {k: round(v, 3) for k, v in perplexity.items()},
        "perplexity_relative_change": round((perplexity["bfloat16"] - perplexity["float32"]) / perplexity["float32"], 4),
        "ratios": {"bf16_vs_fp32": round(rate["semline_bfloat16"] / rate["semline_float32"], 3),
                   "bf16_vs_hf_bf16_static": round(rate["semline_bfloat16"] / rate["hf_static_batch_bfloat16"], 3)},
    }
    result["targets"] = {"bf16_2x_fp32": result["ratios"]["bf16_vs_fp32"] >= 2.0,
                         "bf16_1_5x_hf_bf16": result["ratios"]["bf16_vs_hf_bf16_static"] >= 1.5,
                         "perplexity_within_1pct": abs(result["perplexity_relative_change"]) < 0.01}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bf16.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Multi-LoRA: the throughput workload with adapters mixed across requests, against the base alone.

Three runs of benchmarks/throughput.py's workload (32 requests, prompts 16-512 tokens,
outputs 32-512, greedy), in one process, same dtype and threads:

1. the base model in an engine without LoRA (the baseline);
2. the base model in an engine with LoRA enabled and no adapter used (the wrappers' cost);
3. every request served by one of 4 adapters (rank 16 on every projection, random weights
   built here with peft), round robin, all 4 resident (max_loras 4): rows of 4 adapters in
   every step.

Also: how long an adapter takes to load (read and parse the PEFT folder) and to put into a
slot. Target: run 3 at >= 0.75x run 1's tokens/s. Writes benchmarks/results/lora.json.

    .venv/bin/python benchmarks/lora.py [--dtype auto] [--rank 16] [--num-adapters 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.throughput import make_workload  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.loader import hf_folder  # noqa: E402
from engine.lora import load_adapter  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapters(model_dir: Path, folder: Path, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        paths.append(folder / f"adapter{i}")
        model.save_pretrained(paths[-1])
    return paths


def run(llm: LLM, workload, loras: list[str | None]) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True) for _, mt in workload]
    start = time.perf_counter()
    outputs = llm.generate([ids for ids, _ in workload], params, lora=loras)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"output_tokens": tokens, "seconds": round(elapsed, 2), "tokens_per_second": round(tokens / elapsed, 1),
            "ttft_p50_s": round(statistics.median(o.metrics.time_to_first_token for o in outputs), 3),
            "tpot_p50_ms": round(1000 * statistics.median(o.metrics.time_per_output_token for o in outputs), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    config = {"dtype": args.dtype, "quantization": "none", "num_threads": args.threads, "kv_cache_memory_gb": 1.0}

    base = LLM(**config)
    workload = make_workload(base.tokenizer, args.num_requests)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_adapters(hf_folder(None, base.config.resolve_cache_dir()), Path(tmp), args.num_adapters, args.rank)
        load_s = []
        for i, path in enumerate(paths):
            start = time.perf_counter()
            load_adapter(f"a{i}", path, args.rank)
            load_s.append(time.perf_counter() - start)
        lora = LLM(**config, max_loras=args.num_adapters, max_lora_rank=args.rank,
                   lora_modules={f"a{i}": str(p) for i, p in enumerate(paths)})
        slot_s = []
        for i in range(args.num_adapters):  # put each into a slot (what the first request pays)
            adapter = load_adapter(f"a{i}", paths[i], args.rank)
            start = time.perf_counter()
            lora.engine.runner.set_lora(args.num_adapters - 1, adapter)
            slot_s.append(time.perf_counter() - start)
        lora.engine.runner.set_lora(args.num_adapters - 1, None)
        names = [f"a{i % args.num_adapters}" for i in range(len(workload))]
        run(base, workload[:4], [None] * 4)  # warm-up: kernels and caches
        run(lora, workload[:4], names[:4])
        results = {
            "base": run(base, workload, [None] * len(workload)),
            "lora_engine_base_only": run(lora, workload, [None] * len(workload)),
            "adapters_mixed": run(lora, workload, names),
        }
    ratio = results["adapters_mixed"]["tokens_per_second"] / results["base"]["tokens_per_second"]
    report = {
        "benchmark": "lora", "machine": machine_info(), "dtype": str(base.engine.dtype).removeprefix("torch."),
        "rank": args.rank, "num_adapters": args.num_adapters, "num_requests": len(workload),
        "targets": TARGETS, "results": results,
        "mixed_over_base": round(ratio, 3), "target_mixed_over_base": 0.75, "target_met": ratio >= 0.75,
        "adapter_load_ms": round(1000 * statistics.median(load_s), 1),
        "adapter_to_slot_ms": round(1000 * statistics.median(slot_s), 1),
    }
    print(f"{'run':28s} {'tok/s':>8s} {'TTFT p50':>9s} {'TPOT p50':>9s}")
    for name, r in results.items():
        print(f"{name:28s} {r['tokens_per_second']:8.1f} {r['ttft_p50_s']:8.3f}s {r['tpot_p50_ms']:7.2f}ms")
    print(f"{args.num_adapters} adapters mixed / base: {ratio:.2f}x (target >= 0.75); adapter load "
          f"{report['adapter_load_ms']} ms, into a slot {report['adapter_to_slot_ms']} ms")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

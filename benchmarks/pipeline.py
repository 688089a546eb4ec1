"""Pipeline parallelism on this machine: the same workload through 1, 2 and 3 stages, in one run.

Workload: 32 requests submitted at once (prompts 32-256 tokens, 64 output tokens
each, greedy, EOS ignored), so decode steps run batches of up to 32. Each
configuration is a fresh engine; stages are Ray actors on this one machine.
Configurations (stages x batches in flight x torch threads per stage, transport):
- 1 x 1 x T: the single process (baseline);
- P x 1 x T over actor calls and over a Compiled Graph: no overlap: a step
  passes through the stages one after another, so they never compete for the
  cores and what the pipeline adds is pure overhead, measured per step (wall
  time minus the stages' compute time: transport, actor calls);
- 2 x 2 x T/2 over a Compiled Graph: micro-batch overlap with one core per
  stage (the layout that gives each stage its own compute, like one GPU per
  stage). (Overlap with stages oversubscribing the cores, 2 x 2 x T on 2 cores,
  ran at 0.29x in an earlier run: torch threads fighting over cores; Ray's CPU
  accounting prevents that layout outside a benchmark.)
Reported: output tokens/s, TTFT p50/p99, overhead per step, whether outputs
equal the single process's. Targets (issue 4): 2-stage throughput >= 80 % of
1-stage; overhead < 2 ms per step. Writes benchmarks/results/pipeline.json.

    .venv/bin/python benchmarks/pipeline.py [--num-requests 32] [--stages 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import ray
import torch

from cluster.executors import ParallelConfig, RayExecutor
from engine import LLM, SamplingParams
from engine.metrics import percentile

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent.parent / "tests" / "data" / "public_domain.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: every stage on the one GPU, each with a 1/P share of it")
    parser.add_argument("--output", default=str(RESULTS / "pipeline.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ray.init(num_cpus=args.threads * max(args.stages) + 1, include_dashboard=False, logging_level="ERROR")
    rng = random.Random(0)
    half = max(1, args.threads // 2)
    configs = [(1, 1, args.threads, "-")]
    for stages in (p for p in args.stages if p > 1):
        configs += [(stages, 1, args.threads, transport) for transport in ("actor_calls", "compiled_graph")]
    if 2 in args.stages and half < args.threads:
        configs.append((2, 2, half, "compiled_graph"))
    runs = {}
    for stages, inflight, threads, transport in configs:
        name = f"{stages}x{inflight}x{threads}" + (f" {transport}" if stages > 1 else "")
        parallel = ParallelConfig(inflight_batches=inflight, transport=transport if stages > 1 else "auto")
        options = {}
        if args.device != "cpu":
            parallel.gpus_per_worker = int(100 / stages) / 100
            options["kv_cache_memory_gb"] = 2  # not 80 % of the GPU: the runs follow each other
        llm = LLM(device=args.device, executor=RayExecutor(parallel), dtype="float32", quantization="none",
                  num_threads=threads, max_num_seqs=args.num_requests, pipeline_parallel_size=stages, **options)
        ids = llm.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
        rng.seed(0)
        prompts = []
        for _ in range(args.num_requests):
            length = rng.randint(32, 256)
            start = rng.randint(0, len(ids) - length)
            prompts.append(ids[start:start + length])
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        runner = llm.engine.runner
        if stages > 1:
            runner.wall_seconds, runner.num_steps = 0.0, 0
            busy_before = sum(i["busy_seconds"] for i in runner.stage_info())
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        ttfts = [o.metrics.time_to_first_token for o in outputs]
        run = {
            "stages": stages, "batches_in_flight": inflight, "threads_per_stage": threads, "transport": transport,
            "output_tokens_per_s": round(sum(len(o.token_ids) for o in outputs) / elapsed, 2),
            "seconds": round(elapsed, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p99_s": round(percentile(ttfts, 99), 3),
            "tokens": [o.token_ids for o in outputs],
        }
        if stages > 1:
            run["steps"] = runner.num_steps
            run["stage_layers"] = [i["layers"] for i in runner.stage_info()]
            if inflight == 1:  # with overlap, wall minus compute is not the transfer cost
                busy = sum(i["busy_seconds"] for i in runner.stage_info()) - busy_before
                run["overhead_ms_per_step"] = round((runner.wall_seconds - busy) / runner.num_steps * 1000, 3)
        llm.close()
        runs[name] = run
    base = runs[f"1x1x{args.threads}"]
    result = {
        "benchmark": "pipeline",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
                    "note": "every stage on this one machine: runs are named stages x batches in flight x threads"},
        "workload": {"num_requests": args.num_requests, "max_tokens": args.max_tokens, "prompt_tokens": "32-256"},
        "runs": {str(k): {key: v for key, v in r.items() if key != "tokens"} for k, r in runs.items()},
        "throughput_vs_1_stage": {str(k): round(r["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
                                  for k, r in runs.items()},
        "outputs_identical_to_1_stage": {str(k): r["tokens"] == base["tokens"] for k, r in runs.items()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

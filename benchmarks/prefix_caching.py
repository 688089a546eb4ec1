"""Prefix caching: requests sharing a long system prompt, with the cache on and off, in one run.

Workload: 32 chat requests that share a ~1,000-token system prompt (real prose
from tests/data) and differ in their question; they arrive one every
--interval seconds (the same schedule for both runs) and each asks for 32
tokens, greedy. The engine is the same apart from `enable_prefix_caching`.
Two arrival rates: one request a second (without the cache this CPU cannot keep
up: each ~1,000-token prefill takes ~2.5 s, so requests queue and the ratio
includes queueing), and one every 4 s (no queueing either way: the ratio is the
prefill work saved).
Reports mean and p50/p99 time to first token, the cache hit rate, and whether
the outputs are identical. Target (issue 6): mean TTFT at least 3x lower with
caching on. Writes benchmarks/results/prefix_caching.json.

    .venv/bin/python benchmarks/prefix_caching.py [--num-requests 32] [--intervals 1 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

from engine import AsyncEngine, EngineConfig, SamplingParams
from engine.llm import apply_chat_template
from engine.metrics import percentile

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent.parent / "tests" / "data" / "long_prompt.txt"
QUESTIONS = ["What is the main idea?", "Summarise it in one sentence.", "Who is the audience?",
             "Name one concrete detail.", "What would you ask the author?", "Give it a title.",
             "What is the tone?", "List two key words."]


def make_prompts(tokenizer, num_requests: int, system_tokens: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    system = tokenizer.decode((ids * 2)[:system_tokens])
    prompts = []
    for i in range(num_requests):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}]
        prompts.append(apply_chat_template(tokenizer, messages))
    return prompts


async def run(engine: AsyncEngine, prompts: list[list[int]], interval: float, max_tokens: int) -> list:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i, prompt):
        await asyncio.sleep(i * interval)
        final = None
        async for out in engine.generate(prompt, params, request_id=f"r{i}"):
            final = out
        return final

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def measure(prefix_caching: bool, prompts, args) -> dict:
    engine = AsyncEngine(EngineConfig(device="cpu", dtype="float32", quantization="none", enable_prefix_caching=prefix_caching))
    start = time.perf_counter()
    outputs = asyncio.run(run(engine, prompts, args.interval, args.max_tokens))
    wall = time.perf_counter() - start
    stats = engine.stats()
    engine.shutdown()
    ttfts = [o.metrics.time_to_first_token for o in outputs]
    return {"prefix_caching": prefix_caching, "ttft_mean_s": statistics.mean(ttfts),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "prefix_cache_hit_rate": stats.prefix_cache_hit_rate, "prompt_tokens": stats.num_prompt_tokens,
            "wall_s": wall, "token_ids": [o.token_ids for o in outputs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0, 4.0], help="seconds between arrivals")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    probe = AsyncEngine(EngineConfig(device="cpu", dtype="float32", quantization="none"))
    prompts = make_prompts(probe.tokenizer, args.num_requests, args.system_tokens)
    probe.shutdown()
    runs = []
    for interval in args.intervals:
        args.interval = interval
        off, on = measure(False, prompts, args), measure(True, prompts, args)
        identical = off.pop("token_ids") == on.pop("token_ids")
        speedup = off["ttft_mean_s"] / on["ttft_mean_s"]
        runs.append({"interval_s": interval, "off": off, "on": on, "mean_ttft_speedup": speedup,
                     "outputs_identical": identical, "target_3x_met": speedup >= 3})
        print(json.dumps(runs[-1], indent=2), flush=True)
    del args.interval
    result = {"runs": runs, "settings": vars(args), "mean_prompt_tokens": statistics.mean(len(p) for p in prompts),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefix_caching.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Replica choice under load: two LLM server replicas, one routing policy after another.

Open-loop load (Poisson arrivals at --rate per second for --duration seconds), the same
in each run: half the requests are chats that share a long system prompt (~1,000 tokens,
one of --prefixes documents) and ask their own question; half are short unique prompts.
Each replica's KV cache (--kv-gb) holds only some of the documents: a policy that spreads
each document over both replicas makes them evict one another's prefixes.
Streamed, greedy, --max-tokens each. For each `server.routing` policy (free_kv: the old
ranking by reported free KV blocks; power_of_two; prefix_affinity) the application is
deployed anew with two replicas (one CPU each), the load runs, and the client records
TTFT, tokens and which replica answered (x-semline-replica).

Before the measured load, each document is sent once (one after another, routed by the
policy under test, not measured): the first request for a system prompt pays for its
whole prefill whatever the routing, so the measurement shows what routing controls once
the prompts are known. `--no-prime` measures from cold caches instead.

Targets (issue 19): prefix affinity lowers mean TTFT of the shared-prefix requests by
>= 2x against free_kv without lowering throughput; no replica above 65 % of the requests
in any 10-second window. Writes benchmarks/results/cluster.json with the CPU flags and
the commit.

    .venv/bin/python benchmarks/replica_choice.py [--rate 2] [--duration 40] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import time
from pathlib import Path

import httpx

from common import machine_info  # benchmarks/common.py
from engine.metrics import percentile

RESULTS = Path(__file__).parent / "results"
MODEL = "SmolLM2-135M-Instruct"
DATA = Path(__file__).parents[1] / "tests" / "data"
TEXT = (DATA / "public_domain.txt").read_text() + "\n" + (DATA / "long_prompt.txt").read_text()


def headers(count: int) -> list[str]:
    """`count` different system prompts of ~1,000 tokens (different windows of the text)."""
    return [f"Document {k}. Answer questions about it.\n\n" + (TEXT[k * 1500:] + TEXT)[:4000] for k in range(count)]
POLICIES = ("free_kv", "power_of_two", "prefix_affinity")


def request_body(i: int, rng: random.Random, max_tokens: int, prefixes: list[str]) -> tuple[str, dict]:
    if i % 2 == 0:
        kind, messages = "shared", [{"role": "system", "content": prefixes[rng.randrange(len(prefixes))]},
                                    {"role": "user", "content": f"Question {i}: what is one idea of the text?"}]
    else:
        kind, messages = "unique", [{"role": "user", "content": f"Request {i}: name {rng.randrange(1000)} things."}]
    return kind, {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
                  "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def one(http: httpx.AsyncClient, kind: str, body: dict) -> dict:
    start = time.perf_counter()
    ttft, tokens, replica, cached = None, 0, None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        replica = resp.headers.get("x-semline-replica")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                prompt = chunk["usage"]["prompt_tokens"]
    return {"kind": kind, "status": resp.status_code, "ttft": ttft, "tokens": tokens, "replica": replica,
            "start": start, "cached": cached, "prompt": prompt if tokens else 0}


async def load(url: str, rate: float, duration: float, max_tokens: int, prefixes: list[str],
               seed: int = 0) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        tasks, t, start = [], 0.0, time.perf_counter()
        while True:
            t += rng.expovariate(rate)
            if t > duration:
                break
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            kind, body = request_body(len(tasks), rng, max_tokens, prefixes)
            tasks.append(asyncio.create_task(one(http, kind, body)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


async def prime(url: str, max_tokens: int, prefixes: list[str]) -> None:
    """Each document once, one after another (not measured)."""
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for prefix in prefixes:
            _, body = request_body(0, rng, max_tokens, [prefix])
            await one(http, "shared", body)


def summarize(results: list[dict], elapsed: float) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    summary = {"requests": len(results), "ok": len(ok), "output_tokens_per_s": sum(r["tokens"] for r in ok) / elapsed}
    for kind in ("shared", "unique"):
        ttfts = [r["ttft"] for r in ok if r["kind"] == kind]
        summary[kind] = {"ttft_mean_s": statistics.fmean(ttfts), "ttft_p50_s": percentile(ttfts, 50),
                         "ttft_p99_s": percentile(ttfts, 99)}
    shared = [r for r in ok if r["kind"] == "shared"]
    summary["shared"]["prefix_cache_hit_rate"] = sum(r["cached"] for r in shared) / max(1, sum(r["prompt"]
                                                                                              for r in shared))
    replicas = sorted({r["replica"] for r in ok})
    summary["share_per_replica"] = {rep: sum(r["replica"] == rep for r in ok) / len(ok) for rep in replicas}
    t0 = min(r["start"] for r in ok)
    worst = 0.0
    for window in range(int((max(r["start"] for r in ok) - t0) // 10) + 1):
        inside = [r for r in ok if window * 10 <= r["start"] - t0 < (window + 1) * 10]
        if len(inside) >= 4:
            worst = max(worst, max(sum(r["replica"] == rep for r in inside) / len(inside) for rep in replicas))
    summary["max_replica_share_in_10s_window"] = worst
    return summary


def deploy(policy: str, port: int, storage: str, kv_gb: float) -> str:
    from ray import serve

    from deployments.app import build_app
    from deployments.config import SemlineConfig

    config = SemlineConfig(
        engine={"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": kv_gb},
        http={"port": port},
        server={"num_cpus": 1, "routing": policy, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        router={"actor_name": f"bench-router-{policy}"}, batch={"storage_dir": storage})
    serve.run(build_app(config), name="semline", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prefixes", type=int, default=8, help="different shared system prompts")
    parser.add_argument("--kv-gb", type=float, default=0.3,
                        help="KV cache per replica (0.3 GB: ~6,800 tokens, about 6 of the prefixes)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--no-prime", action="store_true", help="measure from cold caches (no priming pass)")
    parser.add_argument("--output", default=str(RESULTS / "cluster.json"))
    args = parser.parse_args()

    import tempfile

    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=LoggingConfig(enable_access_log=False))
    results = {}
    try:
        for policy in args.policies:
            url = deploy(policy, port, tempfile.mkdtemp(), args.kv_gb)
            asyncio.run(load(url, 1.0, 4.0, 2, ["warm-up"], seed=99))  # warm up both replicas
            if not args.no_prime:
                asyncio.run(prime(url, args.max_tokens, headers(args.prefixes)))
            raw, elapsed = asyncio.run(load(url, args.rate, args.duration, args.max_tokens, headers(args.prefixes)))
            results[policy] = summarize(raw, elapsed)
            serve.delete("semline")
            r = results[policy]
            print(f"{policy:<16} shared TTFT mean {r['shared']['ttft_mean_s']:.2f}s p99 {r['shared']['ttft_p99_s']:.2f}s"
                  f" (hit rate {r['shared']['prefix_cache_hit_rate']:.0%}), unique TTFT mean "
                  f"{r['unique']['ttft_mean_s']:.2f}s, {r['output_tokens_per_s']:.1f} tok/s, shares "
                  f"{[round(v, 2) for v in r['share_per_replica'].values()]}, worst 10 s window "
                  f"{r['max_replica_share_in_10s_window']:.0%}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if "free_kv" in results and "prefix_affinity" in results:
        results["ratios"] = {
            "shared_ttft_mean_free_kv_over_affinity": results["free_kv"]["shared"]["ttft_mean_s"]
            / results["prefix_affinity"]["shared"]["ttft_mean_s"],
            "throughput_affinity_over_free_kv": results["prefix_affinity"]["output_tokens_per_s"]
            / results["free_kv"]["output_tokens_per_s"]}
        print(json.dumps(results["ratios"]))
    results["setup"] = {"rate": args.rate, "duration_s": args.duration, "max_tokens": args.max_tokens,
                        "primed": not args.no_prime,
                        "shared_prefixes": args.prefixes, "kv_cache_gb_per_replica": args.kv_gb,
                        "replicas": 2, "cpus_per_replica": 1, **machine_info()}
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

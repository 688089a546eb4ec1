"""Serving: the realtime lane alone, then beside a saturated batch lane, against the running application.

An open-loop load generator: realtime chat requests arrive as a Poisson process
at each rate in --rates (streamed, so time to first token is what the client
sees), whatever the server's state. Phases, all in one run on one application:

1. realtime alone, at each rate;
2. the batch lane alone: one large batch runs for --window seconds (its
   throughput is output tokens of the lines finished in the window / window);
3. realtime at each rate while a large batch keeps the batch lane saturated, and
   the batch lane's throughput over the same time.

Batch throughput counts the output tokens of the lines that finished inside a
phase (their `created` time in the output file, so the server's clock: run the
generator on the same machine or one with a synced clock).

Targets (from the serving issue): realtime TTFT p99 with the batch lane
saturated within 2x of realtime alone, at every rate; the batch lane keeps at
least 50% of its alone throughput. Writes benchmarks/results/serving.json.

    .venv/bin/python benchmarks/serving.py [--url http://127.0.0.1:8000] [--rates 0.5 1 2] [--duration 40]

Without --url it starts the application itself (local Ray, default config).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from pathlib import Path

import httpx

from deployments.cli import free_port
from engine.metrics import percentile

RESULTS = Path(__file__).parent / "results"
MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["rivers", "mountains", "bread", "trains", "the moon", "bees", "chess", "volcanoes", "tea", "maps"]


async def realtime_request(http: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, {i}."}]}
    start = time.perf_counter()
    ttft, tokens, status = None, 0, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        status = resp.status_code
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"status": status, "ttft": ttft, "tokens": tokens, "e2e": time.perf_counter() - start}


async def poisson_requests(http: httpx.AsyncClient, rate: float, duration: float, max_tokens: int,
                           seed: int) -> tuple[list[dict], float]:
    """Realtime requests at Poisson arrival times, `rate` per second for `duration` seconds,
    whatever the answers (open loop); waits for every one. Returns the results and the seconds
    from the first arrival to the last answer."""
    rng = random.Random(seed)
    tasks, t, start = [], 0.0, time.perf_counter()
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            break
        await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
        tasks.append(asyncio.create_task(realtime_request(http, len(tasks), max_tokens)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


async def open_loop(http: httpx.AsyncClient, rate: float, duration: float, max_tokens: int, seed: int) -> dict:
    results, elapsed = await poisson_requests(http, rate, duration, max_tokens, seed)
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    ttfts = [r["ttft"] for r in ok]
    return {"rate": rate, "requests": len(results), "ok": len(ok),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "e2e_p50_s": percentile([r["e2e"] for r in ok], 50),
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / elapsed}


def batch_lines(n: int, max_tokens: int) -> bytes:
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]} ({i})."}]}}
             for i in range(n)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


async def start_batch(http: httpx.AsyncClient, n: int, max_tokens: int) -> str:
    upload = await http.post("/v1/files", files={"file": ("bench.jsonl", batch_lines(n, max_tokens))},
                             data={"purpose": "batch"})
    upload.raise_for_status()
    batch = await http.post("/v1/batches", json={"input_file_id": upload.json()["id"],
                                                 "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    batch.raise_for_status()
    return batch.json()["id"]


async def batch_done(http: httpx.AsyncClient, batch_id: str) -> int:
    counts = (await http.get(f"/v1/batches/{batch_id}")).json()["request_counts"]
    return counts["completed"] + counts["failed"]


async def stop_batch(http: httpx.AsyncClient, batch_id: str) -> None:
    await http.post(f"/v1/batches/{batch_id}/cancel")
    while (await http.get(f"/v1/batches/{batch_id}")).json()["status"] not in ("cancelled", "completed"):
        await asyncio.sleep(0.5)


async def batch_finish_times(http: httpx.AsyncClient, batch_id: str) -> list[tuple[int, int]]:
    """(finish time, output tokens) of every line the batch answered, from its output file."""
    batch = (await http.get(f"/v1/batches/{batch_id}")).json()
    if not batch["output_file_id"]:
        return []
    text = (await http.get(f"/v1/files/{batch['output_file_id']}/content")).text
    records = [json.loads(line)["response"]["body"] for line in text.splitlines()]
    return [(body["created"], body["usage"]["completion_tokens"]) for body in records]


def batch_throughput(finished: list[tuple[int, int]], start: float, end: float) -> float:
    """Output tokens/s of the batch lines that finished within [start, end) (server clock, 1 s grain)."""
    return sum(tokens for created, tokens in finished if start <= created < end) / (end - start)


async def until_saturated(http: httpx.AsyncClient, batch_id: str) -> None:
    """Wait until the batch's first lines finished (the lane is warm and full)."""
    while await batch_done(http, batch_id) < 4:
        await asyncio.sleep(0.5)


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=args.url, timeout=600, headers=headers, limits=limits) as http:
        await realtime_request(http, 0, 4)  # warm up
        alone = [await open_loop(http, rate, args.duration, args.max_tokens, seed=i)
                 for i, rate in enumerate(args.rates)]
        for row in alone:
            print("realtime alone      ", row, flush=True)

        batch_id = await start_batch(http, args.batch_size, args.batch_max_tokens)
        await until_saturated(http, batch_id)
        start = time.time()
        await asyncio.sleep(args.window)
        alone_window = (start, time.time())

        mixed, windows = [], []
        for i, rate in enumerate(args.rates):
            start = time.time()
            mixed.append(await open_loop(http, rate, args.duration, args.max_tokens, seed=i))
            windows.append((start, time.time()))
        await stop_batch(http, batch_id)
        finished = await batch_finish_times(http, batch_id)

    batch_alone = batch_throughput(finished, *alone_window)
    print(f"batch alone          {batch_alone:.1f} output tok/s", flush=True)
    for row, window in zip(mixed, windows):
        row["batch_output_tokens_per_s"] = batch_throughput(finished, *window)
        print("realtime with batch ", row, flush=True)

    checks = []
    for a, m in zip(alone, mixed):
        ratio = m["ttft_p99_s"] / a["ttft_p99_s"] if a["ttft_p99_s"] and m["ttft_p99_s"] else None
        kept = m["batch_output_tokens_per_s"] / batch_alone if batch_alone else None
        checks.append({"rate": a["rate"], "ttft_p99_ratio": ratio, "ttft_p99_within_2x": ratio is not None and ratio <= 2,
                       "batch_throughput_kept": kept, "batch_kept_at_least_half": kept is not None and kept >= 0.5})
    return {"realtime_alone": alone, "batch_alone_output_tokens_per_s": batch_alone, "realtime_with_batch": mixed,
            "targets": checks}


def start_local_app(config_path=None) -> str:
    """Start the application on a free loopback port (local Ray); `config_path`: a YAML file, a
    SemlineConfig, or None for the defaults. Returns its base URL."""
    import tempfile

    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from deployments.app import build_app
    from deployments.cli import use_quiet_ray
    from deployments.config import SemlineConfig

    use_quiet_ray()  # Ray's and Serve's settings as under `semline serve`
    if isinstance(config_path, SemlineConfig):
        config = config_path
    else:
        config = SemlineConfig.from_yaml(config_path) if config_path else SemlineConfig()
    config.http.port = free_port()
    config.batch.storage_dir = tempfile.mkdtemp(prefix="semline-bench-")
    ray.init(include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": config.http.port},
                logging_config=LoggingConfig(enable_access_log=False))
    serve.run(build_app(config), name="semline", route_prefix="/")
    return f"http://127.0.0.1:{config.http.port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running semline (default: start one here)")
    parser.add_argument("--config", default=None, help="config for the application started here")
    parser.add_argument("--api-key", default=os.environ.get("SEMLINE_API_KEY"))
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="realtime requests/s")
    parser.add_argument("--duration", type=float, default=40, help="seconds of arrivals per rate")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per realtime request")
    parser.add_argument("--window", type=float, default=40, help="seconds the batch lane runs alone")
    parser.add_argument("--batch-size", type=int, default=2000, help="lines in the saturating batch")
    parser.add_argument("--batch-max-tokens", type=int, default=32, help="output tokens per batch line")
    args = parser.parse_args()
    if args.url is None:
        args.url = start_local_app(args.config)
    started = time.time()
    result = asyncio.run(run(args))
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    result["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    result["wall_s"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    for check in result["targets"]:
        print(check)


if __name__ == "__main__":
    main()

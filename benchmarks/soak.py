"""Soak: a mixed open-loop load for a while, with random client disconnects; nothing may leak or get lost.

Starts the application (Ray + Serve, the embedded model) on a free loopback port
and sends, for --duration seconds, requests at Poisson arrival times (--rate per
second, whatever the answers: open loop), a mix of
- chat completions (realtime lane), 40 %;
- streamed chat completions, 30 %, a third of which the client drops after a
  few chunks (the server must free their KV blocks);
- text completions with token-id prompts, 30 %;
and a batch of --batch-lines lines every --batch-every seconds (batch lane).

Afterwards (once idle) it checks, and writes to benchmarks/results/soak.json:
- the engine holds zero KV blocks and no running or waiting request;
- the LLM server replica's resident memory grew by at most 10 %, compared like
  with like: idle at the end against idle before the load, and under load in
  the last minute (its highest sample) against the first minute's level after
  warm-up (sampled every 10 s: the timeline and the second half's growth tell
  a leak from a high-water mark);
- no request was lost: every request got an answer (200, an explicit 429
  refusal, or was dropped by the client on purpose), and every batch
  completed with each custom_id answered exactly once.

    .venv/bin/python benchmarks/soak.py [--duration 600] [--rate 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
MODEL = "SmolLM2-135M-Instruct"


def _replica_rss() -> int:
    """Resident memory of the LLM server replica's process (Ray titles it ray::ServeReplica:...)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:semline:LLMServer" in part for part in proc.info["cmdline"] or []):
            return proc.memory_info().rss
    raise RuntimeError("no LLM server replica process found")


class Load:
    def __init__(self, base: str, seed: int) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.lost: list[str] = []

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def one(self, http: httpx.AsyncClient, i: int) -> None:
        kind = self.rng.choices(["chat", "stream", "completion"], [0.4, 0.3, 0.3])[0]
        drop_after = self.rng.randint(1, 6) if kind == "stream" and self.rng.random() < 1 / 3 else None
        max_tokens = self.rng.randint(8, 64)
        if kind == "completion":
            url = "/v1/completions"
            body = {"model": MODEL, "prompt": [self.rng.randint(100, 40000) for _ in range(self.rng.randint(8, 200))],
                    "max_tokens": max_tokens}
        else:
            url = "/v1/chat/completions"
            body = {"model": MODEL, "max_tokens": max_tokens, "stream": kind == "stream",
                    "messages": [{"role": "user", "content": f"Request {i}: tell me something about number {i}."}]}
        try:
            if kind != "stream":
                resp = await http.post(url, json=body)
                self.count(f"{kind}_{resp.status_code}")
                if resp.status_code not in (200, 429):
                    self.lost.append(f"{kind} {i}: {resp.status_code} {resp.text[:200]}")
                return
            async with http.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    self.count(f"stream_{resp.status_code}")
                    if resp.status_code != 429:
                        self.lost.append(f"stream {i}: {resp.status_code}")
                    return
                chunks, done = 0, False
                async for line in resp.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunks += 1
                        if '"error"' in line:
                            self.lost.append(f"stream {i}: error event {line[:200]}")
                    if drop_after is not None and chunks >= drop_after:
                        self.count("stream_dropped_by_client")
                        return  # leaving the context closes the connection mid-stream
                self.count("stream_200" if done else "stream_cut")
                if not done:
                    self.lost.append(f"stream {i}: ended without [DONE]")
        except httpx.HTTPError as exc:
            self.count(f"{kind}_exception")
            self.lost.append(f"{kind} {i}: {exc!r}")

    async def batches(self, http: httpx.AsyncClient, every: float, lines: int, stop: float) -> list[str]:
        ids = []
        n = 0
        while time.time() < stop:
            rows = [{"custom_id": f"soak-{n}-{j}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": MODEL, "max_tokens": 16,
                              "messages": [{"role": "user", "content": f"Batch line {j}."}]}} for j in range(lines)]
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            upload = (await http.post("/v1/files", files={"file": ("soak.jsonl", data)},
                                      data={"purpose": "batch"})).json()
            batch = (await http.post("/v1/batches", json={"input_file_id": upload["id"],
                                                          "endpoint": "/v1/chat/completions",
                                                          "completion_window": "24h"})).json()
            ids.append(batch["id"])
            n += 1
            await asyncio.sleep(every)
        return ids

    async def run(self, duration: float, rate: float, batch_every: float, batch_lines: int) -> list[str]:
        stop = time.time() + duration
        async with httpx.AsyncClient(base_url=self.base, timeout=600) as http:
            batch_task = asyncio.create_task(self.batches(http, batch_every, batch_lines, stop))
            tasks, i = [], 0
            while time.time() < stop:
                tasks.append(asyncio.create_task(self.one(http, i)))
                i += 1
                await asyncio.sleep(self.rng.expovariate(rate))
            await asyncio.gather(*tasks)
            self.counts["requests_sent"] = i
            return await batch_task


def check_batches(base: str, ids: list[str], timeout: float) -> dict:
    deadline = time.time() + timeout
    result = {"batches": len(ids), "lines": 0, "answered_once": True, "failed_lines": 0, "not_completed": []}
    with httpx.Client(base_url=base, timeout=60) as http:
        for batch_id in ids:
            while (batch := http.get(f"/v1/batches/{batch_id}").json())["status"] not in (
                    "completed", "failed", "cancelled", "expired") and time.time() < deadline:
                time.sleep(1)
            if batch["status"] != "completed":
                result["not_completed"].append(batch_id)
                continue
            outputs = [json.loads(x) for x in http.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
            seen = [o["custom_id"] for o in outputs]
            result["lines"] += batch["request_counts"]["total"]
            result["failed_lines"] += batch["request_counts"]["failed"]
            result["answered_once"] &= len(seen) == len(set(seen)) == batch["request_counts"]["completed"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    parser.add_argument("--batch-every", type=float, default=60)
    parser.add_argument("--batch-lines", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.config import SemlineConfig
    from engine.async_engine import TRIM_INTERVAL_S
    from serving import start_local_app  # benchmarks/serving.py

    base = start_local_app(SemlineConfig(engine={"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": 0.5}))
    llm = serve.get_deployment_handle("LLMServer", app_name="semline")

    time.sleep(TRIM_INTERVAL_S + 1)  # idle memory, compared like with like: after the idle trim
    load = Load(base, args.seed)
    started = time.time()
    rss = {"start": _replica_rss()}
    timeline: list[tuple[float, int]] = []  # (seconds since start, bytes) every 10 s
    warmup = min(60.0, args.duration / 4)

    async def sample_rss():
        while time.time() - started < args.duration:
            await asyncio.sleep(10)
            timeline.append((round(time.time() - started), _replica_rss()))

    async def everything():
        sampler = asyncio.create_task(sample_rss())
        ids = await load.run(args.duration, args.rate, args.batch_every, args.batch_lines)
        await sampler
        return ids

    batch_ids = asyncio.run(everything())
    batches = check_batches(base, batch_ids, timeout=900)
    deadline = time.time() + 120
    while (stats := llm.stats.remote().result()) and (stats["num_running"] or stats["num_waiting"]
                                                     or stats["kv_cache_usage"]) and time.time() < deadline:
        time.sleep(1)
    time.sleep(TRIM_INTERVAL_S + 1)
    rss["end"] = _replica_rss()
    loaded = timeline or [(0, rss["start"])]  # a run shorter than one sample has none
    rss["after_warmup"] = next((v for t, v in loaded if t >= warmup), loaded[-1][1])
    rss["half_time"] = next((v for t, v in loaded if t >= args.duration / 2), loaded[-1][1])
    rss["last_minute_max"] = max(v for t, v in loaded if t >= min(args.duration - 60, loaded[-1][0]))
    rss["max"] = max(v for _, v in loaded)
    growth_idle = rss["end"] / rss["start"] - 1
    growth_loaded = rss["last_minute_max"] / rss["after_warmup"] - 1
    result = {
        "benchmark": "soak",
        "config": {"duration_s": args.duration, "rate_per_s": args.rate, "batch_every_s": args.batch_every,
                   "batch_lines": args.batch_lines, "seed": args.seed, "cpus": os.cpu_count()},
        "wall_s": round(time.time() - started, 1),
        "requests": dict(sorted(load.counts.items())),
        "lost_requests": len(load.lost),
        "lost_examples": load.lost[:10],
        "batches": batches,
        "engine_after": stats,
        "replica_rss_mb": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "rss_growth_idle": round(growth_idle, 4),
        "rss_growth_under_load": round(growth_loaded, 4),
        # A leak keeps growing in the second half; a high-water mark levels off.
        "rss_growth_second_half_under_load": round(rss["last_minute_max"] / rss["half_time"] - 1, 4),
        "replica_rss_timeline_mb": [[t, round(v / 2**20)] for t, v in timeline],
    }
    result["passed"] = bool(
        not load.lost and not batches["not_completed"] and batches["answered_once"] and batches["failed_lines"] == 0
        and stats["kv_cache_usage"] == 0 and not stats["num_running"] and not stats["num_waiting"]
        and growth_idle <= 0.10 and growth_loaded <= 0.10)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

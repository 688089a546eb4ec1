"""Fair share between tenants at the router (issue 32), against the application started here.

Two tenants of one deployment whose router admits --seats sequences at a time (so the
router, not the engine, is where requests wait). Phases, one run:
1. alone: tenant B sends one streamed chat request at a time (--light-tokens output
   tokens): its TTFT p50, the baseline;
2. flood, arrival order (router.fair_share false, the behaviour before weighted fair
   queuing): tenant A keeps --flood requests of --flood-tokens tokens in flight while B
   sends one at a time: B's TTFT p50 (it waits behind A's backlog);
3. flood, fair share (the default) with --headroom seats beyond the capacity for a tenant
   with nothing in flight (router.light_headroom): the same;
4. weights 3:1: both tenants keep --flood requests in flight for --warmup + --duration
   seconds; the output tokens streamed to each within the last --duration (each chunk's
   usage so far) and their ratio (target: within 10 % of 3).
Targets: B's TTFT p50 under the flood <= 2x alone; tokens within 10 % of 3:1. The load
client is one asyncio process. Each phase is its own application (Serve redeploys it in
place, with a router of its own). Writes benchmarks/results/tenants.json with the CPU
flags and the commit.

    .venv/bin/python benchmarks/tenants.py [--seats 8] [--flood 32] [--duration 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from common import machine_info  # benchmarks/common.py
from engine.metrics import percentile
from serving import MODEL, start_local_app  # benchmarks/serving.py

RESULTS = Path(__file__).parent / "results"
KEYS = {"a": "tenant-a-key", "b": "tenant-b-key"}


def config(args, fair: bool, weights: tuple[float, float], phase: str):
    from deployments.config import SemlineConfig

    return SemlineConfig(
        tenants=[{"name": "a", "keys": [KEYS["a"]], "weight": weights[0]},
                 {"name": "b", "keys": [KEYS["b"]], "weight": weights[1]}],
        router={"actor_name": f"semline-router-{phase}", "max_inflight_per_replica": args.seats,
                "max_queued_realtime": 4096, "fair_share": fair, "light_headroom": args.headroom if fair else 0})


def deploy(cfg) -> None:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(cfg), name="semline", route_prefix="/")


async def request(http: httpx.AsyncClient, tenant: str, i: int, max_tokens: int, until: float | None = None,
                  since: float | None = None) -> dict:
    """One streamed chat request. tokens: its output tokens received between `since` and
    `until` (every chunk carries the usage so far: stream_options.continuous_usage_stats),
    all of them if both are None."""
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "messages": [{"role": "user", "content": f"Tell me a story, {i}."}]}
    start, ttft, tokens, before = time.perf_counter(), None, 0, 0
    async with http.stream("POST", "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                now = time.perf_counter()
                if since is not None and now < since:
                    before = chunk["usage"]["completion_tokens"]
                if until is None or now <= until:
                    tokens = chunk["usage"]["completion_tokens"]
    return {"status": resp.status_code, "ttft": ttft, "tokens": max(0, tokens - before), "done_at": time.perf_counter()}


async def keep_in_flight(http, tenant: str, count: int, max_tokens: int, stop: float, results: list,
                         since: float | None = None) -> None:
    """`count` requests of `tenant` always in flight until `stop` (their tokens counted from
    `since`, if given, until then)."""
    async def one(c: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            results.append(await request(http, tenant, c * 100_000 + i, max_tokens, stop, since))
            i += 1
    await asyncio.gather(*(one(c) for c in range(count)))


async def one_at_a_time(http, tenant: str, max_tokens: int, stop: float) -> list[dict]:
    results, i = [], 0
    while time.perf_counter() < stop:
        results.append(await request(http, tenant, i, max_tokens))
        i += 1
    return results


def ttft_p50(results: list[dict]) -> float:
    return percentile([r["ttft"] for r in results if r["status"] == 200 and r["ttft"] is not None], 50)


async def light_under_flood(http, args) -> dict:
    flood: list[dict] = []
    start = time.perf_counter()
    flooder = asyncio.create_task(keep_in_flight(http, "a", args.flood, args.flood_tokens,
                                                 start + args.light_duration + 5, flood))
    await asyncio.sleep(5)  # the flood fills the seats and the queue first
    light = await one_at_a_time(http, "b", args.light_tokens, time.perf_counter() + args.light_duration)
    await flooder
    return {"b_requests": len(light), "b_ttft_p50_s": round(ttft_p50(light), 4),
            "a_requests": len(flood), "a_ttft_p50_s": round(ttft_p50(flood), 4)}


async def run(args, url: str) -> dict:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
    result: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        deploy(config(args, True, (1, 1), "alone"))
        await request(http, "b", 0, 4)  # warm-up
        alone = await one_at_a_time(http, "b", args.light_tokens, time.perf_counter() + 15)
        result["alone"] = {"b_requests": len(alone), "b_ttft_p50_s": round(ttft_p50(alone), 4)}
        for name, fair in (("flood_arrival_order", False), ("flood_fair_share", True)):
            deploy(config(args, fair, (1, 1), name.split("_")[-1]))
            result[name] = await light_under_flood(http, args)
            result[name]["b_ttft_vs_alone"] = round(result[name]["b_ttft_p50_s"] / result["alone"]["b_ttft_p50_s"], 2)
        deploy(config(args, True, (3, 1), "weights"))
        results = {"a": [], "b": []}
        # Counted once the lane is saturated: the first --warmup seconds go to whichever
        # tenant's requests reached the router first (a tenant that arrives later is levelled
        # with the one already served, not paid back), which is not the share being measured.
        since = time.perf_counter() + args.warmup
        stop = since + args.duration
        await asyncio.gather(*(keep_in_flight(http, t, args.flood, args.flood_tokens, stop, results[t], since)
                               for t in ("a", "b")))
        # Output tokens streamed to each tenant within the saturated minute (unfinished requests' too).
        tokens = {t: sum(r["tokens"] for r in rs) for t, rs in results.items()}
        result["weights_3_to_1"] = {"warmup_s": args.warmup, "duration_s": args.duration, "tokens": tokens,
                                    "ratio": round(tokens["a"] / max(1, tokens["b"]), 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seats", type=int, default=8, help="router.max_inflight_per_replica")
    parser.add_argument("--flood", type=int, default=32, help="requests the flooding tenant keeps in flight")
    parser.add_argument("--flood-tokens", type=int, default=256)
    parser.add_argument("--light-tokens", type=int, default=16)
    parser.add_argument("--light-duration", type=float, default=30)
    parser.add_argument("--duration", type=float, default=60, help="seconds of the 3:1 saturation")
    parser.add_argument("--warmup", type=float, default=15, help="seconds of the 3:1 saturation before "
                        "the counted ones")
    parser.add_argument("--headroom", type=int, default=1, help="router.light_headroom with fair share (the "
                        "engine's max_num_seqs leaves room above --seats)")
    args = parser.parse_args()
    started = time.time()
    url = start_local_app(config(args, True, (1, 1), "start"))
    result = {"benchmark": "tenants", **asyncio.run(run(args, url))}
    fair = result["flood_fair_share"]["b_ttft_vs_alone"]
    ratio = result["weights_3_to_1"]["ratio"]
    result["targets"] = {"b_ttft_p50_within_2x_alone": fair <= 2.0, "tokens_within_10pct_of_3_to_1":
                         abs(ratio - 3.0) <= 0.3}
    result["settings"] = vars(args)
    result["machine"] = machine_info()
    result["wall_s"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tenants.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

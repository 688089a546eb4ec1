"""Admission control under 10x the sustainable request rate, against the running application.

Phases, one run, one application (started here unless --url is given):
1. unloaded: realtime streamed chat requests at --base-rate per second for
   --duration seconds: TTFT p50/p99;
2. sustainable rate: --clients closed-loop clients (each sends its next request
   when the last one finished) for --duration seconds: completed requests per
   second = the rate this deployment sustains;
3. overload: open-loop Poisson arrivals at --factor (10) x the sustainable rate
   for --duration seconds: how many got 429, how fast the 429s came back, and
   the TTFT p50/p99 of the admitted ones.
Target (issue 7): the excess gets 429 quickly and admitted realtime TTFT p99
stays within 3x the unloaded figure. That needs a short realtime queue and a
bounded concurrency: the started application admits --clients requests at a
time (router.max_inflight_per_replica, the concurrency the sustainable rate was
measured at, default 4) and queues --queue more (router.max_queued_realtime,
default 0: admit or refuse at once), so the router refuses what it cannot
start now. Measured on 2 cores:
4 seats, no queue: 1.3x; 8 seats, no queue: 3.5x; 8 seats + 2 queued: 16x
(queued requests wait for a seat). The service defaults (64 seats, 256
queued) trade TTFT for fewer refusals. Writes benchmarks/results/overload.json.

    .venv/bin/python benchmarks/overload.py [--duration 30] [--factor 10] [--clients 4] [--queue 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx

from engine.metrics import percentile
from serving import poisson_requests, realtime_request, start_local_app  # benchmarks/serving.py

RESULTS = Path(__file__).parent / "results"


async def closed_loop(http: httpx.AsyncClient, clients: int, duration: float, max_tokens: int) -> float:
    stop, done = time.perf_counter() + duration, []

    async def client(c: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            result = await realtime_request(http, c * 10_000 + i, max_tokens)
            i += 1
            if result["status"] == 200:
                done.append(result)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return len(done) / (time.perf_counter() - start)


def summary(results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    refused = [r for r in results if r["status"] == 429]
    return {"requests": len(results), "ok": len(ok), "refused_429": len(refused),
            "other": len(results) - len(ok) - len(refused),
            "ttft_p50_s": percentile([r["ttft"] for r in ok], 50), "ttft_p99_s": percentile([r["ttft"] for r in ok], 99),
            "refusal_p50_s": percentile([r["e2e"] for r in refused], 50) if refused else None,
            "refusal_p99_s": percentile([r["e2e"] for r in refused], 99) if refused else None}


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=args.url, timeout=300, headers=headers, limits=limits) as http:
        await realtime_request(http, 0, 4)  # warm-up
        unloaded = summary((await poisson_requests(http, args.base_rate, args.duration, args.max_tokens, 1))[0])
        sustainable = await closed_loop(http, args.clients, args.duration, args.max_tokens)
        rate = args.factor * sustainable
        overload = summary((await poisson_requests(http, rate, args.duration, args.max_tokens, 2))[0])
    ratio = overload["ttft_p99_s"] / unloaded["ttft_p99_s"]
    return {
        "benchmark": "overload",
        "unloaded": unloaded,
        "sustainable_requests_per_s": round(sustainable, 3),
        "overload_rate_per_s": round(rate, 3),
        "overload": overload,
        "admitted_ttft_p99_vs_unloaded": round(ratio, 2),
        "targets": {"ttft_p99_within_3x": ratio <= 3.0,
                    "excess_refused_quickly": bool(overload["refused_429"]) and (overload["refusal_p99_s"] or 0) < 0.5,
                    "nothing_else_failed": overload["other"] == 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running semline (default: start one here)")
    parser.add_argument("--api-key", default=os.environ.get("SEMLINE_API_KEY"))
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--base-rate", type=float, default=0.5, help="unloaded realtime requests/s")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients measuring the sustainable rate "
                        "(and the started app's seats)")
    parser.add_argument("--factor", type=float, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--queue", type=int, default=0, help="router.max_queued_realtime of the app started here")
    args = parser.parse_args()
    if args.url is None:
        from deployments.config import SemlineConfig

        args.url = start_local_app(SemlineConfig(router={"max_queued_realtime": args.queue,
                                                         "max_inflight_per_replica": args.clients}))
    started = time.time()
    result = asyncio.run(run(args))
    result["settings"] = {k: v for k, v in vars(args).items() if k != "api_key"}
    result["wall_s"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

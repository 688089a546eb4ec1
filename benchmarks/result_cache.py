"""Result cache: the latency of an answer from the cache against one computed, over HTTP.

Starts the application here with `quality.result_cache` on, then for N distinct greedy
chat requests (each `--max-tokens` tokens) sends each twice, one after another: the first
is computed (a miss), the second answered from the cache (a hit, byte-identical: checked).
Prints p50/p90 of both and writes benchmarks/results/result_cache.json.

    .venv/bin/python benchmarks/result_cache.py [--requests 20] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.serving import start_local_app  # noqa: E402
from deployments.config import SemlineConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    config = SemlineConfig(quality={"result_cache": {"enabled": True}})
    url = start_local_app(config)
    times: dict[str, list[float]] = {"miss": [], "hit": []}
    with httpx.Client(base_url=url, timeout=300) as http:
        http.post("/v1/chat/completions", json={"model": config.model_name, "max_tokens": 4,
                                                "messages": [{"role": "user", "content": "warm up"}]})
        for i in range(args.requests):
            body = {"model": config.model_name, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"Request {i}: tell me about rivers."}]}
            answers = []
            for expected in ("miss", "hit"):
                start = time.perf_counter()
                answer = http.post("/v1/chat/completions", json=body)
                times[expected].append(time.perf_counter() - start)
                assert answer.status_code == 200 and answer.headers["x-semline-cache"] == expected, answer.text
                answers.append(answer.content)
            assert answers[0] == answers[1]  # byte-identical
    summary = {kind: {"p50_ms": round(1000 * statistics.median(t), 2), "p90_ms": round(1000 * percentile(t, 0.9), 2)}
               for kind, t in times.items()}
    report = {"benchmark": "result_cache", "machine": machine_info(), "requests": args.requests,
              "max_tokens": args.max_tokens, "latency": summary,
              "hit_over_miss_p50": round(summary["hit"]["p50_ms"] / summary["miss"]["p50_ms"], 4)}
    for kind, s in summary.items():
        print(f"{kind:5s} p50 {s['p50_ms']:8.2f} ms  p90 {s['p90_ms']:8.2f} ms")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "result_cache.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Reading the tests' Prometheus: queries, and waits long enough for a loaded 2-core machine.

A counter reaches a query through three hops: the replica reports it to Ray's agent (every
second in the tests), Prometheus scrapes the agent (every SCRAPE_S) and the query sees the
scrape. With every core taken, CI saw a counter still missing after 30 s; a wait ends as soon
as its condition holds, so a long limit costs nothing when all is well. A wait that fails says
how the scrapes went, which tells a slow exporter from a missing series."""

from __future__ import annotations

import time
from typing import Callable

import httpx

WAIT_S = 120.0
SCRAPE_S = 2  # the tests' Prometheus scrapes every SCRAPE_S seconds, with as long a timeout


def query(prometheus: str, promql: str) -> list[dict]:
    resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]["result"]


def value(prometheus: str, promql: str, default: float | None = 0.0) -> float | None:
    """The first series' value, or `default` where there is none yet."""
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else default


def by_label(prometheus: str, promql: str, label: str) -> dict[str, float]:
    return {r["metric"][label]: float(r["value"][1]) for r in query(prometheus, promql)}


def scrapes(prometheus: str) -> dict:
    """Each scrape job's last `up` and its slowest scrape over the last 10 minutes."""
    up = by_label(prometheus, "up", "job")
    slowest = by_label(prometheus, "max by (job) (max_over_time(scrape_duration_seconds[10m]))", "job")
    failed = by_label(prometheus, "sum by (job) (count_over_time(up[10m]) - sum_over_time(up[10m]))", "job")
    return {job: {"up": up[job], "slowest_s": slowest.get(job), "failed_10m": failed.get(job)} for job in up}


def wait_for(prometheus: str, read: Callable[[], object], ok: Callable[[object], bool], what: str,
             timeout: float = WAIT_S, every: float = 1.0):
    """`read()` once `ok` holds of it; fails with the last reading and the scrape health."""
    deadline = time.time() + timeout
    while True:
        got = read()
        if ok(got):
            return got
        if time.time() > deadline:
            raise AssertionError(f"{what}: still {got!r} after {timeout:.0f} s; scrapes: {scrapes(prometheus)}")
        time.sleep(every)


def settled(prometheus: str, promql: str, timeout: float = WAIT_S) -> float:
    """The value once it is there and stops moving (three equal readings a scrape apart)."""
    readings: list[float] = []

    def read():
        readings.append(value(prometheus, promql, default=None))
        del readings[:-3]
        return list(readings)

    last = wait_for(prometheus, read, lambda r: len(r) == 3 and r[0] is not None and len(set(r)) == 1,
                    f"{promql} settling", timeout, every=SCRAPE_S)
    return last[-1]

"""The router actor: one per application, through which both lanes reach the LLM servers.

A named async Ray actor around AdmissionController. Lanes ask it for a ticket
before they send work to the LLM server and give the ticket back when the
request ends; token streams then go from the LLM server to the ingress
directly, so tokens make no extra hop through the router.

The router's capacity follows the live replicas: each LLM server replica sends
a heartbeat every second with how many requests it takes at once; a replica
silent for `replica_ttl_s` no longer counts. The heartbeat's answer carries the
router's queue depths, which the replicas report to Serve's autoscaler, so work
held back here still counts as demand.
"""

from __future__ import annotations

import asyncio
import time

import ray
from ray.util.metrics import Counter, Gauge

from cluster.admission import LANES, AdmissionConfig, AdmissionController, QueueFullError

REJECT_REASONS = ("queue_full", "timeout")


class RouterMetrics:
    """Exported through Ray's metrics API as ray_semline_router_*."""

    def __init__(self) -> None:
        self.queue_depth = Gauge("semline_router_queue_depth", "Requests waiting at the router.", ("lane",))
        self.inflight = Gauge("semline_router_inflight", "Requests admitted and not yet finished.", ("lane",))
        self.rejected = Counter("semline_router_requests_rejected", "Requests the router refused.",
                                ("lane", "reason"))
        # Zero from the start, so that rates (dashboard, alerts) exist before the first refusal.
        # Counter.inc() refuses 0: _record is the call inc() makes (recheck on Ray upgrades).
        for lane in LANES:
            for reason in REJECT_REASONS:
                self.rejected._record(0.0, tags={"lane": lane, "reason": reason})

    def update(self, stats: dict) -> None:
        for lane, depth in stats["queued"].items():
            self.queue_depth.set(depth, {"lane": lane})
            self.inflight.set(stats["inflight_by_lane"][lane], {"lane": lane})


class Router:
    def __init__(self, config: dict, replica_ttl_s: float = 5.0) -> None:
        self.admission = AdmissionController(AdmissionConfig(**config))
        self.replica_ttl_s = replica_ttl_s
        self._replicas: dict[str, tuple[int, float]] = {}  # replica id -> (capacity, last heartbeat)
        self._reaper: asyncio.Task | None = None
        self.metrics = RouterMetrics()

    async def acquire(self, lane: str, timeout_s: float | None = None) -> int:
        try:
            return await self.admission.acquire(lane, timeout_s)
        except QueueFullError:
            self.metrics.rejected.inc(1, {"lane": lane, "reason": "queue_full"})
            raise
        except asyncio.TimeoutError:
            self.metrics.rejected.inc(1, {"lane": lane, "reason": "timeout"})
            raise

    async def release(self, ticket: int) -> None:
        self.admission.release(ticket)

    async def heartbeat(self, replica_id: str, capacity: int) -> dict:
        """A replica is alive and takes `capacity` requests; returns the router's stats."""
        self._replicas[replica_id] = (capacity, time.monotonic())
        self._refresh_capacity()
        self.metrics.update(self.admission.stats())
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return self.admission.stats()

    async def deregister(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        self._refresh_capacity()

    async def stats(self) -> dict:
        return {**self.admission.stats(), "replicas": len(self._replicas)}

    async def grant_log(self) -> list[tuple[str, int]]:
        return list(self.admission.grant_log)

    def _refresh_capacity(self) -> None:
        now = time.monotonic()
        self._replicas = {r: (c, t) for r, (c, t) in self._replicas.items() if now - t < self.replica_ttl_s}
        self.admission.set_capacity(sum(c for c, _ in self._replicas.values()))

    async def _reap(self) -> None:
        while self._replicas:
            await asyncio.sleep(1.0)
            self._refresh_capacity()


def get_or_create_router(name: str, config: dict):
    """The named router actor, created on first use (it reserves no CPU)."""
    return ray.remote(Router).options(
        name=name, get_if_exists=True, num_cpus=0, max_concurrency=100_000, max_restarts=-1,
    ).remote(config)

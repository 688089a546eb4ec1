"""The router actor: one per application, through which both lanes reach the LLM servers.

A named async Ray actor around AdmissionController. Lanes ask it for a ticket
before they send work to the LLM server and give the ticket back when the
request ends; token streams then go from the LLM server to the ingress
directly, so tokens make no extra hop through the router.

The router is a detached actor: it outlives the replica that created it, and Ray
restarts it after a crash; a restarted router admits nothing until the holders
have reported the tickets they hold (it adopts them), so it never over-admits.

The router's capacity follows the live replicas: each LLM server replica sends
a heartbeat every second with how many requests it takes at once; a replica
silent for `replica_ttl_s` no longer counts. The heartbeat's answer carries the
router's queue depths, which the replicas report to Serve's autoscaler, so work
held back here still counts as demand.

Ticket holders (the ingress and batch runner replicas) report the tickets they
hold every few seconds (`sync`); tickets granted to a holder that no longer
holds them, or to one that has gone silent (a killed replica), are reclaimed
and counted in ray_semline_router_tickets_reclaimed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import warnings
from collections import OrderedDict

import ray
from ray.util.metrics import Counter, Gauge

from cluster.admission import DeadlineError, KeyLimitError, LANES, AdmissionConfig, AdmissionController, QueueFullError

logger = logging.getLogger(__name__)

REJECT_REASONS = ("queue_full", "timeout")
RECLAIM_REASONS = ("not_held", "holder_gone")


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
        self.reclaimed = Counter("semline_router_tickets_reclaimed",
                                 "Tickets taken back from holders that lost them or went away.", ("reason",))
        for reason in RECLAIM_REASONS:
            self.reclaimed._record(0.0, tags={"reason": reason})

    def update(self, stats: dict) -> None:
        for lane, depth in stats["queued"].items():
            self.queue_depth.set(depth, {"lane": lane})
            self.inflight.set(stats["inflight_by_lane"][lane], {"lane": lane})


class BoundedStore:
    """Values by key, bounded in count and bytes (given by the callers) within each group (a
    tenant: one tenant's values never push out another's), each kept for at most the age the
    reader gives; within a group the least recently used go first."""

    def __init__(self) -> None:
        self._groups: dict[str | None, OrderedDict[str, tuple[float, bytes]]] = {}
        self._group_of: dict[str, str | None] = {}
        self._bytes: dict[str | None, int] = {}

    @property
    def num_bytes(self) -> int:
        return sum(self._bytes.values())

    def group_of(self, key: str) -> str | None:
        return self._group_of.get(key)

    def get(self, key: str, ttl_s: float) -> bytes | None:
        if key not in self._group_of:
            return None
        entries = self._groups[self._group_of[key]]
        stored_at, value = entries[key]
        if time.monotonic() - stored_at > ttl_s:
            self.delete(key)
            return None
        entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes, max_entries: int, max_bytes: int | None = None,
            group: str | None = None) -> bool:
        """Keep `value` in `group`, whose least recently used values go while the group is over
        max_entries or max_bytes. False (nothing kept) when the value alone is over max_bytes."""
        self.delete(key)
        if max_bytes is not None and len(value) > max_bytes:
            return False
        entries = self._groups.setdefault(group, OrderedDict())
        entries[key] = (time.monotonic(), value)
        self._group_of[key] = group
        self._bytes[group] = self._bytes.get(group, 0) + len(value)
        while entries and (len(entries) > max_entries
                           or (max_bytes is not None and self._bytes.get(group, 0) > max_bytes)):
            self.delete(next(iter(entries)))
        return True

    def delete(self, key: str) -> bool:
        if key not in self._group_of:
            return False
        group = self._group_of.pop(key)
        entries = self._groups[group]
        _, value = entries.pop(key)
        self._bytes[group] -= len(value)
        if not entries:
            del self._groups[group], self._bytes[group]
        return True

    def __len__(self) -> int:
        return len(self._group_of)


class Router:
    def __init__(self, config: dict, replica_ttl_s: float = 5.0) -> None:
        self.admission = AdmissionController(AdmissionConfig(**config))
        self.replica_ttl_s = replica_ttl_s
        self._replicas: dict[str, tuple[int, float]] = {}  # replica id -> (capacity, last heartbeat)
        self._reaper: asyncio.Task | None = None
        self.metrics = RouterMetrics()
        # What every ingress serves beyond its configuration (deployments/quality/catalog.py): LoRA
        # adapters loaded at run time (name -> folder) and experiments' changed weights.
        self.catalog: dict = {"adapters": {}, "weights": {}}
        # Answers of deterministic requests, shared by both lanes (deployments/quality/result_cache.py).
        self.results = BoundedStore()
        # Stored /v1/responses answers (deployments/api/responses.py), for every ingress replica,
        # and the background ones still running: id -> [cancelled, what their runner waits on].
        self.responses = BoundedStore()
        self._running: dict[str, list] = {}
        if _reconstructed():
            # Restarted by Ray after a crash: the holders still hold the tickets of the router
            # that died. Admit nothing until they have reported them (sync adopts them).
            logger.warning("router restarted; admitting nothing for %.1f s while holders report their tickets",
                           self.admission.config.recovery_s)
            self.admission.pause(self.admission.config.recovery_s)

    async def acquire(self, lane: str, timeout_s: float | None = None, holder: str | None = None,
                      request_id: str | None = None, seats: int = 1, priority: int = 0,
                      deadline_s: float | None = None, key: str | None = None) -> int | None:
        """A ticket, or None if `request_id` was withdrawn first. Callers that may give up
        name themselves and the request, and withdraw it rather than cancel this call: a
        cancelled call's result is lost, and with it a ticket granted at that moment."""
        self._ensure_reaper()
        try:
            return await self.admission.acquire(lane, timeout_s, holder, request_id, seats, priority, deadline_s,
                                                key)
        except QueueFullError:
            self.metrics.rejected.inc(1, {"lane": lane, "reason": "queue_full"})
            raise
        except KeyLimitError:
            self.metrics.rejected.inc(1, {"lane": lane, "reason": "key_limit"})
            raise
        except DeadlineError as exc:
            self.metrics.rejected.inc(1, {"lane": lane, "reason": "deadline_passed" if exc.passed else "deadline"})
            raise
        except asyncio.TimeoutError:
            self.metrics.rejected.inc(1, {"lane": lane, "reason": "timeout"})
            raise

    async def release(self, ticket: int) -> None:
        self.admission.release(ticket)

    async def record_tokens(self, key: str, tokens: int, seats: int = 1) -> None:
        self.admission.record_tokens(key, tokens, seats)

    async def withdraw(self, request_id: str) -> None:
        self.admission.withdraw(request_id)

    async def sync(self, holder: str, tickets: list, pending: list[str] = ()) -> list[int]:
        """`holder` is alive, holds exactly `tickets` ([ticket, lane, seats, key] entries, or
        bare numbers) and awaits the answers to the requests `pending`; returns the tickets
        reclaimed from it. Tickets of an earlier router are adopted."""
        lost = self.admission.reconcile(holder, tickets, pending)
        if lost:
            logger.warning("reclaimed %d ticket(s) %s that holder %s no longer holds", len(lost), lost, holder)
            self.metrics.reclaimed.inc(len(lost), {"reason": "not_held"})
        return lost

    async def heartbeat(self, replica_id: str, capacity: int) -> dict:
        """A replica is alive and takes `capacity` requests; returns the router's stats."""
        self._replicas[replica_id] = (capacity, time.monotonic())
        self._refresh_capacity()
        self.metrics.update(self.admission.stats())
        self._ensure_reaper()
        return self.admission.stats()

    async def catalog_state(self) -> dict:
        return self.catalog

    async def set_adapter(self, name: str, path: str | None) -> None:
        """A LoRA adapter loaded (a folder) or unloaded (None) at run time."""
        if path is None:
            self.catalog["adapters"].pop(name, None)
        else:
            self.catalog["adapters"][name] = path

    async def set_weights(self, experiment: str, weights: dict[str, float]) -> None:
        self.catalog["weights"][experiment] = dict(weights)

    async def cache_get(self, key: str, ttl_s: float) -> bytes | None:
        return self.results.get(key, ttl_s)

    async def cache_put(self, key: str, answer: bytes, max_entries: int, max_bytes: int | None = None,
                        tenant: str | None = None) -> None:
        """Keep an answer among its tenant's (the bounds are each tenant's)."""
        self.results.put(key, answer, max_entries, max_bytes, tenant)

    async def response_get(self, response_id: str, ttl_s: float) -> bytes | None:
        return self.responses.get(response_id, ttl_s)

    async def response_put(self, response_id: str, record: bytes, max_entries: int, max_bytes: int,
                           owner: str | None = None) -> bool:
        """Store a response among its owner's (the bounds are each tenant's)."""
        return self.responses.put(response_id, record, max_entries, max_bytes, owner)

    async def response_delete(self, response_id: str) -> bool:
        self._stop_running(response_id)  # a background response deleted while it runs stops
        return self.responses.delete(response_id)

    async def response_start(self, response_id: str, record: bytes, max_entries: int, max_bytes: int,
                             owner: str | None = None) -> bool:
        """A background response accepted: stored as it stands (queued) until it finishes."""
        if not self.responses.put(response_id, record, max_entries, max_bytes, owner):
            return False
        self._running[response_id] = [False, asyncio.Event()]
        return True

    async def response_wait_cancel(self, response_id: str) -> bool:
        """Called by a background response's runner: returns when it finished (False) or was
        cancelled or deleted (True)."""
        entry = self._running.get(response_id)
        if entry is None:
            return False
        await entry[1].wait()
        if entry[0]:
            self._running.pop(response_id, None)  # its runner has heard
        return entry[0]

    async def response_cancel(self, response_id: str, ttl_s: float, max_entries: int, max_bytes: int) -> bytes | None:
        """A running background response cancelled: its record, now saying so (its runner stops
        it). Any other stored response's record as it is; None when there is none."""
        record = self.responses.get(response_id, ttl_s)
        if record is None or not self._stop_running(response_id):
            return record
        stored = json.loads(record)
        stored["response"]["status"] = "cancelled"
        record = json.dumps(stored, ensure_ascii=False).encode()
        self.responses.put(response_id, record, max_entries, max_bytes, self.responses.group_of(response_id))
        return record

    async def response_finish(self, response_id: str, record: bytes, max_entries: int, max_bytes: int,
                              owner: str | None = None) -> bool:
        """A background response's end (completed, incomplete or failed), unless it was cancelled
        or deleted meanwhile (False: nothing stored)."""
        entry = self._running.pop(response_id, None)
        if entry is None or entry[0]:
            return False
        entry[1].set()
        return self.responses.put(response_id, record, max_entries, max_bytes, owner)

    def _stop_running(self, response_id: str) -> bool:
        """A running background response told to stop; False when none runs under that id."""
        entry = self._running.get(response_id)
        if entry is None or entry[0]:
            return False
        entry[0] = True
        entry[1].set()
        return True

    async def deregister(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        self._refresh_capacity()

    async def stats(self) -> dict:
        return {**self.admission.stats(), "replicas": len(self._replicas)}

    async def grant_log(self) -> list[tuple[str, int]]:
        return list(self.admission.grant_log)

    async def waiting(self, lane: str) -> list[int]:
        return self.admission.waiting(lane)

    def _refresh_capacity(self) -> None:
        now = time.monotonic()
        self._replicas = {r: (c, t) for r, (c, t) in self._replicas.items() if now - t < self.replica_ttl_s}
        self.admission.set_capacity(sum(c for c, _ in self._replicas.values()))

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Every second: forget silent replicas, reclaim the tickets of silent holders."""
        while True:
            await asyncio.sleep(1.0)
            if self._replicas:  # a router given a fixed capacity (no replicas) keeps it
                self._refresh_capacity()
            for holder, tickets in self.admission.expire_holders().items():
                logger.warning("holder %s went silent; reclaimed its %d ticket(s)", holder, len(tickets))
                self.metrics.reclaimed.inc(len(tickets), {"reason": "holder_gone"})


def _reconstructed() -> bool:
    """Whether Ray restarted this actor after a crash."""
    try:
        with warnings.catch_warnings():  # Ray's own property warns about an attribute it reads
            warnings.simplefilter("ignore", DeprecationWarning)
            return ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # noqa: BLE001 - not in an actor (a test driving Router directly)
        return False


def get_or_create_router(name: str, config: dict):
    """The named router actor, created on first use (it reserves no CPU). Detached: it
    outlives the replica that happened to create it; Ray restarts it after a crash."""
    return ray.remote(Router).options(
        name=name, get_if_exists=True, num_cpus=0, max_concurrency=100_000, max_restarts=-1,
        lifetime="detached",
    ).remote(config)

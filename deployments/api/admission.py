"""A serving process's side of the router actor (cluster/router.py): tickets for seats.

Each request waits for a ticket for its sequences (admit), gives it back when it ends
(release) and counts its tokens against its API key (spent). The process reports the tickets
it holds every router.holder_sync_s, so the router can reclaim any that went astray (a
request whose answer never arrived, a replica that died), and a router that went away is
found or started again.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
import uuid

import ray

from cluster.admission import DeadlineError, KeyLimitError, QueueFullError
from cluster.router import get_or_create_router
from deployments.api.errors import APIError, to_api_error
from deployments.config import SemlineConfig

logger = logging.getLogger(__name__)


class Admission:
    def __init__(self, config: SemlineConfig, holder: str, router=None) -> None:
        """holder: this process's name at the router; router: its actor (default: found or
        started by its configured name)."""
        self.settings, self.admission_config = config.router, config.admission_config()
        self.router = router or self.connect()
        self.holder = holder
        self.held: dict[int, list] = {}  # ticket -> [ticket, lane, seats, key], as the router is told
        self.pending: set[str] = set()  # request ids whose admission is on its way
        self._sync_task: asyncio.Task | None = None

    def connect(self):
        return get_or_create_router(self.settings.actor_name, self.admission_config)

    async def admit(self, lane: str, seats: int = 1, priority: int = 0, deadline_s: float | None = None,
                    key: str | None = None) -> int:
        """Wait for the router's ticket for `seats` sequences; 429 when the lane's queue is full."""
        self._ensure_sync()
        for attempt in range(2):
            request_id = uuid.uuid4().hex
            self.pending.add(request_id)
            ref = self.call("acquire", lane, self.settings.queue_timeout_s, self.holder, request_id, seats, priority,
                            deadline_s, key)
            try:
                ticket = await ref
            except ray.exceptions.RayActorError as exc:
                # The router went away (with the replica that created it): find or start
                # a new one; the LLM servers re-register with it within a second.
                if attempt:
                    raise APIError(503, "the router is unavailable; retry", "server_error",
                                   code="router_unavailable") from exc
                self.router = self.connect()
                try:  # tell the new router at once what this process holds (it adopts it)
                    await self.call("sync", self.holder, list(self.held.values()), sorted(self.pending))
                except Exception as sync_exc:  # noqa: BLE001 - the periodic sync tries again
                    logger.debug("sync with the new router failed: %s", sync_exc)
                continue
            except BaseException as exc:
                if not isinstance(exc, (QueueFullError, DeadlineError, KeyLimitError)):
                    # The caller left (or the call failed): withdraw the request by name,
                    # whatever state it is in at the router (queued, granted with the
                    # answer on its way, or not arrived yet).
                    self.call("withdraw", request_id)
                if isinstance(exc, Exception):
                    raise to_api_error(exc) from exc
                raise
            finally:
                self.pending.discard(request_id)
            if ticket is None:  # withdrawn: only this process withdraws its requests, so never
                raise APIError(503, "admission was withdrawn; retry", "server_error")
            self.held[ticket] = [ticket, lane, seats, key]
            return ticket
        raise AssertionError("unreachable")

    def spent(self, key: str | None, tokens: int, seats: int = 1) -> None:
        """Count a request's tokens (of its `seats` sequences) at the router: against its key's
        per-minute limit, and its fair share (weighted fair queuing between keys)."""
        if key is not None and tokens > 0:
            self.call("record_tokens", key, tokens, seats)

    def release(self, ticket: int) -> None:
        self.held.pop(ticket, None)
        self.call("release", ticket)

    def call(self, method: str, *args):
        """Call the router outside the current request's Ray task: Ray cancels what a request
        submitted when the request is cancelled (a client that disconnects), and a cancelled
        call loses its result (a ticket) or its effect (a release). Giving up is explicit
        here instead (withdraw), so the router's calls must never be cancelled under it."""
        return contextvars.Context().run(getattr(self.router, method).remote, *args)

    def _ensure_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop(), context=contextvars.Context())

    async def _sync_loop(self) -> None:
        """Tell the router which tickets this process holds, every router.holder_sync_s."""
        while True:
            try:
                lost = await self.call("sync", self.holder, list(self.held.values()), sorted(self.pending))
                if lost:
                    logger.warning("the router reclaimed ticket(s) %s this process had lost", lost)
            except Exception as exc:  # noqa: BLE001 - a router restarting: the next admission reconnects
                logger.debug("ticket sync with the router failed: %s", exc)
            await asyncio.sleep(self.settings.holder_sync_s)


class LocalLimits:
    """Admission inside one process, where the caller has already limited the work (the Ray Data
    batch job: each actor runs the lines it is given): a tenant's limits, or this actor's share
    of them, are waited for, never refused (an offline job has no client to retry).

    max_inflight: sequences at once; tokens_per_minute: prompt and generated tokens counted in
    the last minute (spent). None: no limit."""

    router = None

    def __init__(self, max_inflight: int | None = None, tokens_per_minute: int | None = None) -> None:
        self.max_inflight, self.tokens_per_minute = max_inflight, tokens_per_minute
        self.tickets: dict[int, int] = {}  # ticket -> seats
        self.spent_log: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, tokens)
        self._next = 0
        self._changed: asyncio.Condition | None = None

    @property
    def inflight(self) -> int:
        return sum(self.tickets.values())

    def _room(self, seats: int) -> bool:
        if self.max_inflight is not None and self.inflight and self.inflight + seats > self.max_inflight:
            return False  # a request wider than the limit still runs, alone
        return self.tokens_per_minute is None or self.spent_last_minute() < self.tokens_per_minute

    def spent_last_minute(self) -> int:
        horizon = time.monotonic() - 60.0
        while self.spent_log and self.spent_log[0][0] < horizon:
            self.spent_log.popleft()
        return sum(tokens for _, tokens in self.spent_log)

    async def admit(self, lane: str, seats: int = 1, priority: int = 0, deadline_s: float | None = None,
                    key: str | None = None) -> int:
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            while not self._room(seats):
                wait = None
                if self.tokens_per_minute is not None and self.spent_log:  # the oldest tokens age out
                    wait = max(0.01, self.spent_log[0][0] + 60.0 - time.monotonic())
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except TimeoutError:
                    pass
            self._next += 1
            self.tickets[self._next] = seats
            return self._next

    def spent(self, key: str | None, tokens: int, seats: int = 1) -> None:
        if tokens > 0 and self.tokens_per_minute is not None:
            self.spent_log.append((time.monotonic(), tokens))

    def release(self, ticket: int) -> None:
        self.tickets.pop(ticket, None)
        if self._changed is not None:
            asyncio.get_running_loop().create_task(self._notify())  # released by a request of this loop

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

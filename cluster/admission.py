"""Priority admission control: the router's core, with no Ray in it.

Work is admitted to the LLM servers only while they have capacity, so a flood
of batch work never sits in front of a realtime request in some replica's
queue. Waiters queue per lane; whenever capacity frees, the dispatcher grants
tickets realtime lane first, FIFO within a lane, in batches (up to
`max_batch_size`, after waiting up to the lane's `batch_wait_ms` for a batch to
gather). A lane whose queue is full refuses at once (the HTTP layer answers 429).

A ticket is a seat: one leaked ticket is a seat gone for good. Holders (the
processes that acquire tickets) therefore name themselves and each request:
a caller that gives up withdraws its request by name (whether it is still
queued, already granted or not yet arrived), and each holder reports the
tickets it holds every few seconds (`reconcile`); a ticket its holder no
longer holds, or whose holder has gone silent, is reclaimed.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field

REALTIME_LANE, BATCH_LANE = "realtime", "batch"
LANES = (REALTIME_LANE, BATCH_LANE)  # in priority order
# Each lane's engine priority: the engine schedules lower numbers first.
LANE_PRIORITY = {REALTIME_LANE: 0, BATCH_LANE: 1}


def lane_of_priority(priority: int) -> str:
    """The lane a request of this engine priority came through (realtime only at 0)."""
    return REALTIME_LANE if priority == LANE_PRIORITY[REALTIME_LANE] else BATCH_LANE


class QueueFullError(Exception):
    """The lane's queue is full: retry after `retry_after_s` seconds."""

    def __init__(self, lane: str, retry_after_s: float) -> None:
        super().__init__(f"the {lane} queue is full; retry after {retry_after_s:.0f} s")
        self.lane = lane
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # crosses process boundaries (router actor -> ingress) intact
        return (QueueFullError, (self.lane, self.retry_after_s))


class DeadlineError(Exception):
    """A request's time-to-first-token deadline cannot be met at the current queue (`passed`
    False: refused at once, retry after `retry_after_s`), or passed while it waited (True)."""

    def __init__(self, message: str, passed: bool, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.passed, self.retry_after_s = passed, retry_after_s

    def __reduce__(self):
        return (DeadlineError, (str(self), self.passed, self.retry_after_s))


class KeyLimitError(Exception):
    """An API key is over its limit (requests in flight, or tokens in the last minute)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (KeyLimitError, (str(self), self.retry_after_s))


# The window of the per-key token limit (seconds).
TOKEN_WINDOW_S = 60.0
# The window over which realtime queue waits are reported to the autoscaler (seconds).
WAIT_WINDOW_S = 10.0
# How long a ticket is held, until the router has seen some (seconds): the first estimate
# of how long a queue takes to move.
DEFAULT_HOLD_S = 1.0


@dataclass
class AdmissionConfig:
    # Requests admitted to the LLM servers at once (all replicas together); the router
    # actor replaces it with the live replicas' capacity (set_capacity).
    max_inflight: int = 64
    # Waiters each lane may hold before refusing.
    max_queued: dict[str, int] = field(default_factory=lambda: {"realtime": 256, "batch": 4096})
    # How long the dispatcher lets a lane's batch gather before granting (milliseconds).
    batch_wait_ms: dict[str, float] = field(default_factory=lambda: {"realtime": 0.0, "batch": 20.0})
    # The largest share of max_inflight each lane and the lanes above it may hold at once.
    # Keeping the batch lane below 1.0 leaves seats free for realtime arrivals, so they are
    # admitted at once instead of waiting for a batch request to finish, and fewer
    # sequences per step keep each engine step, and so realtime latency, short.
    max_share: dict[str, float] = field(default_factory=lambda: {"realtime": 1.0, "batch": 0.5})
    # Most tickets granted in one dispatch.
    max_batch_size: int = 16
    # Retry-After suggested to refused clients (seconds).
    retry_after_s: float = 1.0
    # A holder that has not reported its tickets for this long is gone: its tickets return.
    holder_ttl_s: float = 30.0
    # A ticket granted less than this long ago is never reclaimed: its grant may still be
    # on the way to its holder.
    reclaim_grace_s: float = 10.0
    # Per API key (None: no limit): seats in flight or queued, and prompt + output tokens in
    # the last minute.
    key_max_inflight: int | None = None
    key_tokens_per_minute: int | None = None
    # Keys with limits of their own (a tenant's): key -> [max in flight, tokens per minute].
    key_limits: dict[str, list] = field(default_factory=dict)
    # Fair share between keys (tenants) within a lane and priority: key -> weight (default 1);
    # fair_share False: arrival order (what benchmarks/tenants.py compares against).
    key_weights: dict[str, float] = field(default_factory=dict)
    fair_share: bool = True
    # Seats beyond max_inflight a realtime request may take when its key has nothing in flight
    # (a light tenant does not wait for a flooder's request to end; the engine must have room).
    light_headroom: int = 0
    # A router restarted after a crash admits nothing for this long, while the holders
    # report the tickets they hold (a little more than their reporting period).
    recovery_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_inflight < 0 or self.max_batch_size < 1:
            raise ValueError("max_inflight must be >= 0 and max_batch_size >= 1")
        if any(not 0 < share <= 1 for share in self.max_share.values()):
            raise ValueError(f"max_share values must be in (0, 1], got {self.max_share}")
        for name in ("max_queued", "batch_wait_ms", "max_share"):
            unknown = set(getattr(self, name)) - set(LANES)
            if unknown or set(LANES) - set(getattr(self, name)):
                raise ValueError(f"{name} needs exactly the lanes {LANES}, got {sorted(getattr(self, name))}")


@dataclass
class _Waiter:
    ticket: int
    lane: str
    enqueued_at: float
    granted: asyncio.Future
    holder: str | None = None
    request_id: str | None = None
    seats: int = 1  # sequences the request runs (its n choices)
    priority: int = 0  # within its lane: lower first
    deadline: float | None = None  # monotonic time its first token is due by
    key: str | None = None  # the API key it came with (an id of it), for per-key limits

    def order(self) -> tuple:
        """Queue order within a lane: priority, then deadline (none last), then arrival."""
        return (self.priority, self.deadline if self.deadline is not None else float("inf"), self.ticket)

    def __lt__(self, other: "_Waiter") -> bool:
        return self.order() < other.order()


@dataclass
class _Grant:
    lane: str
    holder: str | None
    request_id: str | None
    granted_at: float
    seats: int = 1
    key: str | None = None


class AdmissionController:
    """Grants tickets; must be used from one event loop."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        # Each lane's waiters in grant order (_Waiter.order), kept sorted.
        self._queues: dict[str, list[_Waiter]] = {lane: [] for lane in LANES}
        self._hold_s: float | None = None  # moving average of how long a ticket is held
        self._key_tokens: dict[str, deque[tuple[float, int]]] = {}  # key -> (when, tokens) this minute
        self._inflight: dict[int, _Grant] = {}  # ticket -> its grant
        # Ticket numbers grow across restarts (microseconds at start), so a ticket of a
        # router that died never names a seat of the one that replaced it.
        self._tickets = itertools.count(time.time_ns() // 1000)
        self._waiting: dict[str, _Waiter] = {}  # request id -> its queued waiter
        self._granted: dict[str, int] = {}  # request id -> its ticket
        self._withdrawn: dict[str, float] = {}  # request ids withdrawn before they arrived
        self._holders: dict[str, float] = {}  # holder -> when it was last heard from
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        # (lane, ticket, newest ticket issued at that moment) in the order tickets were
        # granted: enough to check afterwards that no batch ticket was granted while a
        # realtime request waited (see violations_of_priority).
        self.grant_log: deque[tuple[str, int, int]] = deque(maxlen=10_000)
        self._last_ticket = 0
        self.num_rejected: dict[str, int] = {lane: 0 for lane in LANES}
        self.num_reclaimed = 0
        self.num_deadline_refused = 0  # refused at once: the queue could not meet the deadline
        self.num_deadline_missed = 0  # the deadline passed (before arrival, or while waiting)
        self.num_key_limited = 0  # refused: the API key was over its limits
        self.num_adopted = 0  # tickets of an earlier router that holders reported
        # (when, seconds waited) of recent realtime grants: the queue wait the autoscaler sees
        self._realtime_waits: deque[tuple[float, float]] = deque(maxlen=4096)
        self._paused_until = 0.0
        # Weighted fair queuing between keys (virtual token counters): tokens each key was
        # granted, over its weight; charged an estimate per seat at the grant, corrected when
        # the request's tokens are known (record_tokens).
        self._served: dict[str, float] = {}
        self._tokens_per_seat = 256.0  # moving average of the tokens a seat turned out to use

    # --- API -------------------------------------------------------------------

    async def acquire(self, lane: str, timeout_s: float | None = None, holder: str | None = None,
                      request_id: str | None = None, seats: int = 1, priority: int = 0,
                      deadline_s: float | None = None, key: str | None = None) -> int | None:
        """Wait for admission of a request that runs `seats` sequences (its n choices: each
        takes a seat of the capacity and of its lane's share); returns a ticket to release
        when the request ends, or None when the request was withdrawn (`withdraw(request_id)`)
        before it was granted. Within its lane, lower `priority` goes first, then the nearer
        deadline. `deadline_s`: its first token is due within that many seconds; a request
        the queue cannot admit in time is refused at once (DeadlineError), and one whose
        deadline passes while it waits gives up (DeadlineError, passed). `key`: the API key
        (an id of it) whose limits apply (KeyLimitError)."""
        if lane not in self._queues:
            raise ValueError(f"unknown lane {lane!r}; lanes are {LANES}")
        if seats < 1:
            raise ValueError(f"a request takes at least one seat, not {seats}")
        if holder is not None:
            self._holders[holder] = time.monotonic()
        if request_id is not None and self._withdrawn.pop(request_id, None) is not None:
            return None  # its caller gave up before the request got here
        if key is not None:
            self._check_key(key, seats)
        queue = self._queues[lane]
        # The queue limit counts requests that must wait: those the free seats will take at
        # once pass through, so max_queued 0 means "admit now or refuse".
        waiting = len(queue) - max(0, min(self._capacity(), self._lane_room(lane)))
        if waiting >= self.config.max_queued[lane]:
            self.num_rejected[lane] += 1
            raise QueueFullError(lane, self.config.retry_after_s)
        now = time.monotonic()
        deadline = None if deadline_s is None else now + deadline_s
        waiter = _Waiter(next(self._tickets), lane, now, asyncio.get_running_loop().create_future(),
                         holder, request_id, seats, priority, deadline, key)
        if deadline is not None:
            self._check_deadline(waiter)
        self._ensure_dispatcher()
        self._last_ticket = waiter.ticket
        self._level(key or "")
        bisect.insort(queue, waiter)
        if request_id is not None:
            self._waiting[request_id] = waiter
        self._wakeup.set()
        wait_s = timeout_s
        if deadline is not None:
            wait_s = deadline - now if wait_s is None else min(wait_s, deadline - now)
        try:
            ticket = await asyncio.wait_for(asyncio.shield(waiter.granted), wait_s)
            if ticket is not None and asyncio.current_task().cancelling():
                # Cancelled just as it was granted (wait_for then returns the result): the
                # canceller will not see the ticket, so it must not stay taken.
                raise asyncio.CancelledError
            return ticket
        except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
            self._withdraw(waiter)
            if isinstance(exc, asyncio.TimeoutError) and deadline is not None and time.monotonic() >= deadline:
                self.num_deadline_missed += 1
                raise DeadlineError(f"the request's deadline ({deadline_s:.3f} s) passed while it waited for "
                                    "admission", passed=True) from None
            raise
        finally:
            if request_id is not None:
                self._waiting.pop(request_id, None)

    def record_tokens(self, key: str | None, tokens: int, seats: int = 1) -> None:
        """A request of `key` for `seats` sequences used `tokens` (prompt and output): counted
        for a minute (tokens_per_minute), and its fair-share charge corrected."""
        if key is not None and self._limits(key)[1] is not None and tokens > 0:
            self._key_tokens.setdefault(key, deque()).append((time.monotonic(), tokens))
        bucket = key or ""
        if bucket in self._served:
            self._served[bucket] += (tokens - seats * self._tokens_per_seat) / self._weight(bucket)
        self._tokens_per_seat = 0.9 * self._tokens_per_seat + 0.1 * max(1.0, tokens / max(1, seats))

    def realtime_queue_wait(self, window_s: float = WAIT_WINDOW_S) -> float:
        """How long realtime requests wait for admission now: the 90th percentile of the waits
        granted in the last `window_s`, or the oldest waiter's age if that is longer (a queue
        that grants nothing has no recent waits)."""
        now = time.monotonic()
        while self._realtime_waits and now - self._realtime_waits[0][0] > window_s:
            self._realtime_waits.popleft()
        waits = sorted(wait for _, wait in self._realtime_waits)
        p90 = waits[min(len(waits) - 1, int(0.9 * len(waits)))] if waits else 0.0
        queue = self._queues[REALTIME_LANE]
        oldest = max((now - w.enqueued_at for w in queue if not w.granted.done()), default=0.0)
        return max(p90, oldest)

    def _limits(self, key: str) -> tuple[int | None, int | None]:
        """(sequences in flight, tokens per minute) allowed to `key`: its own, or every key's."""
        own = self.config.key_limits.get(key)
        if own is not None:
            return (own[0] if own[0] is not None else self.config.key_max_inflight,
                    own[1] if own[1] is not None else self.config.key_tokens_per_minute)
        return self.config.key_max_inflight, self.config.key_tokens_per_minute

    def _check_key(self, key: str, seats: int) -> None:
        limit, budget = self._limits(key)
        who = f"tenant {key[7:]!r}" if key.startswith("tenant:") else "this API key"
        if limit is not None:
            used = sum(g.seats for g in self._inflight.values() if g.key == key) + sum(
                w.seats for queue in self._queues.values() for w in queue if w.key == key)
            if used + seats > limit:
                self.num_key_limited += 1
                raise KeyLimitError(f"{who} has {used} sequences in flight or queued; its limit is {limit}",
                                    self.config.retry_after_s)
        if budget is not None:
            window, now = self._key_tokens.get(key, deque()), time.monotonic()
            while window and now - window[0][0] > TOKEN_WINDOW_S:
                window.popleft()
            if not window:
                self._key_tokens.pop(key, None)
            used = sum(tokens for _, tokens in window)
            if used >= budget:
                self.num_key_limited += 1
                raise KeyLimitError(f"{who} used {used} tokens in the last minute; its limit is {budget}",
                                    max(self.config.retry_after_s, TOKEN_WINDOW_S - (now - window[0][0])))

    def _check_deadline(self, waiter: _Waiter) -> None:
        """Refuse now a request whose deadline the queue ahead of it cannot meet: the seats
        taken and waiting ahead of it (its lane and the lanes above, at its priority or
        better), over the capacity, times how long a ticket is held."""
        remaining = waiter.deadline - time.monotonic()
        if remaining <= 0:  # a relative deadline this short cannot be met: refused like one the queue cannot meet
            self.num_deadline_refused += 1
            raise DeadlineError("the request's deadline is over before it could be admitted", passed=False,
                                retry_after_s=self.config.retry_after_s)
        need = self._seats(waiter)
        if self._capacity() >= need and self._lane_room(waiter.lane) >= need and not self._queues[waiter.lane]:
            return  # admitted at once
        ahead = sum(w.seats for lane in LANES[:LANES.index(waiter.lane) + 1] for w in self._queues[lane]
                    if lane != waiter.lane or not waiter < w)
        capacity = max(1, self.config.max_inflight)
        hold = self._hold_s if self._hold_s is not None else DEFAULT_HOLD_S
        estimate = (ahead // capacity + 1) * hold
        if estimate > remaining:
            self.num_deadline_refused += 1
            raise DeadlineError(f"the request cannot be admitted within its deadline ({remaining:.3f} s left; "
                                f"the queue ahead takes ~{estimate:.1f} s)", passed=False,
                                retry_after_s=max(self.config.retry_after_s, estimate))

    def release(self, ticket: int) -> None:
        grant = self._inflight.pop(ticket, None)
        if grant is not None:
            held = time.monotonic() - grant.granted_at
            self._hold_s = held if self._hold_s is None else 0.8 * self._hold_s + 0.2 * held
            if grant.request_id is not None:
                self._granted.pop(grant.request_id, None)
            self._wakeup.set()

    def withdraw(self, request_id: str) -> None:
        """The caller of `request_id` gave up: take it out of its queue (its acquire returns
        None), or release its ticket if it was granted, or refuse it when it arrives."""
        waiter = self._waiting.pop(request_id, None)
        if waiter is not None:
            if not waiter.granted.done():
                waiter.granted.set_result(None)  # its acquire returns None
            self._withdraw(waiter)
            return
        ticket = self._granted.get(request_id)
        if ticket is not None:
            self.release(ticket)
            return
        now = time.monotonic()
        self._withdrawn[request_id] = now
        while len(self._withdrawn) > 10_000 or (self._withdrawn and now - next(iter(self._withdrawn.values()))
                                                 > self.config.holder_ttl_s):
            del self._withdrawn[next(iter(self._withdrawn))]

    def reconcile(self, holder: str, held, pending=()) -> list[int]:
        """`holder` holds exactly the tickets `held` and still awaits the answers to the
        requests `pending`: reclaim the other tickets granted to it (once past the grace
        period: a grant whose answer is slow to arrive is still pending), and note that the
        holder is alive. Returns the tickets reclaimed.

        `held` lists ticket numbers, or [ticket, lane, seats, key] entries: a ticket this
        controller does not know (granted by a router that died before it) is adopted, so a
        router that replaces another counts the work still in flight and does not over-admit."""
        now = time.monotonic()
        self._holders[holder] = now
        entries = [entry if isinstance(entry, (list, tuple)) else [entry, None, 1, None] for entry in held]
        for ticket, lane, seats, key in entries:
            if ticket not in self._inflight and lane in LANES:
                self._inflight[ticket] = _Grant(lane, holder, None, now, max(1, int(seats)), key)
                self.num_adopted += 1
        held, pending, grace = {entry[0] for entry in entries}, set(pending), self.config.reclaim_grace_s
        lost = [ticket for ticket, grant in self._inflight.items()
                if grant.holder == holder and ticket not in held and grant.request_id not in pending
                and now - grant.granted_at > grace]
        self._reclaim(lost)
        return lost

    def pause(self, seconds: float) -> None:
        """Grant nothing for `seconds`: a router restarted after a crash lets the holders
        report the tickets they hold (reconcile) before it admits more."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def expire_holders(self) -> dict[str, list[int]]:
        """Reclaim every ticket of holders silent for holder_ttl_s, and drop the requests they
        still have queued (nobody would take the ticket: it would be a seat lost for good):
        {holder: tickets}."""
        now = time.monotonic()
        gone = [holder for holder, seen in self._holders.items() if now - seen > self.config.holder_ttl_s]
        reclaimed = {}
        for holder in gone:
            del self._holders[holder]
            for queue in self._queues.values():
                for waiter in [w for w in queue if w.holder == holder]:
                    queue.remove(waiter)
                    if not waiter.granted.done():
                        waiter.granted.set_result(None)
            tickets = [ticket for ticket, grant in self._inflight.items() if grant.holder == holder]
            self._reclaim(tickets)
            if tickets:
                reclaimed[holder] = tickets
        return reclaimed

    def _reclaim(self, tickets: list[int]) -> None:
        for ticket in tickets:
            self.release(ticket)
        self.num_reclaimed += len(tickets)

    def set_capacity(self, max_inflight: int) -> None:
        """Change how many requests may be in flight (replicas came or went)."""
        if max_inflight != self.config.max_inflight:
            self.config.max_inflight = max(0, max_inflight)
            self._wakeup.set()

    def stats(self) -> dict:
        return {"inflight": self.config.max_inflight - self._capacity(), "requests_inflight": len(self._inflight),
                "capacity": self.config.max_inflight,
                "inflight_by_lane": {lane: self._lane_inflight(lane) for lane in LANES},
                "queued": {lane: len(q) for lane, q in self._queues.items()},
                "rejected": dict(self.num_rejected), "reclaimed": self.num_reclaimed,
                "deadline_refused": self.num_deadline_refused, "deadline_missed": self.num_deadline_missed,
                "key_limited": self.num_key_limited, "adopted": self.num_adopted,
                "realtime_queue_wait_s": self.realtime_queue_wait(),
                "holders": len(self._holders)}

    def _weight(self, bucket: str) -> float:
        return self.config.key_weights.get(bucket, 1.0)

    def _fair_head(self, queue: list[_Waiter]) -> _Waiter:
        """The waiter granted next in a lane: among those at the head's priority (and without
        a deadline, which go first in deadline order), the one of the key served least for
        its weight (virtual token counters), then the one with less in flight, then the earliest."""
        head = queue[0]
        if head.deadline is not None or len(queue) == 1:
            return head
        served, running = self._served, Counter(g.key or "" for g in self._inflight.values())
        candidates = (w for w in queue if w.priority == head.priority and w.deadline is None and not w.granted.done())
        # Level counters (a key just come back): the one with less in flight first.
        return min(candidates, key=lambda w: (served.get(w.key or "", 0.0), running[w.key or ""], w.ticket))

    def _level(self, bucket: str) -> None:
        """A key that had nothing queued or in flight starts one request's tokens (the average
        a seat used) below the least served active key: it banks none of the time it was idle,
        and its request goes before another key's backlog. (Level with it, a key that sends one
        request at a time came back each time a little above the flooder, whose grants are
        charged in advance, and waited for the flooder's next grant.)"""
        active = {g.key or "" for g in self._inflight.values()} | {w.key or "" for q in self._queues.values()
                                                                   for w in q}
        if bucket not in active and active:
            floor = min(self._served.get(k, 0.0) for k in active) - self._tokens_per_seat / self._weight(bucket)
            self._served[bucket] = max(self._served.get(bucket, 0.0), floor)

    def waiting(self, lane: str) -> list[int]:
        """The tickets of the lane's requests still queued (for violations_of_priority)."""
        return [w.ticket for w in self._queues[lane] if not w.granted.done()]

    # --- the dispatcher -------------------------------------------------------------

    def _withdraw(self, waiter: _Waiter) -> None:
        """A waiter that gave up: out of its queue, and its ticket back if it was granted meanwhile."""
        if waiter in self._queues[waiter.lane]:
            self._queues[waiter.lane].remove(waiter)
        granted = waiter.granted
        if granted.done() and not granted.cancelled() and granted.result() is not None:
            self.release(granted.result())

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if time.monotonic() < self._paused_until:
                await asyncio.sleep(self._paused_until - time.monotonic())
            while (self._capacity() > 0 or self.config.light_headroom) and self._next_lane() is not None:
                await self._gather(self._next_lane())
                if not self._grant_batch():  # the heads need more seats than are free: wait for releases
                    break

    def _capacity(self) -> int:
        return self.config.max_inflight - sum(grant.seats for grant in self._inflight.values())

    def _lane_inflight(self, lane: str) -> int:
        return sum(grant.seats for grant in self._inflight.values() if grant.lane == lane)

    def _seats(self, waiter: _Waiter) -> int:
        """Seats a waiter takes: its sequences, but never more than its lane's whole share (a
        request wider than the cluster still runs, alone)."""
        return max(1, min(waiter.seats, int(self.config.max_inflight * self.config.max_share[waiter.lane])))

    def _lane_room(self, lane: str) -> int:
        """Seats the lane may still take under its share. Lower lanes share their seats with
        the lanes above them (realtime work in flight shrinks the batch lane's room, down
        to one seat), so the batch lane only fills capacity that realtime leaves idle."""
        cap = int(self.config.max_inflight * self.config.max_share[lane])
        above = sum(self._lane_inflight(other) for other in LANES[:LANES.index(lane)])
        return max(1, cap - above) - self._lane_inflight(lane)

    def _next_lane(self) -> str | None:
        return next((lane for lane in LANES if self._queues[lane] and (
            self._lane_room(lane) > 0 or (lane == REALTIME_LANE and self.config.light_headroom))), None)

    def _headroom(self, waiter: _Waiter, seats: int) -> int:
        """Seats beyond the capacity this realtime waiter may take: light_headroom, less what is
        already taken beyond it, when its key has nothing in flight."""
        if not self.config.light_headroom or waiter.lane != REALTIME_LANE:
            return 0
        if any(g.key == waiter.key for g in self._inflight.values()):
            return 0
        return max(0, self.config.light_headroom - max(0, -seats))

    def _light_waiter(self, queue: list[_Waiter], seats: int) -> _Waiter | None:
        """The first waiter of the queue whose key has nothing in flight and that fits in the
        light headroom, or None. Only when no seat is free: free seats are held for the head."""
        if seats > 0:
            return None
        return next((w for w in queue if not w.granted.done() and self._seats(w) <= seats + self._headroom(w, seats)),
                    None)

    async def _gather(self, lane: str) -> None:
        """Let a batch gather for up to the lane's wait, unless it is already full."""
        wait_s = self.config.batch_wait_ms[lane] / 1000
        oldest = self._queues[lane][0].enqueued_at
        remaining = oldest + wait_s - time.monotonic()
        if remaining > 0 and len(self._queues[lane]) < self.config.max_batch_size:
            await asyncio.sleep(remaining)

    def _grant_batch(self) -> int:
        """Grant up to max_batch_size tickets within capacity (in seats), best lane first, each
        lane in arrival order (a wide request at the head waits for its seats; none behind it
        passes it, and no lane below it takes the seats it waits for: they are held for it as
        they free up); returns how many were granted."""
        seats, tickets = self._capacity(), self.config.max_batch_size
        for lane in LANES:
            queue = self._queues[lane]
            room = self._lane_room(lane)
            while tickets > 0 and queue:
                if queue[0].granted.done():  # cancelled while queued
                    queue.pop(0)
                    continue
                waiter = self._fair_head(queue) if self.config.fair_share else queue[0]
                need = self._seats(waiter)
                extra = self._headroom(waiter, seats)
                if need > seats + extra:
                    # Held for this head: the lanes below get none of them. Seats beyond the
                    # capacity are another matter: a light key's request takes one whoever's turn it is.
                    waiter = self._light_waiter(queue, seats)
                    if waiter is None:
                        return self.config.max_batch_size - tickets
                    need, extra = self._seats(waiter), self._headroom(waiter, seats)
                if need > room + extra:
                    break
                queue.remove(waiter)
                bucket = waiter.key or ""
                self._served[bucket] = self._served.get(bucket, 0.0) + need * self._tokens_per_seat / self._weight(
                    bucket)
                self._inflight[waiter.ticket] = _Grant(lane, waiter.holder, waiter.request_id, time.monotonic(),
                                                       need, waiter.key)
                if waiter.request_id is not None:
                    self._granted[waiter.request_id] = waiter.ticket
                self.grant_log.append((lane, waiter.ticket, self._last_ticket))
                if lane == REALTIME_LANE:
                    now = time.monotonic()
                    self._realtime_waits.append((now, now - waiter.enqueued_at))
                waiter.granted.set_result(waiter.ticket)
                seats -= need
                room -= need
                tickets -= 1
        return self.config.max_batch_size - tickets


def violations_of_priority(grant_log, waiting: list[int] = ()) -> list[tuple[int, int]]:
    """(batch ticket, realtime ticket) pairs where a batch ticket was granted while the
    realtime request already waited: it had a ticket then and was granted later, or is still
    waiting (`waiting`: the realtime tickets queued now, AdmissionController.waiting)."""
    granted_at = {(lane, ticket): i for i, (lane, ticket, _) in enumerate(grant_log)}
    violations = []
    for i, (lane, ticket, newest) in enumerate(grant_log):
        if lane != "batch":
            continue
        for (other_lane, other), j in granted_at.items():
            if other_lane == "realtime" and other <= newest and j > i:
                violations.append((ticket, other))
        violations += [(ticket, other) for other in waiting if other <= newest]
    return violations

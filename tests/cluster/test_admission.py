"""The router's admission control, alone: capacity, lane priority, FIFO, refusal, batching."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.admission import AdmissionConfig, AdmissionController, QueueFullError, violations_of_priority


def _controller(**overrides) -> AdmissionController:
    values = {"max_inflight": 1, "max_batch_size": 1, "max_share": {"realtime": 1.0, "batch": 1.0},
              "batch_wait_ms": {"realtime": 0.0, "batch": 0.0}, **overrides}
    return AdmissionController(AdmissionConfig(**values))


def test_capacity_bounds_inflight_and_release_admits_next():
    async def main():
        ctl = _controller(max_inflight=2, max_batch_size=4)
        first, second = await ctl.acquire("batch"), await ctl.acquire("batch")
        third = asyncio.create_task(ctl.acquire("batch"))
        await asyncio.sleep(0.05)
        assert not third.done() and ctl.stats()["inflight"] == 2
        ctl.release(first)
        assert await asyncio.wait_for(third, 1) not in (first, second)
        assert ctl.stats()["inflight"] == 2

    asyncio.run(main())


def test_a_request_takes_a_seat_per_sequence():
    """n choices take n seats of the capacity and of the lane's share; a wide request at the
    head of its lane waits for its seats (none behind it passes it), and one wider than the
    lane's share still runs, taking the whole share."""
    async def main():
        ctl = _controller(max_inflight=4, max_batch_size=8, max_share={"realtime": 1.0, "batch": 0.5})
        wide = await ctl.acquire("realtime", seats=3)
        assert ctl.stats()["inflight"] == 3 and ctl.stats()["requests_inflight"] == 1
        two = asyncio.create_task(ctl.acquire("realtime", seats=2))
        one = asyncio.create_task(ctl.acquire("realtime"))
        await asyncio.sleep(0.05)
        assert not two.done() and not one.done()  # FIFO: the single-seat request does not pass
        ctl.release(wide)
        granted = [await asyncio.wait_for(t, 1) for t in (two, one)]
        assert ctl.stats()["inflight"] == 3
        for ticket in granted:
            ctl.release(ticket)
        # The batch lane's share (2 of 4 seats) is counted in sequences too; 8 choices take it all.
        batch = await asyncio.wait_for(ctl.acquire("batch", seats=8), 1)
        assert ctl.stats()["inflight_by_lane"]["batch"] == 2
        more = asyncio.create_task(ctl.acquire("batch"))
        await asyncio.sleep(0.05)
        assert not more.done()
        ctl.release(batch)
        ctl.release(await asyncio.wait_for(more, 1))
        with pytest.raises(ValueError, match="at least one seat"):
            await ctl.acquire("realtime", seats=0)

    asyncio.run(main())


def test_waiting_realtime_is_granted_before_waiting_batch():
    async def main():
        ctl = _controller()
        held = await ctl.acquire("batch")
        waiters = [asyncio.create_task(ctl.acquire(lane)) for lane in ("batch", "batch", "realtime", "realtime")]
        await asyncio.sleep(0.02)
        for _ in waiters:  # free one seat at a time
            ctl.release(held)
            done, _ = await asyncio.wait([w for w in waiters if not w.done()],
                                         return_when=asyncio.FIRST_COMPLETED)
            held = done.pop().result()
        lanes = [lane for lane, _, _ in ctl.grant_log][1:]
        assert lanes == ["realtime", "realtime", "batch", "batch"]
        tickets = [t for _, t, _ in ctl.grant_log][1:]
        assert tickets[:2] == sorted(tickets[:2]) and tickets[2:] == sorted(tickets[2:])  # FIFO per lane
        assert violations_of_priority(ctl.grant_log) == []

    asyncio.run(main())


def test_batch_lane_keeps_to_its_share_and_leaves_seats_for_realtime():
    async def main():
        ctl = _controller(max_inflight=4, max_batch_size=8, max_share={"realtime": 1.0, "batch": 0.5})
        batch = [asyncio.create_task(ctl.acquire("batch")) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert sum(t.done() for t in batch) == 2 and ctl.stats()["queued"]["batch"] == 2
        realtime = [await asyncio.wait_for(ctl.acquire("realtime"), 1) for _ in range(2)]  # admitted at once
        assert ctl.stats()["inflight"] == 4
        ctl.release(realtime[0])  # a realtime seat frees: batch stays at its share
        await asyncio.sleep(0.05)
        assert sum(t.done() for t in batch) == 2
        ctl.release(next(t for t in batch if t.done()).result())
        await asyncio.sleep(0.05)  # realtime in flight shares the batch lane's seats
        assert sum(t.done() for t in batch) == 2 and ctl.stats()["inflight_by_lane"] == {"realtime": 1, "batch": 1}
        ctl.release(realtime[1])  # realtime idle: the batch lane gets its whole share back
        await asyncio.sleep(0.05)
        assert sum(t.done() for t in batch) == 3
        ctl.set_capacity(8)  # a replica joined: the share grows with it
        await asyncio.sleep(0.05)
        assert all(t.done() for t in batch)

    asyncio.run(main())


def test_priority_violations_are_detected_from_the_grant_log():
    # batch ticket 2 granted when ticket 3 (realtime) already waited: one violation
    log = [("batch", 1, 1), ("batch", 2, 3), ("realtime", 3, 3)]
    assert violations_of_priority(log) == [(2, 3)]
    assert violations_of_priority([("realtime", 3, 3), ("batch", 2, 3)]) == []


def test_a_wide_realtime_request_is_not_starved_by_batch_grants():
    """At capacity 4, with batch work in flight and more queued, a realtime request for 4
    sequences gets the seats as they free up: no batch request behind it is granted one
    (before, each freed seat went to the next batch line and it waited forever), and the
    violation check sees a realtime request that is still waiting."""
    async def main():
        ctl = _controller(max_inflight=4, max_batch_size=8)
        running = [await ctl.acquire("batch") for _ in range(4)]
        queued = [asyncio.create_task(ctl.acquire("batch")) for _ in range(5)]
        await asyncio.sleep(0.02)
        wide = asyncio.create_task(ctl.acquire("realtime", seats=4))
        await asyncio.sleep(0.02)
        for ticket in running[:3]:  # three seats free: held for the wide request's head
            ctl.release(ticket)
            await asyncio.sleep(0.02)
        assert not wide.done() and not any(t.done() for t in queued)
        assert violations_of_priority(ctl.grant_log, ctl.waiting("realtime")) == []
        ctl.release(running[3])
        ticket = await asyncio.wait_for(wide, 1)
        assert ctl.stats()["inflight"] == 4 and not any(t.done() for t in queued)
        ctl.release(ticket)
        granted = await asyncio.wait_for(asyncio.gather(*queued[:4]), 1)  # then the batch lane, in order
        ctl.release(granted[0])
        await asyncio.wait_for(queued[4], 1)
        assert violations_of_priority(ctl.grant_log) == []
        # The check sees a waiting realtime request passed over: a batch grant after its ticket.
        log = [("batch", 1, 1), ("batch", 3, 3)]
        assert violations_of_priority(log, waiting=[2]) == [(3, 2)]

    asyncio.run(main())


def test_a_light_key_goes_before_a_flooders_backlog():
    """Within a lane and priority, seats go to the key served least (weighted fair queuing):
    a key that floods the lane gets its share, and another key's request, sent while the
    flood is queued, is granted at the next free seat, not after the backlog."""
    async def main():
        ctl = _controller(max_inflight=4, max_batch_size=8)
        flood = [asyncio.create_task(ctl.acquire("realtime", key="a")) for _ in range(32)]
        await asyncio.sleep(0.02)
        light = asyncio.create_task(ctl.acquire("realtime", key="b"))
        await asyncio.sleep(0.02)
        running = [t.result() for t in flood if t.done()]
        assert len(running) == 4 and not light.done()
        ctl.release(running[0])
        assert await asyncio.wait_for(light, 1) is not None  # the next seat, before a's 28 queued
        assert sum(t.done() for t in flood) == 4
        for task in flood + [light]:
            task.cancel()

    asyncio.run(main())


def test_a_key_sending_one_request_at_a_time_goes_first_each_time():
    """A light key that sends its next request when the last one ends goes before the
    flooder's backlog every time, not only the first: at the next free seat, and at once with
    light_headroom (whoever's turn it is among the full capacity's seats)."""
    async def main(headroom: int):
        ctl = _controller(max_inflight=4, max_batch_size=8, light_headroom=headroom)
        flood = [asyncio.create_task(ctl.acquire("realtime", key="a")) for _ in range(32)]
        await asyncio.sleep(0.02)
        for i in range(4):
            light = asyncio.create_task(ctl.acquire("realtime", key="b"))
            await asyncio.sleep(0.02)
            if not headroom:
                assert not light.done()
                ctl.release(next(t.result() for t in flood if t.done() and t.result() in ctl._inflight))
                await asyncio.sleep(0.02)
            assert light.done(), f"b's request {i} waits behind a's backlog"
            ctl.record_tokens("b", 50)  # a short answer: far less than the flood's requests
            ctl.release(light.result())
            await asyncio.sleep(0.02)
            assert sum(t.done() for t in flood) == 4 + (0 if headroom else i + 1)  # a: the seats b gave back
        for task in flood:
            task.cancel()

    asyncio.run(main(0))
    asyncio.run(main(1))


def test_the_light_headroom_never_takes_seats_held_for_a_wide_head():
    """Seats that free up while a wide realtime request waits are held for it, even from a
    light key: the headroom is only for seats beyond the capacity, taken when none is free."""
    async def main():
        ctl = _controller(max_inflight=4, max_batch_size=8, light_headroom=1)
        # Key w has a sequence in flight (no headroom for it) and asks for four more.
        running = [await ctl.acquire("realtime", key="a") for _ in range(3)] + [await ctl.acquire("realtime", key="w")]
        wide = asyncio.create_task(ctl.acquire("realtime", seats=4, key="w", priority=-1))
        await asyncio.sleep(0.02)
        for ticket in running[:3]:  # three seats free: held for the wide request
            ctl.release(ticket)
        light = asyncio.create_task(ctl.acquire("realtime", key="b"))
        await asyncio.sleep(0.02)
        assert not wide.done() and not light.done() and ctl.stats()["inflight"] == 1
        ctl.release(running[3])
        await asyncio.wait_for(wide, 1)  # all four seats: then the light key's beyond them
        assert await asyncio.wait_for(light, 1) is not None and ctl.stats()["inflight"] == 5

    asyncio.run(main())


def test_light_headroom_lets_an_idle_key_in_at_once():
    """light_headroom: a realtime request of a key with nothing in flight takes a seat beyond
    the capacity at once (the flooder's requests still wait for theirs); one at a time."""
    async def main():
        ctl = _controller(max_inflight=4, max_batch_size=8, light_headroom=1)
        flood = [asyncio.create_task(ctl.acquire("realtime", key="a")) for _ in range(12)]
        await asyncio.sleep(0.02)
        assert sum(t.done() for t in flood) == 4
        light = await asyncio.wait_for(ctl.acquire("realtime", key="b"), 1)  # no seat freed
        second = asyncio.create_task(ctl.acquire("realtime", key="c"))
        await asyncio.sleep(0.02)
        assert not second.done() and sum(t.done() for t in flood) == 4  # the headroom is taken
        ctl.release(light)
        assert await asyncio.wait_for(second, 1) is not None
        assert sum(t.done() for t in flood) == 4
        for task in flood:
            task.cancel()

    asyncio.run(main())


def test_weights_share_the_tokens_granted():
    """Two keys flooding one seat with weights 3 and 1 get tokens in a 3:1 ratio."""
    async def main():
        ctl = _controller(max_inflight=1, max_batch_size=1, key_weights={"heavy": 3.0, "light": 1.0})
        waiting = {key: [asyncio.create_task(ctl.acquire("batch", key=key)) for _ in range(60)]
                   for key in ("heavy", "light")}
        tokens = {"heavy": 0, "light": 0}
        for _ in range(60):
            await asyncio.sleep(0.005)  # the dispatcher grants the one seat
            done = [(key, t) for key, tasks in waiting.items() for t in tasks if t.done()]
            key, task = done[0]
            waiting[key].remove(task)
            used = 100 if key == "heavy" else 120  # a request's tokens need not be the estimate
            tokens[key] += used
            ctl.record_tokens(key, used, seats=1)
            ctl.release(task.result())
        assert 2.7 <= tokens["heavy"] / tokens["light"] <= 3.3, tokens
        for tasks in waiting.values():
            for task in tasks:
                task.cancel()

    asyncio.run(main())


def test_full_lane_refuses_at_once_with_retry_after():
    async def main():
        ctl = _controller(max_queued={"realtime": 1, "batch": 2}, retry_after_s=3)
        held = await ctl.acquire("realtime")
        queued = [asyncio.create_task(ctl.acquire("batch")) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as info:
            await ctl.acquire("batch")
        assert info.value.retry_after_s == 3 and ctl.stats()["rejected"]["batch"] == 1
        ctl.release(held)
        for task in queued:
            ctl.release(await task)

    asyncio.run(main())


def test_timed_out_waiter_leaves_the_queue():
    async def main():
        ctl = _controller()
        held = await ctl.acquire("batch")
        with pytest.raises(asyncio.TimeoutError):
            await ctl.acquire("realtime", timeout_s=0.05)
        assert ctl.stats()["queued"] == {"realtime": 0, "batch": 0}
        ctl.release(held)
        assert ctl.stats()["inflight"] == 0

    asyncio.run(main())


def test_batch_lane_gathers_then_dispatches_together():
    async def main():
        ctl = _controller(max_inflight=8, max_batch_size=4, batch_wait_ms={"realtime": 0.0, "batch": 80.0})
        start = time.monotonic()
        tasks = []
        for _ in range(3):
            tasks.append(asyncio.create_task(ctl.acquire("batch")))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert time.monotonic() - start >= 0.07  # waited for the batch to gather
        assert len(ctl.grant_log) == 3
        # A realtime request does not wait for a batch to gather.
        quick = time.monotonic()
        await ctl.acquire("realtime")
        assert time.monotonic() - quick < 0.05

    asyncio.run(main())


def test_config_names_lanes():
    with pytest.raises(ValueError, match="lanes"):
        AdmissionConfig(max_queued={"realtime": 1})


def test_queue_full_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(QueueFullError("batch", 2.5)))
    assert error.lane == "batch" and error.retry_after_s == 2.5 and "batch" in str(error)


def test_an_empty_queue_limit_admits_or_refuses_at_once():
    """max_queued 0: a request that finds a free seat is admitted, one that would wait is refused."""
    async def main():
        ctl = _controller(max_inflight=2, max_queued={"realtime": 0, "batch": 0})
        first = await asyncio.wait_for(ctl.acquire("realtime"), 1)
        await asyncio.wait_for(ctl.acquire("realtime"), 1)
        with pytest.raises(QueueFullError):
            await ctl.acquire("realtime")
        ctl.release(first)
        await asyncio.wait_for(ctl.acquire("realtime"), 1)

    asyncio.run(main())


def test_a_withdrawn_request_leaves_no_seat_taken_whenever_it_is_withdrawn():
    async def main():
        ctl = _controller()
        held = await ctl.acquire("batch", holder="h", request_id="first")
        # Withdrawn while queued: its acquire returns None, the queue empties.
        queued = asyncio.create_task(ctl.acquire("batch", holder="h", request_id="queued"))
        await asyncio.sleep(0.02)
        ctl.withdraw("queued")
        assert await asyncio.wait_for(queued, 1) is None
        assert ctl.stats()["queued"]["batch"] == 0
        # Withdrawn after it was granted (the grant was on its way back): the seat returns.
        ctl.withdraw("first")
        assert ctl.stats()["inflight"] == 0
        ctl.release(held)  # the holder's own release, arriving later, changes nothing
        # Withdrawn before the request itself arrived: refused on arrival, no seat taken.
        ctl.withdraw("early")
        assert await ctl.acquire("batch", holder="h", request_id="early") is None
        assert ctl.stats()["inflight"] == 0
        assert await ctl.acquire("batch", holder="h", request_id="late") is not None

    asyncio.run(main())


def test_granted_then_withdrawn_before_the_acquire_resumed_frees_the_seat():
    async def main():
        ctl = _controller()
        held = await ctl.acquire("realtime")
        waiter = asyncio.create_task(ctl.acquire("realtime", holder="h", request_id="r"))
        await asyncio.sleep(0.02)
        ctl.release(held)
        while ctl.stats()["queued"]["realtime"]:  # until the dispatcher grants "r"
            await asyncio.sleep(0)
        assert not waiter.done() and ctl.stats()["inflight"] == 1  # granted, its acquire not resumed
        ctl.withdraw("r")
        assert await asyncio.wait_for(waiter, 1) is not None
        assert ctl.stats()["inflight"] == 0

    asyncio.run(main())


def test_tickets_a_holder_no_longer_holds_are_reclaimed_after_the_grace_period():
    async def main():
        ctl = _controller(max_inflight=4, max_batch_size=4, reclaim_grace_s=0.1)
        kept, lost = await ctl.acquire("batch", holder="h"), await ctl.acquire("batch", holder="h")
        slow = await ctl.acquire("batch", holder="h", request_id="slow")  # its answer is still on its way
        other = await ctl.acquire("batch", holder="other")
        assert ctl.reconcile("h", [kept], pending=["slow"]) == []  # within the grace period
        await asyncio.sleep(0.15)
        assert ctl.reconcile("h", [kept], pending=["slow"]) == [lost]
        assert ctl.stats()["inflight"] == 3 and ctl.stats()["reclaimed"] == 1
        assert ctl.reconcile("h", [kept]) == [slow]  # no longer pending, not held: lost too
        for ticket in (kept, other):
            ctl.release(ticket)
        assert ctl.stats()["inflight"] == 0

    asyncio.run(main())


def test_a_silent_holder_loses_its_tickets_and_a_reporting_one_keeps_them():
    async def main():
        ctl = _controller(max_inflight=2, max_batch_size=2, holder_ttl_s=0.2)
        await ctl.acquire("batch", holder="dead")
        alive = await ctl.acquire("batch", holder="alive")
        for _ in range(3):
            await asyncio.sleep(0.1)
            ctl.reconcile("alive", [alive])
            reclaimed = ctl.expire_holders()
            if reclaimed:
                assert list(reclaimed) == ["dead"]
        assert ctl.stats()["inflight"] == 1 and ctl.stats()["holders"] == 1
        assert await asyncio.wait_for(ctl.acquire("batch", holder="alive"), 1)  # the seat is free again

    asyncio.run(main())


def test_a_waiter_cancelled_just_as_it_is_granted_gives_the_seat_back():
    """The router's caller is cancelled (by Ray, with the request that made the call) in the
    moment its ticket is granted: the canceller never sees the ticket, so it must not stay taken."""
    async def main():
        ctl = _controller()
        held = await ctl.acquire("realtime")
        waiter = asyncio.create_task(ctl.acquire("realtime", timeout_s=5))
        await asyncio.sleep(0.02)
        ctl.release(held)
        while ctl.stats()["queued"]["realtime"]:  # until the dispatcher grants it
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert ctl.stats()["inflight"] == 0

    asyncio.run(main())


def test_priority_then_deadline_order_a_lane():
    """Within a lane, a lower `priority` goes first, then the nearer deadline, then arrival;
    lanes still come first (a realtime request of any priority before batch work)."""
    async def main():
        ctl = _controller(max_inflight=1, max_batch_size=1)
        held = await ctl.acquire("realtime")
        order = []

        async def wait(name, lane, **kwargs):
            ticket = await ctl.acquire(lane, **kwargs)
            order.append(name)
            ctl.release(ticket)

        tasks = [asyncio.create_task(wait(*args[:2], **args[2])) for args in [
            ("batch-urgent", "batch", {"priority": -5}),
            ("late", "realtime", {"priority": 1}),
            ("plain", "realtime", {}),
            ("due-soon", "realtime", {"deadline_s": 30.0}),
            ("first", "realtime", {"priority": -1}),
        ]]
        await asyncio.sleep(0.05)
        ctl.release(held)
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        assert order == ["first", "due-soon", "plain", "late", "batch-urgent"]

    asyncio.run(main())


def test_deadlines_the_queue_cannot_meet_are_refused_at_once():
    from cluster.admission import DeadlineError

    async def main():
        ctl = _controller(max_inflight=1)
        assert await ctl.acquire("realtime", deadline_s=0.5) is not None  # a free seat: admitted
        queued = [asyncio.create_task(ctl.acquire("realtime")) for _ in range(3)]
        await asyncio.sleep(0.02)
        start = time.monotonic()
        with pytest.raises(DeadlineError) as refused:  # 3 ahead x ~1 s each, 50 ms left
            await ctl.acquire("realtime", deadline_s=0.05)
        assert not refused.value.passed and time.monotonic() - start < 0.1 and refused.value.retry_after_s >= 1
        with pytest.raises(DeadlineError) as over:  # over on arrival: it cannot be met either
            await ctl.acquire("realtime", deadline_s=-1)
        assert not over.value.passed
        # A deadline that looked reachable but passes in the queue: the waiter gives up.
        ctl._hold_s = 0.001
        with pytest.raises(DeadlineError) as missed:
            await ctl.acquire("realtime", deadline_s=0.1)
        assert missed.value.passed and ctl.stats()["queued"]["realtime"] == 3
        stats = ctl.stats()
        assert (stats["deadline_refused"], stats["deadline_missed"]) == (2, 1)
        for task in queued:
            task.cancel()

    asyncio.run(main())


def test_per_key_limits_on_requests_in_flight_and_tokens_per_minute():
    from cluster.admission import KeyLimitError

    async def main():
        ctl = _controller(max_inflight=8, max_batch_size=8, key_max_inflight=3, key_tokens_per_minute=100)
        held = [await ctl.acquire("realtime", key="a", seats=2), await ctl.acquire("realtime", key="a")]
        with pytest.raises(KeyLimitError, match="limit is 3"):
            await ctl.acquire("realtime", key="a")
        other = await ctl.acquire("realtime", key="b")  # another key is not held back
        ctl.release(held.pop())
        held.append(await ctl.acquire("realtime", key="a"))
        ctl.record_tokens("b", 60)
        ctl.record_tokens("b", 50)
        with pytest.raises(KeyLimitError, match="tokens") as over:
            await ctl.acquire("realtime", key="b")
        assert 50 < over.value.retry_after_s <= 60
        assert await ctl.acquire("realtime") is not None  # no key: no per-key limit
        assert ctl.stats()["key_limited"] == 2
        for ticket in held + [other]:
            ctl.release(ticket)

    asyncio.run(main())


def test_a_tenants_own_limits_replace_every_keys():
    """key_limits (a tenant's max_inflight / tokens_per_minute) apply to its key; a limit it
    leaves unset is every key's; other keys keep every key's."""
    from cluster.admission import KeyLimitError

    async def main():
        ctl = _controller(max_inflight=16, max_batch_size=16, key_max_inflight=2, key_tokens_per_minute=100,
                          key_limits={"tenant:big": [6, None]})
        held = [await ctl.acquire("realtime", key="tenant:big", seats=5)]
        with pytest.raises(KeyLimitError, match="tenant 'big' has 5 sequences .* limit is 6"):
            await ctl.acquire("realtime", key="tenant:big", seats=2)
        with pytest.raises(KeyLimitError, match="this API key has 0 .* limit is 2"):
            await ctl.acquire("realtime", key="other", seats=3)
        ctl.record_tokens("tenant:big", 120)  # its token budget is every key's (100)
        with pytest.raises(KeyLimitError, match="tokens"):
            await ctl.acquire("realtime", key="tenant:big")
        for ticket in held:
            ctl.release(ticket)

    asyncio.run(main())


def test_a_new_router_adopts_the_tickets_holders_report_and_waits_for_them():
    """A router that replaces one that died learns the work in flight from the holders'
    reports, so it does not admit past the capacity; paused, it grants nothing meanwhile."""
    async def main():
        ctl = _controller(max_inflight=2, max_batch_size=4)
        ctl.pause(0.2)
        waiter = asyncio.create_task(ctl.acquire("realtime", holder="ingress"))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # paused: the holders have not reported yet
        ctl.reconcile("ingress", [[17, "realtime", 1, None], [18, "batch", 1, "k"]])
        assert ctl.stats()["inflight"] == 2 and ctl.stats()["adopted"] == 2
        await asyncio.sleep(0.2)
        assert not waiter.done()  # the adopted tickets fill the capacity
        ctl.release(17)
        assert await asyncio.wait_for(waiter, 1) is not None
        assert ctl.stats()["inflight"] == 2

    asyncio.run(main())


def test_a_silent_holders_queued_requests_are_dropped_not_granted():
    """A holder that went away (a replica deleted or killed) left requests queued: they are
    dropped with its tickets, so no seat is granted to nobody (found when the router began
    to outlive the application it served)."""
    async def main():
        ctl = _controller(max_inflight=1, max_batch_size=4, holder_ttl_s=0.1)
        held = await ctl.acquire("batch", holder="gone")
        queued = [asyncio.create_task(ctl.acquire("batch", holder="gone")) for _ in range(3)]
        live = asyncio.create_task(ctl.acquire("batch", holder="alive"))
        await asyncio.sleep(0.15)
        ctl.reconcile("alive", [])
        assert ctl.expire_holders() == {"gone": [held]}
        assert await asyncio.wait_for(live, 1) is not None  # the live holder gets the seat
        assert [await asyncio.wait_for(t, 1) for t in queued] == [None, None, None]
        assert ctl.stats()["queued"]["batch"] == 0 and ctl.stats()["requests_inflight"] == 1

    asyncio.run(main())

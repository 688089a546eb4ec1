"""The router as a Ray actor: a caller that gives up while queued leaves no ticket behind; the
router dying, idle or with requests queued, loses none of them."""

from __future__ import annotations

import time

import pytest


def test_cancelled_waiter_is_withdrawn(serve_app):
    import ray

    from cluster.router import get_or_create_router

    router = get_or_create_router("test-router", {
        "max_inflight": 1, "max_queued": {"realtime": 4, "batch": 4},
        "batch_wait_ms": {"realtime": 0.0, "batch": 0.0}, "max_batch_size": 1})
    held = ray.get(router.acquire.remote("batch"))
    waiting = router.acquire.remote("realtime")
    deadline = time.time() + 10
    while ray.get(router.stats.remote())["queued"]["realtime"] != 1 and time.time() < deadline:
        time.sleep(0.05)
    ray.cancel(waiting)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(waiting, timeout=10)
    ray.get(router.release.remote(held))
    time.sleep(0.2)
    stats = ray.get(router.stats.remote())
    assert stats["inflight"] == 0 and stats["queued"] == {"realtime": 0, "batch": 0}
    ray.kill(router)


def _router(name: str, **overrides):
    from cluster.router import get_or_create_router

    return get_or_create_router(name, {
        "max_inflight": 2, "max_queued": {"realtime": 64, "batch": 64}, "max_batch_size": 2,
        "batch_wait_ms": {"realtime": 0.0, "batch": 0.0}, "max_share": {"realtime": 1.0, "batch": 1.0},
        **overrides})


def _wait_for(router, predicate, timeout_s: float = 20.0) -> None:
    """Until predicate(router stats) holds."""
    import ray

    deadline = time.time() + timeout_s
    while not predicate(stats := ray.get(router.stats.remote())):
        assert time.time() < deadline, f"timed out; router stats: {stats}"
        time.sleep(0.1)


def test_callers_that_give_up_at_any_moment_leave_no_seat_taken(serve_app):
    """Many callers through the ingress's own admission code, each cancelled at a random
    moment (queued, being granted, holding a seat): afterwards every seat is free."""
    import asyncio
    import random

    import ray

    from deployments.config import SemlineConfig
    from deployments.api.serving import OpenAIServing

    router = _router("test-give-up-router")
    serving = OpenAIServing(None, SemlineConfig(), router)
    rng = random.Random(0)

    async def caller():
        ticket = await serving.admission.admit(rng.choice(["realtime", "batch"]))
        try:
            await asyncio.sleep(rng.uniform(0, 0.01))
        finally:
            serving.admission.release(ticket)

    async def main():
        for _ in range(30):
            tasks = [asyncio.create_task(caller()) for _ in range(16)]
            await asyncio.sleep(rng.uniform(0, 0.15))  # long enough for some to be granted
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    _wait_for(router, lambda stats: stats["inflight"] == 0, 10)
    stats = ray.get(router.stats.remote())
    assert stats["queued"] == {"realtime": 0, "batch": 0} and stats["reclaimed"] == 0, stats
    ray.kill(router)


def test_tickets_lost_or_left_by_a_killed_holder_are_reclaimed(serve_app):
    """A holder reports its tickets: one it lost track of is reclaimed after the grace
    period, and all of them once the holder is killed and falls silent."""
    import ray

    from deployments.config import SemlineConfig
    from deployments.api.serving import OpenAIServing

    router = _router("test-holder-router", max_inflight=3, max_batch_size=3, holder_ttl_s=2.0,
                     reclaim_grace_s=0.5)

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, router):
            self.serving = OpenAIServing(None, SemlineConfig(router={"holder_sync_s": 0.3}), router)

        async def take(self, n: int) -> list[int]:
            return [await self.serving.admission.admit("batch") for _ in range(n)]

        def lose(self, ticket: int) -> None:
            self.serving.admission.held.pop(ticket, None)  # as if the grant never reached it

    holder = Holder.remote(router)
    tickets = ray.get(holder.take.remote(3))
    assert ray.get(router.stats.remote())["inflight"] == 3
    ray.get(holder.lose.remote(tickets[0]))
    _wait_for(router, lambda stats: stats["inflight"] == 2)
    time.sleep(1.0)  # more reports: the tickets it holds stay
    assert ray.get(router.stats.remote())["inflight"] == 2
    ray.kill(holder)
    _wait_for(router, lambda stats: stats["inflight"] == 0)
    assert ray.get(router.stats.remote())["reclaimed"] == 3
    ray.kill(router)


def test_service_recovers_when_the_router_actor_dies(client, serve_app):
    """A router killed for good (no restart): holders find or start a new one."""
    import ray

    from tests.deployments.conftest import MODEL

    old = ray.get_actor("semline-router")
    ray.kill(old, no_restart=True)
    resp = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=4, temperature=0)
    assert resp.choices[0].text and resp.usage.completion_tokens == 4
    new = ray.get_actor("semline-router")
    deadline = time.time() + 10
    while ray.get(new.stats.remote())["capacity"] == 0 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.get(new.stats.remote())["capacity"] == 4  # the LLM server re-registered


def test_requests_queued_when_the_router_dies_are_redispatched(client, serve_app):
    """Kill the router while it holds queued requests: each is re-dispatched through a new
    router (or fails with a clear error); none waits forever, and the service goes on."""
    import asyncio

    import httpx
    import ray

    from tests.deployments.conftest import API_KEY, MODEL

    async def burst():
        async with httpx.AsyncClient(base_url=serve_app, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            async def one(i):
                return await http.post("/v1/completions", json={
                    "model": MODEL, "prompt": f"Question {i}:", "max_tokens": 24, "ignore_eos": True})

            tasks = [asyncio.create_task(one(i)) for i in range(8)]  # capacity 4 + queue 4
            router = ray.get_actor("semline-router")
            deadline = time.time() + 30
            while sum(ray.get(router.stats.remote())["queued"].values()) == 0:
                assert time.time() < deadline, "nothing was ever queued"
                await asyncio.sleep(0.05)
            ray.kill(router, no_restart=True)
            return await asyncio.gather(*tasks)

    started = time.time()
    responses = asyncio.run(burst())
    assert time.time() - started < 120
    for resp in responses:
        assert resp.status_code == 200 or resp.json()["error"]["message"], resp.text
    assert sum(r.status_code == 200 for r in responses) >= 4, [r.status_code for r in responses]
    after = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=4,
                                      extra_body={"ignore_eos": True})  # 4 tokens, whatever it samples
    assert after.usage.completion_tokens == 4


def test_clients_that_drop_at_any_moment_leave_no_seat_or_block_behind(serve_app):
    """Streamed and plain requests whose clients go away at random moments (queued at the
    router, before the first byte, mid-stream): every seat comes back by itself, none is
    reclaimed by the holders' reports, and the engine frees every KV block."""
    import asyncio
    import random

    import httpx
    import ray
    from ray import serve

    from tests.deployments.conftest import API_KEY, MODEL

    router = ray.get_actor("semline-router")
    reclaimed_before = ray.get(router.stats.remote())["reclaimed"]
    rng = random.Random(7)

    async def one(http, i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Story number {i}."}],
                "max_tokens": 64, "ignore_eos": True, "stream": i % 3 != 0}

        async def call():
            if not body["stream"]:
                return await http.post("/v1/chat/completions", json=body)
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                async for _ in resp.aiter_lines():
                    pass

        try:
            await asyncio.wait_for(call(), rng.uniform(0.05, 6.0))
        except (asyncio.TimeoutError, httpx.HTTPError):
            pass

    async def main():
        async with httpx.AsyncClient(base_url=serve_app, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            await asyncio.gather(*(one(http, i) for i in range(24)))

    asyncio.run(main())
    llm = serve.get_deployment_handle("LLMServer", app_name="semline")
    _wait_for(router, lambda stats: stats["inflight"] == 0 and not any(stats["queued"].values()), 60)
    stats = ray.get(router.stats.remote())
    assert stats["reclaimed"] == reclaimed_before, stats
    deadline = time.time() + 20
    while (engine := llm.stats.remote().result())["num_running"] or engine["kv_cache_usage"]:
        assert time.time() < deadline, engine
        time.sleep(0.2)


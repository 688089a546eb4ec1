"""Autoscaling sees the router's backlog: 1 -> 2 replicas under a sustained backlog, back to 1 when idle."""

from __future__ import annotations

import asyncio
import time

import httpx

from deployments.routing import rank_by_free_kv
from tests.deployments.conftest import API_KEY, MODEL

APP = "autoscale"


def _replicas(serve, app: str = APP) -> int:
    status = serve.status().applications[app].deployments["LLMServer"]
    return sum(n for state, n in status.replica_states.items() if state == "RUNNING")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_router_backlog_scales_llm_server_up_and_down(serve_app, app_config, tmp_path):
    import ray
    from ray import serve

    from deployments.app import build_app

    config = app_config.model_copy(deep=True)
    config.server.num_cpus = 1  # two replicas fit beside the session's application
    config.server.autoscaling = config.server.autoscaling.model_validate({
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
        "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 1})
    # One request per replica at a time: the rest wait in the router, where Serve's own
    # count of ongoing requests cannot see them.
    config.router.actor_name = "autoscale-router"
    config.router.max_inflight_per_replica = 1
    config.router.max_queued_realtime = 64
    config.batch.storage_dir = str(tmp_path)
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    try:
        router = ray.get_actor("autoscale-router")
        assert _replicas(serve) == 1 and ray.get(router.stats.remote())["capacity"] == 1

        async def load():
            async with httpx.AsyncClient(base_url=f"{serve_app}/{APP}", timeout=300,
                                         headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                async def one(i):
                    return await http.post("/v1/completions", json={
                        "model": MODEL, "prompt": f"Story {i}:", "max_tokens": 48, "ignore_eos": True})

                tasks = [asyncio.create_task(one(i)) for i in range(12)]
                await asyncio.to_thread(_wait_for, lambda: _replicas(serve) == 2, 180, "a second replica")
                # The router's capacity follows the replicas.
                await asyncio.to_thread(_wait_for, lambda: ray.get(router.stats.remote())["capacity"] == 2,
                                        30, "router capacity 2")
                return await asyncio.gather(*tasks)

        responses = asyncio.run(load())
        assert [r.status_code for r in responses] == [200] * 12
        _wait_for(lambda: _replicas(serve) == 1, 120, "scale down to one replica")
        _wait_for(lambda: ray.get(router.stats.remote())["capacity"] == 1, 30, "router capacity 1")
    finally:
        serve.delete(APP)


def test_replicas_ranked_by_free_kv_blocks():
    stats = [{"num_free_blocks": 10, "num_waiting": 0}, {"num_free_blocks": 50, "num_waiting": 3},
             {"num_free_blocks": 50, "num_waiting": 1}]
    assert rank_by_free_kv(stats) == [2, 1, 0]

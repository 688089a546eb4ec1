"""Autoscaling on what users feel: 1 -> 2 replicas while realtime requests wait at the router
longer than the target, back to 1 when idle; the policy's arithmetic for backlog and latency."""

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


def test_realtime_queue_wait_scales_llm_server_up_and_down(serve_app, app_config, tmp_path):
    """target_queue_wait_s alone drives it (target_ongoing_requests is set out of reach): the
    router's queue wait reaches Serve's autoscaler through the replicas' reports."""
    import ray
    from ray import serve

    from deployments.app import build_app

    config = app_config.model_copy(deep=True)
    config.server.num_cpus = 1  # two replicas fit beside the session's application
    config.server.autoscaling = config.server.autoscaling.model_validate({
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1000, "target_queue_wait_s": 0.5,
        "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 1})
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


def test_policy_asks_for_replicas_by_backlog_and_by_latency():
    from types import SimpleNamespace

    from deployments.ops.autoscaling import backlog_policy

    def ctx(current=1, ongoing=0.0, queued=0.0, wait=0.0, ttft=0.0, target=2):
        return SimpleNamespace(config=SimpleNamespace(target_ongoing_requests=target), current_num_replicas=current,
                               total_num_requests=ongoing, aggregated_metrics={
                                   "router_queued": {"r": queued}, "router_queue_wait_s": {"r": wait},
                                   "ttft_p90_s": {"r": ttft}})

    assert backlog_policy(ctx(ongoing=2, queued=6))[0] == 4  # (2 + 6) / 2 per replica
    assert backlog_policy(ctx())[0] == 0  # idle: Serve keeps min_replicas
    latency = {"target_queue_wait_s": 0.5}
    assert backlog_policy(ctx(current=2, wait=1.6, target=1000), **latency)[0] == 7  # 2 x 1.6 / 0.5
    assert backlog_policy(ctx(current=2, wait=0.3, target=1000), **latency)[0] == 2  # holds
    assert backlog_policy(ctx(current=2, wait=0.1, ongoing=1, target=1000), **latency)[0] == 1  # backlog decides
    assert backlog_policy(ctx(current=1, wait=0.2, ttft=0.9), target_ttft_p90_s=0.5)[0] == 3  # 1.1 / 0.5


def test_replicas_ranked_by_free_kv_blocks():
    stats = [{"num_free_blocks": 10, "num_waiting": 0}, {"num_free_blocks": 50, "num_waiting": 3},
             {"num_free_blocks": 50, "num_waiting": 1}]
    assert rank_by_free_kv(stats) == [2, 1, 0]

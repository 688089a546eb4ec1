"""Losing a node under load, on a Ray cluster of three raylets on this machine.

Run by tests/multinode/test_node_loss.py in its own process (its own Ray cluster, beside
the test session's). A head (Serve's proxy, the ingress, the batch runner) and two worker
nodes with one LLM server replica each; realtime requests and a batch in flight; one
worker node is killed. Prints one JSON object of what was observed; the test judges it.

    python tests/multinode/scenario.py
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deployments.cli import free_port  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
# Node health checked every second, dead after 3 misses (Ray's default takes ~30 s).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_initial_delay_ms": 1000}


def _replicas(url: str, count: int, user: str) -> list[str]:
    """The replica that answered each of `count` small requests, sent one after another."""
    names = []
    for i in range(count):
        answer = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": f"{user} {i}: name a colour.", "max_tokens": 2, "temperature": 0})
        answer.raise_for_status()
        names.append(answer.headers["x-semline-replica"])
    return names


def _long_request(url: str, i: int) -> dict:
    """A realtime request that is still generating when the node goes: its status, or the
    error that ended it, and how long it took (a hang would take the timeout)."""
    start = time.monotonic()
    body = {"model": MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": 120, "ignore_eos": True,
            "temperature": 0}
    try:
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=90)
        result = {"status": answer.status_code, "replica": answer.headers.get("x-semline-replica"),
                  "code": answer.json().get("error", {}).get("code") if answer.status_code != 200 else None}
    except httpx.HTTPError as exc:
        result = {"status": None, "error": type(exc).__name__}
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def main() -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.schema import LoggingConfig

    from deployments.app import build_app
    from deployments.config import SemlineConfig

    observed: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 100}, "_system_config": SYSTEM_CONFIG})
    workers = [cluster.add_node(num_cpus=1, resources={"llm": 1}) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR")
    port = free_port()
    storage = tempfile.mkdtemp(prefix="semline-multinode-")
    config = SemlineConfig(
        engine={"device": "cpu", "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.25},
        http={"port": port, "node_resource": "head"},
        server={"num_cpus": 1, "resources": {"llm": 1}, "max_replicas_per_node": 1,
                "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        router={"max_inflight_per_replica": 8, "holder_sync_s": 1, "holder_ttl_s": 3},
        batch={"storage_dir": storage, "node_resource": "head", "max_retries": 8},
        quality={"feedback": {"storage_dir": storage + "/feedback"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly",
                logging_config=LoggingConfig(enable_access_log=False))
    serve.run(build_app(config), name="semline", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    # Two replicas (max_replicas_per_node 1: on the two worker nodes).
    seen = set(_replicas(url, 8, "warm"))
    observed["replicas_before"] = sorted(seen)

    # A batch, and realtime requests, in flight when a worker node is killed.
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    lines = [json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": MODEL, "prompt": f"Line {i}: count to ten.", "max_tokens": 24,
                                  "ignore_eos": True, "temperature": 0}}) for i in range(16)]
    upload = client.files.create(file=("lines.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    pool = concurrent.futures.ThreadPoolExecutor(8)
    inflight = [pool.submit(_long_request, url, i) for i in range(6)]
    time.sleep(4)  # generating by now
    victim = workers[0]
    victim_node = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)
    killed_at = time.monotonic()
    observed["killed_node"] = victim_node
    observed["inflight"] = [f.result(timeout=150) for f in inflight]

    # New requests: served by the surviving replica.
    time.sleep(2)
    after = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(after) < 6:
        try:
            after += _replicas(url, 1, "after")
        except httpx.HTTPError as exc:
            observed.setdefault("errors_after", []).append(str(exc)[:200])
            time.sleep(1)
    observed["replicas_after"] = after
    observed["seconds_to_serve_again"] = round(time.monotonic() - killed_at, 1)

    # The batch completes, each line exactly once.
    deadline = time.monotonic() + 240
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(1)
        batch = client.batches.retrieve(batch.id)
    observed["batch_status"] = batch.status
    if batch.output_file_id:
        results = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        observed["batch_ids"] = sorted(r["custom_id"] for r in results)
        observed["batch_ok"] = all(r["response"]["status_code"] == 200 for r in results)
    if batch.error_file_id:
        observed["batch_errors"] = client.files.content(batch.error_file_id).text.splitlines()[:3]

    # The node comes back: Serve puts the lost replica on it.
    cluster.add_node(num_cpus=1, resources={"llm": 1})
    deadline = time.monotonic() + 180
    back = set()
    while time.monotonic() < deadline:
        status = serve.status().applications["semline"].deployments["LLMServer"]
        running = status.replica_states.get("RUNNING", 0)
        if running == 2:
            back = set(_replicas(url, 12, "back"))
            if len(back) == 2:
                break
        time.sleep(2)
    observed["replicas_back"] = sorted(back)
    pool.shutdown(wait=False)
    serve.shutdown()
    observed["pipeline"] = _pipeline_loses_a_node(cluster)
    ray.shutdown()
    cluster.shutdown()
    return observed


def _pipeline_loses_a_node(cluster) -> dict:
    """A 2-stage pipeline spread over the worker nodes (SPREAD); one of them is killed while it
    generates: the lost stage is placed again (on what is left) and the running requests are
    recomputed; every request ends with the tokens of an undisturbed run."""
    from cluster.executors import ParallelConfig, RayExecutor
    from engine import LLM, SamplingParams

    prompts = [f"Pipeline request {i}: the river" for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    config = {"device": "cpu", "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.25, "num_threads": 1}
    want = [o.token_ids for o in LLM(**config).generate(prompts, params)]
    llm = LLM(**config, pipeline_parallel_size=2,
              executor=RayExecutor(ParallelConfig(placement_strategy="SPREAD", step_timeout_s=20,
                                                  transport="actor_calls")))
    engine, runner = llm.engine, llm.engine.runner
    stage_nodes = [w["node"] for w in runner.worker_info()]
    ids = [engine.add_request(p, params).request_id for p in prompts]
    final, steps = {}, 0
    while engine.has_unfinished_requests() and steps < 5:
        for out in engine.step():
            final[out.request_id] = out
        steps += 1
    # A worker node that holds a stage (SPREAD: the two stages are on two nodes, at most one the head).
    victim = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node and n.node_id in stage_nodes)
    cluster.remove_node(victim, allow_graceful=False)
    deadline = time.monotonic() + 240
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        for out in engine.step():
            final[out.request_id] = out
    result = {"same_tokens": [final[i].token_ids == w for i, w in zip(ids, want)],
              "rebuilds": engine.stats.num_executor_rebuilds, "stage_nodes": len(set(stage_nodes)),
              "finished": all(final[i].finished for i in ids)}
    runner.shutdown()
    return result


if __name__ == "__main__":
    print("OBSERVED " + json.dumps(main()), flush=True)

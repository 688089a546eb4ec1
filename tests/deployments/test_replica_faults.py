"""Kill the LLM server replica while it streams and while a batch runs (docs/reliability.md)."""

from __future__ import annotations

import json
import time

import httpx

from tests.deployments.conftest import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _llm_replicas():
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if a.class_name == "ServeReplica:semline:LLMServer"]


def _line(custom_id: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Tell story {custom_id}."}],
                     "max_tokens": 24, "temperature": 0, "ignore_eos": True}}


def test_replica_killed_mid_stream_and_mid_batch(client, serve_app):
    """One kill of the only LLM server replica: the open stream ends with an error event (no
    hang), Serve replaces the replica, new requests succeed, and the batch that was running
    completes with every custom_id answered exactly once."""
    import ray

    ids = [f"fault-{i}" for i in range(8)]
    upload = client.files.create(file=("faults.jsonl", "".join(json.dumps(_line(i)) + "\n" for i in ids).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    (replica,) = _llm_replicas()
    events, ended_at = [], None
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to one thousand."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{serve_app}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:  # the stream is running...
            if line.startswith("data: ") and '"content"' in line:
                events.append(line)
            if len(events) >= 3:
                break
        ray.kill(ray.get_actor(replica.name, namespace="serve"), no_restart=True)  # ...kill its replica
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
        ended_at = time.time()
    assert ended_at is not None
    assert events[-1] != "data: [DONE]", "the stream claimed to finish although its replica died"
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["message"] and error["type"]

    # Serve starts a new replica; requests succeed again.
    deadline = time.time() + 180
    while True:
        try:
            resp = client.completions.create(model=MODEL, prompt="Back?", max_tokens=4, timeout=30)
            if resp.usage.completion_tokens == 4:
                break
        except Exception:  # noqa: BLE001 - 5xx/connection errors while the replica comes back
            pass
        assert time.time() < deadline, "no replica served again within 180 s"
        time.sleep(1)
    assert _llm_replicas() and _llm_replicas()[0].name != replica.name

    # The batch finishes with each custom_id answered once and nothing failed.
    deadline = time.time() + 240
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline, f"batch still {batch.status} {batch.request_counts}"
        time.sleep(1)
    assert batch.status == "completed" and batch.request_counts.failed == 0, batch
    outputs = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(ids)
    assert all(o["response"]["status_code"] == 200 for o in outputs)

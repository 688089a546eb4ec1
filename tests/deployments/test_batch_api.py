"""The batch lane through the official openai client: files, batches, priority, restart."""

from __future__ import annotations

import collections
import json
import time

import httpx
import openai
import pytest

from tests.deployments.conftest import API_KEY, MODEL

FINAL = ("completed", "failed", "cancelled", "expired")


def _line(custom_id: str, content: str, max_tokens: int = 8, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}],
                     "max_tokens": max_tokens, "temperature": 0}}


def _jsonl(lines) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def _submit(client, lines, name: str = "input.jsonl"):
    upload = client.files.create(file=(name, _jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def _wait(client, batch_id: str, until=lambda b: b.status in FINAL, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {batch.status} {batch.request_counts} after {timeout}s")


def _records(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_batch_end_to_end(client):
    lines = [_line(f"q{i}", f"What is {i} + {i}?") for i in range(5)]
    lines.insert(2, "{this is not json")
    lines.append(_line("wrong-url", "hi", url="/v1/completions"))
    batch = _submit(client, lines)
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 7

    batch = _wait(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 2)

    outputs = _records(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in outputs) == [f"q{i}" for i in range(5)]  # each once
    for record in outputs:
        response = record["response"]
        assert response["status_code"] == 200 and record["error"] is None
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"]
        assert response["body"]["usage"]["completion_tokens"] > 0
    errors = {r["custom_id"]: r for r in _records(client, batch.error_file_id)}
    assert errors[None]["error"]["code"] == "invalid_json_line" and "line 3" in errors[None]["error"]["message"]
    assert errors["wrong-url"]["error"]["code"] == "invalid_url"

    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]


def test_line_with_invalid_parameters_gets_an_error_record(client):
    bad = _line("bad", "hi")
    bad["body"]["temperature"] = 9
    batch = _wait(client, _submit(client, [bad, _line("good", "hi")]).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    (error,) = _records(client, batch.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "temperature"


@pytest.mark.parametrize("path", [
    "/v1/batches/batch_0123456789abcdef0123456789abcdef",
    "/v1/batches/not-an-id",
    "/v1/files/file-0123456789abcdef0123456789abcdef",
    "/v1/files/file-0123456789abcdef0123456789abcdef/content",
    "/v1/files/..%2F..%2Fetc%2Fpasswd/content",
])
def test_unknown_ids_are_404(serve_app, path):
    resp = httpx.get(serve_app + path, headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] in ("batch_not_found", "file_not_found", "not_found")


def test_batch_and_file_errors(client, serve_app):
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-0123456789abcdef0123456789abcdef",
                              endpoint="/v1/chat/completions", completion_window="24h")
    upload = client.files.create(file=("ok.jsonl", _jsonl([_line("a", "hi")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/moderations", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("ok.jsonl", _jsonl([_line("a", "hi")])), purpose="fine-tune")
    not_jsonl = client.files.create(file=("x.csv", b"a,b,c\n1,2,3\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="not JSONL"):
        client.batches.create(input_file_id=not_jsonl.id, endpoint="/v1/chat/completions", completion_window="24h")
    dupes = client.files.create(file=("d.jsonl", _jsonl([_line("a", "x"), _line("a", "y")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="more than once"):
        client.batches.create(input_file_id=dupes.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.APIStatusError) as info:  # over the config's 1 MiB file limit
        client.files.create(file=("big.jsonl", b"x" * (2 * 1024 * 1024)), purpose="batch")
    assert info.value.status_code == 413
    not_multipart = httpx.post(f"{serve_app}/v1/files", content=b"{}", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert not_multipart.status_code == 400 and not_multipart.json()["error"]["message"]
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        denied = httpx.get(f"{serve_app}/v1/batches", headers=auth)
        assert denied.status_code == 401 and "batch_" not in denied.text


def test_realtime_overtakes_a_saturated_batch_lane(client, serve_app):
    """With batch work queued at the router, each waiting realtime request is granted first."""
    import ray

    from cluster.admission import violations_of_priority

    router = ray.get_actor("semline-router")
    batch = _submit(client, [_line(f"bulk{i}", f"Write a line about the number {i}.", max_tokens=24)
                             for i in range(40)])
    _wait(client, batch.id, until=lambda b: b.request_counts.completed >= 2)
    assert ray.get(router.stats.remote())["queued"]["batch"] > 0  # the batch lane is saturated

    import asyncio

    async def realtime():
        async with httpx.AsyncClient(base_url=serve_app, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={
                "model": MODEL, "prompt": f"Realtime {i}:", "max_tokens": 8, "temperature": 0})
                for i in range(4)))

    responses = asyncio.run(realtime())
    assert [r.status_code for r in responses] == [200] * 4

    # Not vacuous: batch lines queued before the realtime requests arrived are still
    # waiting after all of them were served, so each realtime request overtook them.
    assert ray.get(router.stats.remote())["queued"]["batch"] > 0
    log = ray.get(router.grant_log.remote())
    assert violations_of_priority(log, ray.get(router.waiting.remote("realtime"))) == []
    realtime_tickets = [t for lane, t, _ in log if lane == "realtime"][-4:]
    batch_tickets = [t for lane, t, _ in log if lane == "batch"]
    assert batch_tickets and min(realtime_tickets) > min(batch_tickets)

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    outputs = _records(client, batch.output_file_id)
    assert len(outputs) == batch.request_counts.completed < 40
    assert len({r["custom_id"] for r in outputs}) == len(outputs)
    with pytest.raises(openai.APIStatusError) as info:
        client.batches.cancel(_wait(client, _submit(client, [_line("one", "hi")]).id).id)
    assert info.value.status_code == 409


def test_unfinished_batch_resumes_after_restart_exactly_once(client, app_config):
    from ray import serve

    from deployments.app import build_app

    total = 14
    batch = _submit(client, [_line(f"r{i}", f"Tell me a fact about {i}.", max_tokens=24) for i in range(total)])
    _wait(client, batch.id, until=lambda b: b.request_counts.completed >= 3)

    serve.delete("semline")  # stop the whole application mid-batch
    serve.run(build_app(app_config), name="semline", route_prefix="/")

    batch = _wait(client, batch.id)
    assert batch.status == "completed"
    outputs = _records(client, batch.output_file_id)
    counts = collections.Counter(r["custom_id"] for r in outputs)
    assert counts == {f"r{i}": 1 for i in range(total)}
    assert batch.request_counts.completed == total and batch.request_counts.failed == 0


def test_cli_batch_submit_follows_and_downloads(serve_app, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "questions.jsonl"
    path.write_bytes(_jsonl([_line(f"c{i}", f"Name a colour, {i}.") for i in range(3)] + ["not json"]))
    done = subprocess.run([sys.executable, "-m", "deployments.cli", "batch", "submit", str(path), "--url", serve_app,
                           "--api-key", API_KEY, "--poll", "0.3"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "3 completed, 1 failed" in done.stderr and "req" in done.stderr  # the progress bar
    outputs = [json.loads(line) for line in (tmp_path / "questions.output.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in outputs) == ["c0", "c1", "c2"]
    errors = (tmp_path / "questions.output.errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and json.loads(errors[0])["error"]["code"] == "invalid_json_line"
    refused = subprocess.run([sys.executable, "-m", "deployments.cli", "batch", "submit", str(path), "--url",
                              serve_app, "--api-key", "wrong"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "invalid or missing API key" in refused.stderr


def test_batch_lane_structured_output_and_embeddings(client):
    """The batch lane serves what the realtime lane does: json_schema lines validate, and an
    embeddings batch answers each line with the realtime lane's vector."""
    import jsonschema

    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    lines = [_line(f"s{i}", f"Pick a color and a count, #{i}.", max_tokens=40) for i in range(3)]
    for line in lines:
        line["body"]["response_format"] = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}
    batch = _wait(client, _submit(client, lines + [_line("free", "Say hi.")]).id)
    assert batch.status == "completed" and batch.request_counts.completed == 4
    for record in _records(client, batch.output_file_id):
        if record["custom_id"].startswith("s"):
            jsonschema.validate(json.loads(record["response"]["body"]["choices"][0]["message"]["content"]), schema)

    texts = ["A red apple.", "Ray Serve runs replicas."]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": t}}
             for i, t in enumerate(texts)]
    upload = client.files.create(file=("emb.jsonl", _jsonl(lines)), purpose="batch")
    batch = _wait(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                                completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == 2
    vectors = {r["custom_id"]: r["response"]["body"]["data"][0]["embedding"]
               for r in _records(client, batch.output_file_id)}
    assert vectors["e1"] == client.embeddings.create(model=MODEL, input=texts[1]).data[0].embedding


def test_a_batch_past_its_completion_window_expires_with_every_line_reported_once(client):
    """completion_window as OpenAI enforces it: when it ends, the lines done are in the output
    file, every other line is in the error file with code batch_expired, each custom_id once."""
    lines = [_line(f"x{i}", f"Write a long story about the number {i}.", max_tokens=96) for i in range(24)]
    for line in lines:
        line["body"]["ignore_eos"] = True
    upload = client.files.create(file=("slow.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="4s")
    assert batch.expires_at - batch.created_at == 4
    batch = _wait(client, batch.id, timeout=120)
    assert batch.status == "expired" and batch.expired_at is not None
    outputs, errors = _records(client, batch.output_file_id), _records(client, batch.error_file_id)
    assert sorted(r["custom_id"] for r in outputs + errors) == sorted(f"x{i}" for i in range(24))
    assert errors and all(r["error"]["code"] == "batch_expired" for r in errors)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(outputs), len(errors))


def test_results_written_twice_are_reported_once():
    """Two runners that overlapped may both have appended a line's result: the first counts."""
    from deployments.batch.runner import _count, _unique

    results = [{"key": ["a", 1], "line": 1, "kind": "output", "record": {"custom_id": "a"}},
               {"key": ["b", 2], "line": 2, "kind": "error", "record": {"custom_id": "b"}},
               {"key": ["a", 1], "line": 1, "kind": "error", "record": {"custom_id": "a"}}]
    assert [r["record"]["custom_id"] for r in _unique(results)] == ["a", "b"]
    batch = {"request_counts": {"total": 2, "completed": 0, "failed": 0}}
    _count(batch, results)
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}

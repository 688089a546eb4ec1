"""Offline batch jobs: `semline job submit` through Ray's Jobs API to the session's Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.deployments.conftest import MODEL


def _line(custom_id: str, content: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "messages": [{"role": "user", "content": content}],
                                "max_tokens": 6, "temperature": 0, **body}})


def test_job_submit_answers_every_line_once(jobs_address, tmp_path):
    good = [f"q{i}" for i in range(6)]
    lines = [_line(cid, f"Question number {i}: name a fruit.") for i, cid in enumerate(good)]
    schema = {"type": "object", "properties": {"fruit": {"type": "string", "enum": ["apple", "pear"]}},
              "required": ["fruit"], "additionalProperties": False}
    lines.append(_line("json", "Pick a fruit.", max_tokens=20,
                       response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}))
    good.append("json")
    lines.insert(2, "{this line is not json")
    lines.append(_line("wrong-model", "hi", model="no-such-model"))
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    config = tmp_path / "semline.yaml"  # the job runs for a tenant of the config
    config.write_text("tenants:\n  - {name: nightly, keys: [k], max_priority: 3}\n")
    submit = [sys.executable, "-m", "deployments.cli", "job", "submit", str(source), "--address", jobs_address,
              "--output", str(output), "--num-cpus", "1", "--batch-size", "4", "--config", str(config)]

    unknown = subprocess.run(submit + ["--tenant", "nobody"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "tenant 'nobody' is not in the config" in unknown.stderr
    assert not output.exists()  # refused before a job was submitted
    proc = subprocess.run(submit + ["--tenant", "nightly"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "succeeded" in proc.stderr and "progress:" in proc.stderr  # the job's log was followed
    assert '"tenant": "nightly"' in proc.stderr

    outputs = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in outputs) == sorted(good)  # each exactly once
    for record in outputs:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["choices"][0]["message"]["content"]
        assert 0 < body["usage"]["completion_tokens"] <= (20 if record["custom_id"] == "json" else 6)
        if record["custom_id"] == "json":  # structured output in the offline job too
            assert json.loads(body["choices"][0]["message"]["content"])["fruit"] in ("apple", "pear")
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 2
    malformed = next(r for r in errors if r["custom_id"] is None)
    assert malformed["error"]["code"] == "invalid_json_line" and "line 3" in malformed["error"]["message"]
    wrong = next(r for r in errors if r["custom_id"] == "wrong-model")
    assert wrong["response"]["status_code"] == 404
    assert wrong["response"]["body"]["error"]["code"] == "model_not_found"


def test_job_entrypoint_refuses_a_file_that_cannot_run(tmp_path):
    """A whole-file problem (duplicate custom_ids) fails fast with a clear message, before any engine starts."""
    source = tmp_path / "dup.jsonl"
    source.write_text(_line("same", "a") + "\n" + _line("same", "b") + "\n")
    proc = subprocess.run([sys.executable, "-m", "deployments.batch.job", "--input", str(source),
                           "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "custom_id 'same' appears more than once" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_job_serving_answers_embeddings_and_responses_lines(tmp_path):
    """The job's actors answer /v1/embeddings and /v1/responses lines with the serving code
    (LocalServing over an in-process LLM server), as the batch lane does."""
    import asyncio

    from deployments.batch.job import LocalServing, tenant_share
    from deployments.batch.runner import answer_line
    from deployments.config import SemlineConfig
    from deployments.llm_server import LLMServer

    config = SemlineConfig(engine={"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": 0.1},
                           tenants=[{"name": "nightly", "keys": ["k"], "max_priority": 5, "max_inflight": 2}])
    key, limits = tenant_share(config, "nightly", 2)
    assert key == "tenant:nightly" and limits == (1, None)  # each of 2 actors: half its max_inflight
    server = LLMServer(config.engine, 1, model_name=config.model_name, router_config={"light_headroom": 1})
    assert server.capacity == server.engine.engine.config.max_num_seqs - 1  # the router's headroom has room
    serving = LocalServing(server, config, limits)
    try:
        # The job's tenant: its priority range holds (403 as over HTTP), its share of seats too.
        line = {"model": config.model_name, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
        status, body = asyncio.run(answer_line(serving, "/v1/completions", {**line, "priority": 0}, key))
        assert status == 403 and body["error"]["code"] == "priority_not_allowed"

        async def two_lines():
            return await asyncio.gather(*(answer_line(serving, "/v1/completions", {**line, "priority": 7}, key)
                                          for _ in range(2)))

        answers = asyncio.run(two_lines())
        assert [status for status, _ in answers] == [200, 200]
        assert serving.admission.inflight == 0 and not serving.admission.tickets  # every seat given back
        status, body = asyncio.run(answer_line(serving, "/v1/embeddings",
                                               {"model": config.model_name, "input": ["a cat", "a dog"]}))
        assert status == 200 and [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 576
        status, body = asyncio.run(answer_line(serving, "/v1/responses", {
            "model": config.model_name, "input": "Name a fruit.", "max_output_tokens": 5, "temperature": 0}))
        assert status == 200 and body["object"] == "response" and body["output"][0]["content"][0]["text"]
    finally:
        server.engine.shutdown()


def test_a_jobs_local_limits_wait_for_seats_and_tokens():
    """The job's actors hold their tenant's share: a second sequence waits for the first's seat,
    a request wider than the limit runs alone, and spent tokens hold the next until they age out."""
    import asyncio
    import time

    from deployments.api.admission import LocalLimits

    async def scenario():
        limits = LocalLimits(max_inflight=1, tokens_per_minute=100)
        first = await limits.admit("batch")
        second = asyncio.ensure_future(limits.admit("batch"))
        await asyncio.sleep(0.05)
        assert not second.done()  # its seat is taken
        limits.release(first)
        limits.release(await asyncio.wait_for(second, 1))
        wide = await asyncio.wait_for(limits.admit("batch", seats=4), 1)  # alone, it may exceed the limit
        limits.release(wide)
        limits.spent("tenant:x", 100)
        limits.spent_log[0] = (time.monotonic() - 59.8, 100)  # spent 59.8 s ago: ages out in 0.2 s
        start = time.monotonic()
        limits.release(await asyncio.wait_for(limits.admit("batch"), 2))
        assert 0.1 < time.monotonic() - start < 1.5
        assert limits.inflight == 0

    asyncio.run(scenario())

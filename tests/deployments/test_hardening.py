"""Bad input, limits and the API key, against the running application (docs/reliability.md)."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.deployments.conftest import API_KEY, MAX_OPEN_BATCHES, MAX_PROMPT_TOKENS, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _chat(**overrides) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **overrides}


@pytest.fixture(scope="module")
def stored_ids(client):
    """A file and a batch that exist, so a leak of either would show."""
    line = {"custom_id": "leak-check", "method": "POST", "url": "/v1/chat/completions", "body": _chat()}
    upload = client.files.create(file=("secret-name.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    return upload.id, batch.id


def test_every_data_route_needs_the_key_and_leaks_nothing(serve_app, stored_ids):
    """Every /v1 route of the published OpenAPI schema, with the ids of a real file and batch:
    401 without the key or with a wrong one, and the body names no file, batch or model."""
    file_id, batch_id = stored_ids
    schema = httpx.get(f"{serve_app}/openapi.json").json()
    routes = [(method.upper(), path) for path, item in schema["paths"].items() if path.startswith("/v1/")
              for method in item]
    assert len(routes) >= 12  # models, completions, chat, files (5), batches (4)
    for method, path in routes:
        url = serve_app + path.replace("{file_id}", file_id).replace("{batch_id}", batch_id)
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
            resp = httpx.request(method, url, headers=headers, json=_chat() if method == "POST" else None)
            assert resp.status_code == 401, (method, path, resp.status_code)
            assert resp.json()["error"]["code"] == "invalid_api_key"
            for secret in (file_id, batch_id, "secret-name", "leak-check", MODEL):
                assert secret not in resp.text, (method, path, secret)


@pytest.mark.parametrize("body, param", [
    (_chat(messages=[]), "messages"),
    (_chat(max_tokens=0), "max_tokens"),
    (_chat(max_tokens=-5), "max_tokens"),
    (_chat(max_tokens=10**6), "max_tokens"),  # over http.max_output_tokens
    (_chat(n=17), "n"),
    (_chat(stop=[f"s{i}" for i in range(5000)]), "stop"),
    (_chat(stop="x" * 10_000), "stop"),
    (_chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    (_chat(temperature="hot"), "temperature"),
    (_chat(functions=[{"name": "f"}]), "functions"),  # known to OpenAI, not served (unknown ones are ignored)
    (_chat(seed=603421643269015261413376), "seed"),  # beyond 64 bits: was a 500 (found by test_fuzz)
])
def test_invalid_parameters_get_400_naming_the_parameter(serve_app, body, param):
    resp = httpx.post(f"{serve_app}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("content", [
    b'{"model": "\xff\xfe", "messages": []}',  # not UTF-8
    b"\x00\x01\x02",
    b"[1, 2, 3]",  # JSON, but not an object
    b"",
])
def test_bodies_that_are_not_a_json_object_get_400(serve_app, content):
    resp = httpx.post(f"{serve_app}/v1/completions", content=content,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"]


def test_odd_but_valid_prompts_are_answered(client):
    """Prompts of only special tokens, of whitespace, and of token ids run like any other."""
    special = client.completions.create(model=MODEL, prompt="<|im_start|><|im_end|><|endoftext|>", max_tokens=4)
    assert special.choices[0].finish_reason in ("stop", "length")
    blank = client.completions.create(model=MODEL, prompt="   \n\t ", max_tokens=4)
    assert blank.usage.prompt_tokens > 0
    ids = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
    assert ids.usage.prompt_tokens == 3


def test_out_of_range_token_ids_and_empty_prompt_get_400(serve_app):
    for prompt in ([10**9], [-1], "", []):
        resp = httpx.post(f"{serve_app}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4},
                          headers=AUTH)
        assert resp.status_code == 400, (prompt, resp.text)
        assert resp.json()["error"]["message"]


def test_a_streamed_body_over_the_limit_is_cut_off_with_413(serve_app, app_config):
    """A chunked body (no Content-Length) of up to 100 MB: the server answers 413 once it has read
    past its limit, long before the client could have sent it all. (The client looks for the
    answer between chunks: on loopback the server may well read the rest and throw it away.)"""
    import select

    url = urlparse(serve_app)
    chunk = b"x" * 65536
    total_chunks = 100 * 2**20 // len(chunk)
    sent, response = 0, b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {API_KEY}\r\n"
                      "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        try:
            for _ in range(total_chunks):
                if select.select([sock], [], [], 0.002)[0]:  # the server has answered
                    break
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: what this test wants
        try:
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (ConnectionResetError, TimeoutError):
            pass
    assert sent < 100 * 2**20, "the server did not answer before the whole 100 MB body was sent"
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent >= app_config.http.max_body_bytes  # it was cut off after the limit, not before


def test_configured_limits_on_prompt_tokens_and_open_batches(client):
    """engine.max_prompt_tokens and batch.max_open_batches, over HTTP (both set low for the
    session's application in conftest)."""
    import openai

    with pytest.raises(openai.BadRequestError, match=f"accepts at most {MAX_PROMPT_TOKENS}"):
        client.completions.create(model=MODEL, prompt=[5] * (MAX_PROMPT_TOKENS + 1), max_tokens=1)
    assert client.completions.create(model=MODEL, prompt=[5] * 8, max_tokens=1).choices[0].text is not None

    # Batches slow enough to stay open while the limit is reached.
    slow = [{"custom_id": f"slow-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": _chat(max_tokens=128, ignore_eos=True)} for i in range(8)]
    upload = client.files.create(file=("slow.jsonl", "\n".join(map(json.dumps, slow)).encode()), purpose="batch")
    open_statuses = ("validating", "in_progress", "finalizing", "cancelling")
    already_open = sum(1 for b in client.batches.list(limit=100) if b.status in open_statuses)
    assert already_open < MAX_OPEN_BATCHES
    create = lambda: client.batches.create(  # noqa: E731
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    import ray

    router = ray.get_actor("semline-router")
    # The router outlives applications (a test may have restarted one): count from here.
    reclaimed_before = ray.get(router.stats.remote())["reclaimed"]
    created = [create() for _ in range(MAX_OPEN_BATCHES - already_open)]
    try:
        with pytest.raises(openai.RateLimitError) as info:
            create()
        assert info.value.response.json()["error"]["code"] == "too_many_batches"
        assert int(info.value.response.headers["retry-after"]) > 0
        deadline = time.time() + 60  # cancelled with lines running and lines queued at the router
        while not ((stats := ray.get(router.stats.remote()))["inflight_by_lane"]["batch"]
                   and stats["queued"]["batch"]):
            assert time.time() < deadline, stats
            time.sleep(0.1)
    finally:
        for batch in created:  # their lines are queued at the router, being granted or running
            client.batches.cancel(batch.id)
    deadline = time.time() + 120  # cancelled batches close; the lane takes new ones again
    while any(client.batches.retrieve(b.id).status in open_statuses for b in created):
        assert time.time() < deadline, "cancelled batches did not close"
        time.sleep(0.5)
    again = create()
    assert again.status in open_statuses
    client.batches.cancel(again.id)
    # Every cancelled line handed its router seat back by itself, also those granted just as
    # the cancel came (a leaked seat once starved the batch lane of every later test): none
    # had to be reclaimed by the holders' reports.
    while client.batches.retrieve(again.id).status in open_statuses or ray.get(router.stats.remote())["inflight"]:
        assert time.time() < deadline + 30, ("seats still held", ray.get(router.stats.remote()))
        time.sleep(0.5)
    assert ray.get(router.stats.remote())["reclaimed"] == reclaimed_before

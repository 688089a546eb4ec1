"""Fuzz every /v1 route from the application's own OpenAPI schema with schemathesis.

Valid (positive) and invalid (negative) cases per operation, against the running
application: no 5xx, no hang (every call has a timeout), every rejection has an
OpenAI-style error body, and the application still answers afterwards. Generated
completions are capped (max_tokens <= 8, n <= 2) to keep the run bounded on a CPU;
everything else the schema allows is fuzzed as generated.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.deployments.conftest import API_KEY, MODEL

EXAMPLES = {"positive": 16, "negative": 16}
TIMEOUT_S = 60
STATS: dict[str, int] = {}


def _bounded(case):
    """Keep generated work small: the model answers each valid completion on 2 CPU cores."""
    body = getattr(case, "body", None)
    if isinstance(body, dict) and case.path in ("/v1/completions", "/v1/chat/completions"):
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body["max_tokens"] = 8
        if isinstance(body.get("max_completion_tokens"), int) and body["max_completion_tokens"] > 8:
            body["max_completion_tokens"] = 8
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 8
    return case


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value, default=str)).encode("utf-8", "surrogatepass")


def _httpx_files(files):
    """schemathesis builds `requests`-style multipart parts; httpx wants bytes for every part."""
    parts = []
    for name, value in files:
        if isinstance(value, tuple):
            filename, content = value[0], value[1]
            parts.append((name, (filename, _as_bytes(content))))
        else:
            parts.append((name, (None, _as_bytes(value))))
    return parts


def _check(case, response) -> None:
    STATS["cases"] = STATS.get("cases", 0) + 1
    STATS[f"{response.status_code // 100}xx"] = STATS.get(f"{response.status_code // 100}xx", 0) + 1
    where = f"{case.method} {case.path} {getattr(case, 'body', None)!r:.300}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]  # an OpenAI-style body, never a stack trace
        assert error["message"] and error["type"], where
        assert "Traceback" not in response.text, where


def test_every_route_survives_fuzzing(serve_app):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    from ray.util.state import list_actors

    def dead_replicas() -> int:
        return sum(1 for a in list_actors(filters=[("state", "=", "DEAD")], limit=10_000)
                   if a.class_name.startswith("ServeReplica"))

    dead_before = dead_replicas()
    schema = schemathesis.openapi.from_url(f"{serve_app}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.path.startswith("/v1/")]
    assert len(operations) >= 12
    with httpx.Client(timeout=TIMEOUT_S) as http:
        for operation in operations:
            for mode, examples in EXAMPLES.items():
                strategy = operation.as_strategy(generation_mode=GenerationMode(mode)).map(_bounded)

                @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def run(case):
                    kwargs = case.as_transport_kwargs(base_url=serve_app,
                                                      headers={"Authorization": f"Bearer {API_KEY}"})
                    if kwargs.get("files") is not None:
                        kwargs["files"] = _httpx_files(kwargs["files"])
                    try:
                        response = http.request(**{k: v for k, v in kwargs.items() if v is not None and k in (
                            "method", "url", "headers", "params", "json", "content", "data", "files")})
                    except httpx.LocalProtocolError:  # the client itself refuses to send it (bad header)
                        STATS["unsendable"] = STATS.get("unsendable", 0) + 1
                        return
                    _check(case, response)

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (GET /v1/models has no inputs)
                    STATS["no_negative_cases"] = STATS.get("no_negative_cases", 0) + 1
    print("fuzzed:", json.dumps(STATS))
    assert STATS["cases"] >= 200
    # Still serving after the fuzzing.
    ok = httpx.post(f"{serve_app}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                    json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    assert dead_replicas() == dead_before  # no replica crashed (and was replaced) on the way

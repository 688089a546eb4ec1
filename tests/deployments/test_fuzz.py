"""Fuzz every /v1 route from the application's own OpenAPI schema with schemathesis.

Valid (positive) and invalid (negative) cases per operation, against the running
application: no 5xx, no hang (every call has a timeout), every rejection has an
OpenAI-style error body, every answer (and every event of a stream) matches the
response the schema publishes for its route and status, and the application
still answers afterwards. Generated
completions are capped (max_tokens <= 3, n <= 2) to keep the run bounded on a CPU;
everything else the schema allows is fuzzed as generated.
"""

from __future__ import annotations

import json
import time

import httpx

from tests.deployments.conftest import API_KEY, MODEL

EXAMPLES = {"positive": 16, "negative": 16}
TIMEOUT_S = 60
STATS: dict[str, int] = {}
VALIDATED_OK: set[str] = set()  # operations with a 200 answer checked against its schema


def _bounded(case):
    """Keep generated work small: the model answers each valid completion on 2 CPU cores."""
    body = getattr(case, "body", None)
    if isinstance(body, dict) and case.path in ("/v1/completions", "/v1/chat/completions"):
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
            body["max_tokens"] = 3
        if isinstance(body.get("max_completion_tokens"), int) and body["max_completion_tokens"] > 3:
            body["max_completion_tokens"] = 3
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 3
        # Rules across fields that the schema cannot state: prompt_logprobs not with stream (as in
        # vLLM); a tool message answers a call (tool_call_id), only assistants carry tool_calls.
        if body.get("stream") is True:
            body.pop("prompt_logprobs", None)
        for message in body.get("messages") if isinstance(body.get("messages"), list) else ():
            if isinstance(message, dict) and message.get("role") == "tool" and not message.get("tool_call_id"):
                message["tool_call_id"] = "call_0"
            if isinstance(message, dict) and message.get("role") != "assistant":
                message.pop("tool_calls", None)
    if isinstance(body, dict) and case.path == "/v1/responses":  # unbounded, each took 1.5 s
        limit = body.get("max_output_tokens")
        if limit is None or isinstance(limit, int) and limit > 3:
            body["max_output_tokens"] = 3
    if isinstance(body, dict) and case.path == "/v1/embeddings" and isinstance(body.get("input"), list):
        body["input"] = body["input"][:4]  # each input is a forward pass of its own
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


class ResponseSchemas:
    """Validates an answer against the responses the published OpenAPI schema declares for
    its route and status (JSON bodies, and each event of a stream)."""

    BASE = "urn:semline-openapi"

    def __init__(self, doc: dict) -> None:
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.doc = doc
        self.registry = Registry().with_resource(self.BASE, Resource(contents=doc, specification=DRAFT202012))

    def _validate(self, schema: dict, instance) -> None:
        from jsonschema import Draft202012Validator

        if "$ref" in schema:  # refs resolve inside the OpenAPI document
            schema = {"$ref": self.BASE + schema["$ref"]}
        elif "anyOf" in schema:
            schema = {"anyOf": [{"$ref": self.BASE + s["$ref"]} for s in schema["anyOf"]]}
        Draft202012Validator(schema, registry=self.registry).validate(instance)

    def validate(self, method: str, path: str, response) -> None:
        responses = self.doc["paths"][path][method.lower()]["responses"]
        declared = responses.get(str(response.status_code)) or responses["default"]
        media = response.headers.get("content-type", "").split(";")[0]
        content = declared["content"]
        assert media in content, f"{method} {path}: {response.status_code} {media} is not declared"
        if media == "application/json":
            self._validate(content[media]["schema"], response.json())
        elif media == "text/event-stream":
            for line in response.text.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self._validate(content[media]["x-event-schema"], json.loads(line[len("data: "):]))


def _check(case, response, schemas: ResponseSchemas) -> None:
    STATS["cases"] = STATS.get("cases", 0) + 1
    STATS[f"{response.status_code // 100}xx"] = STATS.get(f"{response.status_code // 100}xx", 0) + 1
    where = f"{case.method} {case.path} {getattr(case, 'body', None)!r:.2000}"
    # A 5xx only as designed: a TTFT deadline that passed while the request waited (503).
    designed = response.status_code == 503 and '"deadline_exceeded"' in response.text
    assert response.status_code < 500 or designed, f"{where} -> {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]  # an OpenAI-style body, never a stack trace
        assert error["message"] and error["type"], where
        assert "Traceback" not in response.text, where
    schemas.validate(case.method, case.path, response)  # the published schema tells the truth
    if response.status_code == 200:
        VALIDATED_OK.add(f"{case.method} {case.path}")


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
    doc = httpx.get(f"{serve_app}/openapi.json", timeout=TIMEOUT_S).json()
    schemas = ResponseSchemas(doc)
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.path.startswith("/v1/") or op.path in ("/tokenize", "/detokenize")]
    assert len(operations) >= 15
    with httpx.Client(timeout=TIMEOUT_S) as http:
        for operation in operations:
            for mode, examples in EXAMPLES.items():
                if mode == "positive" and operation.path == "/v1/chat/completions":
                    examples = 24  # its body has the most fields to combine (each valid one generates)
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
                    _check(case, response, schemas)

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (GET /v1/models has no inputs)
                    STATS["no_negative_cases"] = STATS.get("no_negative_cases", 0) + 1
    print("fuzzed:", json.dumps(STATS), "200s validated for:", sorted(VALIDATED_OK))
    assert STATS["cases"] >= 200
    # Valid cases do reach the success path (the others need ids that only exist server-side).
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/files", "GET /v1/models",
            "POST /v1/embeddings", "POST /tokenize", "POST /detokenize"} <= VALIDATED_OK
    # Still serving after the fuzzing.
    ok = httpx.post(f"{serve_app}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                    json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    assert dead_replicas() == dead_before  # no replica crashed (and was replaced) on the way


def test_answers_of_every_kind_match_the_published_schema(serve_app):
    """The answers fuzzing rarely reaches (logprobs, streams with usage, a batch's life) are
    what the schema says too."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    doc = httpx.get(f"{serve_app}/openapi.json", timeout=TIMEOUT_S).json()
    schemas = ResponseSchemas(doc)
    short = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    chat = {**short, "messages": [{"role": "user", "content": "Hi"}]}
    calls = [
        ("GET", "/health", {}), ("GET", "/v1/models", {}),
        ("POST", "/v1/completions", {"json": {**short, "prompt": "Hello", "logprobs": 2, "n": 2}}),
        ("POST", "/v1/completions", {"json": {**short, "prompt": [1, 2, 3], "stream": True,
                                              "stream_options": {"include_usage": True}}}),
        ("POST", "/v1/completions", {"json": {**short, "prompt": [1, 2, 3], "echo": True, "logprobs": 1,
                                              "max_tokens": 0, "prompt_logprobs": 2}}),
        ("POST", "/v1/completions", {"json": {**short, "prompt": "Hello", "echo": True, "logprobs": 1,
                                              "stream": True}}),
        ("POST", "/v1/chat/completions", {"json": {**chat, "logprobs": True, "top_logprobs": 2,
                                                   "prompt_logprobs": 1}}),
        ("POST", "/v1/chat/completions", {"json": {**chat, "stream": True, "stream_options": {"include_usage": True}}}),
        ("POST", "/v1/completions", {"json": {**short, "prompt": "Hello", "max_tokens": 10**6}}),
        ("POST", "/v1/chat/completions", {"json": {**chat, "max_tokens": 60, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]}}),
        ("POST", "/v1/chat/completions", {"json": {**chat, "max_tokens": 60, "tool_choice": "required", "stream": True,
                                                   "tools": [{"type": "function", "function": {"name": "f"}}]}}),
        ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": ["a", "b"], "encoding_format": "base64"}}),
        ("POST", "/tokenize", {"json": {"prompt": "Hello", "return_token_strs": True}}),
        ("POST", "/detokenize", {"json": {"tokens": [1, 2, 3]}}),
    ]
    with httpx.Client(base_url=serve_app, headers=headers, timeout=TIMEOUT_S) as http:
        for method, path, kwargs in calls:
            response = http.request(method, path, **kwargs)
            assert response.status_code in (200, 400), response.text
            schemas.validate(method, path, response)
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat}
        upload = http.post("/v1/files", files={"file": ("in.jsonl", json.dumps(line).encode())},
                           data={"purpose": "batch"})
        schemas.validate("POST", "/v1/files", upload)
        file_id = upload.json()["id"]
        batch = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"})
        schemas.validate("POST", "/v1/batches", batch)
        batch_id = batch.json()["id"]
        deadline = time.time() + 120  # let it finish: cancelling below then answers 409
        while http.get(f"/v1/batches/{batch_id}").json()["status"] != "completed":
            assert time.time() < deadline
            time.sleep(0.5)
        for method, path in [("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
                             ("GET", "/v1/files/{file_id}/content"), ("GET", "/v1/batches"),
                             ("GET", "/v1/batches/{batch_id}"), ("POST", "/v1/batches/{batch_id}/cancel"),
                             ("GET", "/v1/batches/{batch_id}"), ("GET", "/v1/files/{file_id}/nope")]:
            response = http.request(method, path.format(file_id=file_id, batch_id=batch_id))
            if path.endswith("/nope"):  # an unknown route: 404 with the error body
                assert response.status_code == 404 and response.json()["error"]["message"]
                continue
            assert response.status_code == (409 if path.endswith("/cancel") else 200), (path, response.text)
            schemas.validate(method, path, response)
        spare = http.post("/v1/files", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "batch"}).json()["id"]
        schemas.validate("DELETE", "/v1/files/{file_id}", http.delete(f"/v1/files/{spare}"))

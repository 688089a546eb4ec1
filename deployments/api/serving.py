"""The realtime lane: an OpenAI-compatible HTTP API (FastAPI) in front of the LLM servers.

Errors are mapped in one place (`_error_response`) to OpenAI's error body:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import itertools
import json
import logging
import math
import struct
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.admission import LANE_PRIORITY, REALTIME_LANE, DeadlineError, KeyLimitError, QueueFullError
from cluster.router import get_or_create_router
from deployments.config import SemlineConfig
from deployments.llm_server import read_output
from deployments.api import protocol
from deployments.api.protocol import (BatchCreateRequest, ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, EmbeddingRequest, ExperimentWeightsRequest,
                                      FeedbackRequest, LoadLoRARequest, ResponsesRequest, TokenizeRequest,
                                      UnloadLoRARequest)
from deployments.api.responses import (ResponsesError, ResponseStore, chat_request, conversation_after,
                                       function_call_item, message_item, output_items, response_header,
                                       response_object, sse_event)
from deployments.api.tools import ToolParser, get_parser, held_back
from deployments.ops.metrics import QualityMetrics
from deployments.quality.catalog import ModelCatalog, Target, UnknownModelError
from deployments.quality.feedback import FeedbackStore, UnknownResponseError
from deployments.quality.filters import FilterChain, StreamFilter
from deployments.quality.result_cache import cache_key, cacheable
from engine import RequestOutput, SamplingParams
from engine.async_engine import RequestFailedError
from engine.structured_output import StructuredOutput

logger = logging.getLogger(__name__)

ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
             "/v1/embeddings": EmbeddingRequest, "/v1/responses": ResponsesRequest}
# Routes outside /v1 that the API key, body limits and OpenAI-style errors cover too (vLLM's).
EXTRA_API_ROUTES = ("/tokenize", "/detokenize")
DEFAULT_MAX_TOKENS = 256
# Names the request fields this version ignored (it does not know them).
IGNORED_FIELDS_HEADER = "x-semline-ignored-fields"
# Names the LLM server replica(s) that answered (for debugging and the routing tests).
REPLICA_HEADER = "x-semline-replica"
# A request's time-to-first-token deadline, in milliseconds (or the body's ttft_deadline_ms).
DEADLINE_HEADER = "x-semline-deadline-ms"
# A request's own end-to-end timeout, in milliseconds (at most http.request_timeout_s).
TIMEOUT_HEADER = "x-semline-timeout-ms"
# The experiment arm that answered, and whether the answer came from the result cache.
ARM_HEADER = "x-semline-arm"
CACHE_HEADER = "x-semline-cache"
_LOGGED_IGNORED: set[str] = set()  # field names already logged once


class APIError(Exception):
    """An error with an HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def __reduce__(self):  # raised in the batch runner, caught in the ingress
        return (APIError, (self.status, self.message, self.type, self.param, self.code, self.headers))

    def body(self) -> dict:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# How long /health waits for the router's answer before it says 503.
HEALTH_TIMEOUT_S = 2.0


def _to_api_error(exc: BaseException) -> APIError:
    """Map engine and validation errors (possibly wrapped by Ray) to API errors."""
    exc = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(math.ceil(exc.retry_after_s))})
    if isinstance(exc, KeyLimitError):
        return APIError(429, str(exc), "rate_limit_error", code="key_limit",
                        headers={"Retry-After": str(math.ceil(exc.retry_after_s))})
    if isinstance(exc, DeadlineError):
        if exc.passed:
            return APIError(503, str(exc), "server_error", code="deadline_exceeded")
        return APIError(429, str(exc), "rate_limit_error", code="deadline_unmeetable",
                        headers={"Retry-After": str(math.ceil(exc.retry_after_s))})
    if isinstance(exc, asyncio.TimeoutError):
        return APIError(503, "timed out waiting for capacity", "server_error", code="queue_timeout")
    if isinstance(exc, ray.exceptions.RayActorError):  # the replica (or its node) died mid-request
        return APIError(503, "the model replica serving this request was lost; retry", "server_error",
                        code="replica_lost")
    if isinstance(exc, (RequestValidationError, ValidationError)):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
        param = ".".join(loc) or None
        return APIError(400, f"invalid parameter {param}: {first.get('msg', 'invalid value')}", param=param)
    if isinstance(exc, ValueError):  # the engine's RequestError (prompt too long, ...) is one
        return APIError(400, str(exc))
    if isinstance(exc, RequestFailedError):  # this request alone failed in the engine
        return APIError(500, str(exc), type_="server_error", code="request_failed")
    return APIError(500, f"internal error: {type(exc).__name__}", type_="server_error")


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union that failed ('str', 'list[constrained-str]') in an
    error's location; clients want the field's path."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or not part.isidentifier())


def build_fastapi(config: SemlineConfig) -> FastAPI:
    app = FastAPI(title="semline", description="OpenAI-compatible LLM serving on Ray")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return _error_response(_to_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):  # unknown route, wrong method, ...
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(_: Request, exc: json.JSONDecodeError):
        return _error_response(APIError(400, f"malformed JSON body: {exc}"))

    _publish_schema(app, config.model_name)
    app.add_middleware(_BodyLimit, limit_for=lambda path: (
        config.batch.max_file_bytes if path == "/v1/files" else config.http.max_body_bytes))

    keys = config.accepted_api_keys()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if _is_api_path(_route_path(request.scope)):
            if keys:
                key = _authorized(request, keys)
                if key is None:
                    return _error_response(APIError(401, "invalid or missing API key", "authentication_error",
                                                    code="invalid_api_key"))
                # Per-key limits are kept by the router under an id of the key, never the key.
                request.state.api_key_id = hashlib.sha256(key.encode()).hexdigest()[:16]
            limit = (config.batch.max_file_bytes if _route_path(request.scope) == "/v1/files"
                     else config.http.max_body_bytes)
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limit:
                return _error_response(APIError(413, f"request body larger than {limit} bytes",
                                                code="request_too_large"))
        return await call_next(request)

    return app


# The request bodies of the routes that read them by hand (so that malformed JSON, bodies
# that are not UTF-8 and the batch lane share one validation path), and every route's
# answers: published in the OpenAPI schema as if FastAPI had parsed and produced them.
_UPLOAD_SCHEMA = {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}},
}
_REQUEST_BODIES = {
    ("post", "/v1/completions"): CompletionRequest, ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/batches"): BatchCreateRequest, ("post", "/v1/files"): _UPLOAD_SCHEMA,
    ("post", "/v1/embeddings"): EmbeddingRequest, ("post", "/tokenize"): TokenizeRequest,
    ("post", "/v1/responses"): ResponsesRequest,
    ("post", "/detokenize"): DetokenizeRequest,
    ("post", "/v1/feedback"): FeedbackRequest, ("post", "/v1/load_lora_adapter"): LoadLoRARequest,
    ("post", "/v1/unload_lora_adapter"): UnloadLoRARequest, ("post", "/v1/experiments/{name}"): ExperimentWeightsRequest,
}
# (method, path) -> (200 body model, streamed event model or None); a str is a media type.
_RESPONSES = {
    ("get", "/health"): (protocol.Health, None),
    ("get", "/live"): (protocol.Health, None),
    ("get", "/v1/models"): (protocol.ModelList, None),
    ("post", "/v1/completions"): (protocol.Completion, protocol.Completion),
    ("post", "/v1/chat/completions"): (protocol.ChatCompletion, protocol.ChatCompletionChunk),
    ("post", "/v1/embeddings"): (protocol.EmbeddingList, None),
    ("post", "/v1/responses"): (protocol.ResponseObject, protocol.ResponseEvent),
    ("post", "/tokenize"): (protocol.Tokenized, None),
    ("post", "/detokenize"): (protocol.Detokenized, None),
    ("post", "/v1/files"): (protocol.FileObject, None),
    ("get", "/v1/files"): (protocol.FileList, None),
    ("get", "/v1/files/{file_id}"): (protocol.FileObject, None),
    ("delete", "/v1/files/{file_id}"): (protocol.FileDeleted, None),
    ("get", "/v1/files/{file_id}/content"): ("application/jsonl", None),
    ("post", "/v1/batches"): (protocol.Batch, None),
    ("get", "/v1/batches"): (protocol.BatchList, None),
    ("get", "/v1/batches/{batch_id}"): (protocol.Batch, None),
    ("post", "/v1/batches/{batch_id}/cancel"): (protocol.Batch, None),
    ("post", "/v1/feedback"): (protocol.FeedbackObject, None),
    ("get", "/v1/feedback"): ("application/x-ndjson", None),
    ("post", "/v1/load_lora_adapter"): (protocol.LoRAAdapterStatus, None),
    ("post", "/v1/unload_lora_adapter"): (protocol.LoRAAdapterStatus, None),
    ("get", "/v1/experiments"): (protocol.ModelList, None),
    ("post", "/v1/experiments/{name}"): (protocol.ModelCard, None),
}


def _publish_schema(app: FastAPI, model_name: str) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})

        def ref(model: type[BaseModel]) -> dict:
            if model.__name__ not in components:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        for (method, path), model in _REQUEST_BODIES.items():
            operation = schema["paths"].get(path, {}).get(method)
            if operation is None:
                continue
            if isinstance(model, dict):
                content = {"multipart/form-data": {"schema": model}}
            else:
                content = {"application/json": {"schema": ref(model)}}
                if "model" in model.model_fields and model.model_fields["model"].is_required():
                    # the one model served (any other name: 404)
                    components[model.__name__]["properties"]["model"] = {"type": "string", "enum": [model_name]}
            operation["requestBody"] = {"required": True, "content": content}
        error = {"description": "An error (4xx/5xx), OpenAI-style",
                 "content": {"application/json": {"schema": ref(protocol.ErrorResponse)}}}
        for (method, path), (body, events) in _RESPONSES.items():
            operation = schema["paths"].get(path, {}).get(method)
            if operation is None:
                continue
            if isinstance(body, str):
                content = {body: {"schema": {"type": "string"}}}
            else:
                content = {"application/json": {"schema": ref(body)}}
            if events is not None:  # x-event-schema: what each `data:` event holds
                content["text/event-stream"] = {"schema": {
                    "type": "string", "description": f"with stream: true, server-sent events, each `data: ` + "
                    f"a {events.__name__} (or, if the request fails mid-stream, an ErrorResponse)" + (
                        "; the last is response.completed (or response.incomplete)" if path == "/v1/responses"
                        else ", then `data: [DONE]` unless it failed")},
                    "x-event-schema": {"anyOf": [ref(events), ref(protocol.ErrorResponse)]}}
            # Path and query parameters are checked by FastAPI, but their errors are answered
            # 400 with the OpenAI-style body, not FastAPI's 422.
            operation["responses"] = {"200": {"description": "OK", "content": content}, "default": error}
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a /v1/* body that streams past its limit (sent without Content-Length,
    or longer than it said) is answered 413 as soon as the limit is passed; the rest is never
    read, and whatever the app was about to answer is dropped."""

    def __init__(self, app, limit_for) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not _is_api_path(_route_path(scope)):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(_route_path(scope))
        received, exceeded, started = 0, False, False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a cut-off body
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            response = _error_response(APIError(413, f"request body larger than {limit} bytes",
                                                code="request_too_large"))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)


def _route_path(scope) -> str:
    """The request's path within the application: without the route prefix the application
    is served under (Serve's route_prefix arrives as the ASGI root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _is_api_path(path: str) -> bool:
    return path.startswith("/v1/") or path in EXTRA_API_ROUTES


def _authorized(request: Request, keys: list[str]) -> str | None:
    """The accepted key the request carries, or None."""
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    matches = [key for key in keys if hmac.compare_digest(token.encode(), key.encode())]  # compare with all
    return matches[0] if matches else None


class OpenAIServing:
    """Runs OpenAI requests through the router and the LLM servers, for both lanes.

    `llm` is a DeploymentHandle to the LLM server; the router actor is looked up
    by the name in the config (created on first use)."""

    def __init__(self, llm, config: SemlineConfig, router=None) -> None:
        self.llm = llm
        self.config = config
        self.router = router or self._connect_router()
        # This process's name at the router and the tickets it holds, reported every
        # router.holder_sync_s so the router can reclaim any ticket that went astray.
        self.holder = f"{type(self).__name__}-{uuid.uuid4().hex[:12]}"
        self._held: dict[int, list] = {}  # ticket -> [ticket, lane, seats, key], as the router is told
        self._pending: set[str] = set()  # request ids whose admission is on its way
        self._sync_task: asyncio.Task | None = None
        self._model_info_cache: dict | None = None
        self.response_store = ResponseStore(config.http.max_stored_responses, config.http.response_ttl_s)
        # Which model answers a name (base, adapter, experiment arm), filters, result cache.
        self.catalog = ModelCatalog(config)
        FilterChain(config.quality.filters)  # a classifier that cannot be imported fails the start, not a request
        self._filter_chains: dict[str, FilterChain | None] = {}
        self.quality_metrics = QualityMetrics()

    # --- routes --------------------------------------------------------------

    async def health(self) -> dict:
        """Readiness: 200 once at least one LLM server replica has loaded its model and reported
        to the router (a replica registers only after its engine is up), else 503 with the
        reason: what a load balancer or a Kubernetes readiness probe should route by."""
        try:
            stats = await asyncio.wait_for(self._router_call("stats"), timeout=HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure to answer means not ready
            raise APIError(503, f"not ready: the router does not answer ({type(exc).__name__})", "server_error",
                           code="not_ready") from exc
        if stats.get("replicas", 0) < 1 or stats.get("capacity", 0) < 1:
            raise APIError(503, "not ready: no LLM server replica can serve yet (loading its model?)",
                           "server_error", code="not_ready")
        return {"status": "ok"}

    async def live(self) -> dict:
        """Liveness: the HTTP side answers (say nothing of the model replicas)."""
        return {"status": "ok"}

    async def models(self) -> dict:
        await self._refresh_catalog()
        return {"object": "list", "data": self.catalog.cards()}

    async def completions(self, request: Request):
        return await self._http("/v1/completions", request)

    async def chat_completions(self, request: Request):
        return await self._http("/v1/chat/completions", request)

    async def _http(self, url: str, request: Request):
        """A realtime request; fields the API does not know are named in a response header."""
        expires_at = self._expiry(request)
        plan = await self.plan(url, await _json_body(request), REALTIME_LANE, _deadline_header(request))
        plan.key, plan.expires_at = _key_id(request), expires_at
        return _with_headers(await self._run_until(plan, REALTIME_LANE), plan)

    def _expiry(self, request: Request | None) -> float:
        """When (time.monotonic()) a realtime request that arrives now must be done."""
        timeout_s = self.config.http.request_timeout_s
        header = _positive_ms_header(request, TIMEOUT_HEADER) if request is not None else None
        return time.monotonic() + (timeout_s if header is None else min(timeout_s, header / 1000))

    async def _run_until(self, plan: "_Plan", lane: str):
        """_run within the plan's expiry: admission and a whole non-streamed answer; a stream
        checks it between chunks (_until)."""
        try:
            return await asyncio.wait_for(self._run(plan, lane), max(0.0, plan.expires_at - time.monotonic()))
        except TimeoutError as exc:  # _run was cancelled: its calls aborted, its ticket released
            raise _timeout_error() from exc

    async def respond(self, url: str, data, lane: str, key: str | None = None):
        """Validate one request for `url` and run it in `lane`: a response dict, or an SSE
        response when it asks to stream. Raises APIError. key: the id of the API key it is
        counted against (per-key limits)."""
        if url == "/v1/embeddings":
            return await self._embed(self.validate(url, data), lane, key)
        if url == "/v1/responses":
            plan = await self._responses_plan(data, lane)
        else:
            plan = await self.plan(url, data, lane)
        plan.key = key
        return await self._run(plan, lane)

    async def responses(self, request: Request):
        expires_at = self._expiry(request)
        data = await _json_body(request)
        plan = await self._responses_plan(data, REALTIME_LANE, _deadline_header(request))
        plan.key, plan.expires_at = _key_id(request), expires_at
        return _with_headers(await self._run_until(plan, REALTIME_LANE), plan)

    async def _responses_plan(self, data, lane: str, deadline_ms: float | None = None) -> "_Plan":
        """A Responses request, translated into a chat completion's plan (deployments/api/responses.py)."""
        await self._know_model(data)
        body = self._validate_plain(ResponsesRequest, data)
        history: list[dict] = []
        if body.previous_response_id is not None:
            history = self.response_store.get(body.previous_response_id)
            if history is None:
                raise APIError(404, f"previous response {body.previous_response_id!r} was not found (responses are "
                               "kept for a limited time)", param="previous_response_id", code="response_not_found")
        try:
            chat, conversation = chat_request(body, history)
        except ResponsesError as exc:
            raise APIError(exc.status, str(exc), param=exc.param) from exc
        plan = await self.plan("/v1/chat/completions", chat, lane, deadline_ms)
        if plan.body.n != 1:
            raise APIError(400, "a response has one answer", param="n")
        plan.responses = _ResponsesContext(body, f"resp_{uuid.uuid4().hex}", conversation)
        plan.ignored = body.ignored_fields()
        return plan

    async def embeddings(self, request: Request):
        data = await _json_body(request)
        await self._know_model(data)
        body = self.validate("/v1/embeddings", data)
        return _with_headers(await self._embed(body, REALTIME_LANE, _key_id(request)), _Headers(body.ignored_fields()))

    async def _embed(self, body: EmbeddingRequest, lane: str, key: str | None = None) -> dict:
        """Each input embedded by an LLM server replica (a seat each at the router)."""
        if body.dimensions is not None:
            size = (await self._model_info())["hidden_size"]
            if body.dimensions != size:
                raise APIError(400, f"dimensions {body.dimensions}: this model's embeddings have {size} "
                               "(shortening them is not supported)", param="dimensions")
        inputs = body.inputs()
        ticket = await self._admit(lane, len(inputs), key=key)
        try:
            results = await asyncio.gather(*(self._server_call("embed", x) for x in inputs))
        finally:
            self._release(ticket)
        self._spent(key, sum(n for _, n in results))
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(vector, body.encoding_format)}
                for i, (vector, _) in enumerate(results)]
        tokens = sum(n for _, n in results)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def tokenize(self, request: Request) -> dict:
        body = self._validate_plain(TokenizeRequest, await _json_body(request))
        messages = [m.template_message() for m in body.messages] if body.messages is not None else None
        tools = [t.model_dump(exclude_none=True, include={"type", "function"}) for t in body.tools or []] or None
        tokens, strs = await self._server_call("tokenize", body.prompt, messages, tools, body.add_special_tokens,
                                               body.return_token_strs)
        info = await self._model_info()
        return {"count": len(tokens), "max_model_len": info["max_model_len"], "tokens": tokens, "token_strs": strs}

    async def detokenize(self, request: Request) -> dict:
        body = self._validate_plain(DetokenizeRequest, await _json_body(request))
        return {"prompt": await self._server_call("detokenize", body.tokens)}

    def _validate_plain(self, model: type[BaseModel], data):
        """A request body validated by `model` (400), naming the served model if any (404)."""
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            raise _to_api_error(exc) from exc
        model_name = getattr(body, "model", None)
        if model_name is not None and not self.catalog.knows(model_name):
            raise APIError(404, f"model {model_name!r} does not exist", param="model", code="model_not_found")
        return body

    async def _know_model(self, data) -> None:
        """A model name this replica does not know may have been loaded through another one
        (a LoRA adapter): ask the router before the body is validated."""
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, str) and not self.catalog.knows(model):
            await self._refresh_catalog()

    async def _refresh_catalog(self) -> None:
        try:
            self.catalog.update(await self._router_call("catalog_state"))
        except Exception as exc:  # noqa: BLE001 - a restarting router: serve what is known
            logger.debug("catalog refresh failed: %s", exc)

    async def plan(self, url: str, data, lane: str, deadline_ms: float | None = None) -> "_Plan":
        """Validate a request and turn it into the sequences to generate. Raises APIError.
        deadline_ms: from the request's deadline header (its body's ttft_deadline_ms wins)."""
        await self._know_model(data)
        body = self.validate(url, data)
        plan = await self._plan(body, lane)
        plan.url = url
        plan.priority = body.priority
        deadline_ms = body.ttft_deadline_ms if body.ttft_deadline_ms is not None else deadline_ms
        plan.deadline_s = None if deadline_ms is None else deadline_ms / 1000
        return plan

    async def _plan(self, body, lane: str) -> "_Plan":
        if body.stream and lane != REALTIME_LANE:
            raise APIError(400, "stream is not supported in the batch lane", param="stream")
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        limit = self.config.http.max_output_tokens
        if requested is not None and requested > limit:
            raise APIError(400, f"max_tokens is {requested}; this server generates at most {limit} tokens "
                           "per request", param="max_completion_tokens" if getattr(
                               body, "max_completion_tokens", None) else "max_tokens")
        try:
            structured = body.structured_output()
        except ValueError as exc:
            raise APIError(400, str(exc), param="response_format") from exc
        ignored = body.ignored_fields()
        for name in ignored:
            if name not in _LOGGED_IGNORED and len(_LOGGED_IGNORED) < 1024:
                _LOGGED_IGNORED.add(name)
                logger.warning("ignoring the request field %r, which this version does not know", name)
        if isinstance(body, ChatCompletionRequest):
            max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, limit)
            num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
            tools, parser = body.active_tools(), None
            if tools:
                parser = get_parser(await self._tool_parser())
                forced = body.forced_tools()
                if forced and structured is not None:
                    raise APIError(400, "tool_choice required (or a named function) and response_format both "
                                   "constrain the output; send one", param="tool_choice")
                if forced:
                    try:
                        grammar = parser.grammar(forced, body.parallel_tool_calls)
                    except Exception as exc:  # noqa: BLE001 - xgrammar's errors for a schema it cannot take
                        raise APIError(400, f"a tool's parameters are not a usable JSON schema: {exc}",
                                       param="tools") from exc
                    structured = StructuredOutput(grammar=grammar)
            # A tool call that opens with a special token must reach the parser.
            skip_special = not (parser is not None and parser.start_is_special)
            messages = [m.template_message() for m in body.messages]
            choices = [_Choice(None, messages, body.sampling_params(max_tokens, num_logprobs, i, structured,
                                                                    skip_special))
                       for i in range(body.n)]
            return _Plan(body, choices, "chat.completion", "chat.completion.chunk", ignored, tools, parser)
        max_tokens = body.max_tokens or min(DEFAULT_MAX_TOKENS, limit)
        choices = []
        for prompt in body.prompts():
            echo = (prompt if isinstance(prompt, str) else await self._server_call("detokenize", prompt)) \
                if body.echo else None
            choices += [_Choice(prompt, None, body.sampling_params(max_tokens, body.logprobs, i, structured), echo)
                        for i in range(body.n)]
        return _Plan(body, choices, "text_completion", "text_completion", ignored)

    def validate(self, url: str, data):
        """The request body for `url`, validated; APIError (400/404) otherwise."""
        model = ENDPOINTS.get(url)
        if model is None:
            raise APIError(400, f"unsupported url {url!r}; supported: {sorted(ENDPOINTS)}", param="url")
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        unsupported = protocol.unsupported_field(data)
        if unsupported is not None:
            raise APIError(400, f"{unsupported[0]} is not supported: {unsupported[1]}", param=unsupported[0],
                           code="unsupported_parameter")
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            raise _to_api_error(exc) from exc
        if not self.catalog.knows(body.model):
            raise APIError(404, f"model {body.model!r} does not exist", param="model", code="model_not_found")
        return body

    def _resolve(self, plan: "_Plan") -> Target:
        """The model (or experiment arm) that answers the plan; sticky per user, else API key."""
        try:
            return self.catalog.resolve(plan.body.model, getattr(plan.body, "user", None) or plan.key)
        except UnknownModelError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from exc

    async def _run(self, plan: "_Plan", lane: str):
        """Admit through the router, then stream the choices or wait for their final outputs.
        A deterministic request already answered is answered from the result cache."""
        plan.target = self._resolve(plan)
        plan.filters = self._filters_for(plan.body.model)
        key, settings = None, self.config.quality.result_cache
        if settings.enabled and self.router is not None and plan.responses is None and cacheable(plan) \
                and (settings.models is None or plan.body.model in settings.models):
            key = cache_key(plan.url, plan.target, plan.body)
            cached = await self._router_call("cache_get", key, settings.ttl_s)
            self.quality_metrics.cache_lookup(plan.target, cached is not None)
            plan.cache = "miss" if cached is None else "hit"
            if cached is not None:
                return json.loads(cached)
        # A seat per sequence (n choices); the request's priority and deadline order the queue.
        ticket = await self._admit(lane, len(plan.choices), plan.priority, plan.deadline_s, plan.key)
        priority = LANE_PRIORITY[lane]
        try:
            if plan.body.stream:
                streams = [self._call("stream", c, priority, plan, stream=True) for c in plan.choices]
                replicas = await self._accepted(streams)
                plan.replicas = [r for r in replicas if isinstance(r, str)]
                if plan.responses is not None:
                    return _sse(self._response_events(streams[0], plan, ticket))
                return _sse(self._stream_chunks(streams, plan, ticket))
        except BaseException:
            self._release(ticket)
            raise
        result = await self._complete(plan, priority, ticket)
        if key is not None and all(c["finish_reason"] in ("stop", "length") for c in result["choices"]):
            self._router_call("cache_put", key, json.dumps(result).encode(), settings.max_entries)
        return result

    def _filters_for(self, model: str) -> FilterChain | None:
        """The output filters of a public model name (None: it has none)."""
        if model not in self._filter_chains:
            chain = FilterChain([f for f in self.config.quality.filters if f.models is None or model in f.models])
            self._filter_chains[model] = chain or None
            if len(self._filter_chains) > 4096:  # names are checked before this, but bound it anyway
                self._filter_chains.pop(next(iter(self._filter_chains)))
        return self._filter_chains[model]

    def _answered(self, plan: "_Plan", response_id: str, outputs: list[RequestOutput], text: str) -> None:
        """Count an answer for its model and arm (and, in the HTTP ingress, keep it for feedback)."""
        self.quality_metrics.answered(plan.target, outputs)
        if plan.filter_hits:
            self.quality_metrics.filtered(plan.target, plan.filter_hits)

    async def _accepted(self, streams) -> list[str]:
        """Wait until the engine has accepted every stream's request (each stream's first item):
        a request it refuses (a prompt longer than the context, a bad grammar) is answered
        with its 4xx before the stream starts, never as 200 and an error event."""
        try:
            return await asyncio.gather(*(anext(stream) for stream in streams))
        except BaseException as exc:
            for stream in streams:
                stream.cancel()
            if isinstance(exc, Exception):
                raise _to_api_error(exc) from exc
            raise

    async def _tool_parser(self) -> str:
        """The tool call parser the LLM servers render tools for."""
        return (await self._model_info())["tool_call_parser"]

    async def _model_info(self) -> dict:
        """What the LLM servers say of the model (asked once)."""
        if self._model_info_cache is None:
            self._model_info_cache = await self._server_call("model_info")
        return self._model_info_cache

    async def _server_call(self, method: str, *args):
        """A plain call to an LLM server replica."""
        try:
            return await getattr(self.llm, method).remote(*args)
        except Exception as exc:
            raise _to_api_error(exc) from exc

    # --- helpers -------------------------------------------------------------

    async def _admit(self, lane: str, seats: int = 1, priority: int = 0, deadline_s: float | None = None,
                     key: str | None = None) -> int:
        """Wait for the router's ticket for `seats` sequences; 429 when the lane's queue is full."""
        self._ensure_sync()
        for attempt in range(2):
            request_id = uuid.uuid4().hex
            self._pending.add(request_id)
            ref = self._router_call("acquire", lane, self.config.router.queue_timeout_s, self.holder, request_id,
                                    seats, priority, deadline_s, key)
            try:
                ticket = await ref
            except ray.exceptions.RayActorError as exc:
                # The router went away (with the replica that created it): find or start
                # a new one; the LLM servers re-register with it within a second.
                if attempt:
                    raise APIError(503, "the router is unavailable; retry", "server_error",
                                   code="router_unavailable") from exc
                self.router = self._connect_router()
                try:  # tell the new router at once what this process holds (it adopts it)
                    await self._router_call("sync", self.holder, list(self._held.values()), sorted(self._pending))
                except Exception as sync_exc:  # noqa: BLE001 - the periodic sync tries again
                    logger.debug("sync with the new router failed: %s", sync_exc)
                continue
            except BaseException as exc:
                if not isinstance(exc, (QueueFullError, DeadlineError, KeyLimitError)):
                    # The caller left (or the call failed): withdraw the request by name,
                    # whatever state it is in at the router (queued, granted with the
                    # answer on its way, or not arrived yet).
                    self._router_call("withdraw", request_id)
                if isinstance(exc, Exception):
                    raise _to_api_error(exc) from exc
                raise
            finally:
                self._pending.discard(request_id)
            if ticket is None:  # withdrawn: only this process withdraws its requests, so never
                raise APIError(503, "admission was withdrawn; retry", "server_error")
            self._held[ticket] = [ticket, lane, seats, key]
            return ticket
        raise AssertionError("unreachable")

    def _connect_router(self):
        return get_or_create_router(self.config.router.actor_name, self.config.router.admission_config())

    def _spent(self, key: str | None, tokens: int) -> None:
        """Count a request's tokens against its API key's per-minute limit (at the router)."""
        if key is not None and tokens > 0 and self.config.router.key_tokens_per_minute is not None:
            self._router_call("record_tokens", key, tokens)

    def _release(self, ticket: int) -> None:
        self._held.pop(ticket, None)
        self._router_call("release", ticket)

    def _router_call(self, method: str, *args):
        """Call the router outside the current request's Ray task: Ray cancels what a request
        submitted when the request is cancelled (a client that disconnects), and a cancelled
        call loses its result (a ticket) or its effect (a release). Giving up is explicit
        here instead (withdraw), so the router's calls must never be cancelled under it."""
        return contextvars.Context().run(getattr(self.router, method).remote, *args)

    def _ensure_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop(), context=contextvars.Context())

    async def _sync_loop(self) -> None:
        """Tell the router which tickets this process holds, every router.holder_sync_s."""
        while True:
            try:
                lost = await self._router_call("sync", self.holder, list(self._held.values()), sorted(self._pending))
                if lost:
                    logger.warning("the router reclaimed ticket(s) %s this process had lost", lost)
            except Exception as exc:  # noqa: BLE001 - a router restarting: the next admission reconnects
                logger.debug("ticket sync with the router failed: %s", exc)
            await asyncio.sleep(self.config.router.holder_sync_s)

    def _call(self, method: str, choice: "_Choice", priority: int, plan: "_Plan", stream: bool = False):
        """Call the LLM server: an awaitable (a stream when `stream`, whose first item says the
        engine accepted the request) that `.cancel()` aborts."""
        handle = self.llm.options(stream=True) if stream else self.llm
        return getattr(handle, method).remote(choice.prompt, choice.messages, choice.params, priority,
                                              uuid.uuid4().hex, tools=plan.tools, announce=stream,
                                              lora=plan.target.lora)

    async def _complete(self, plan: "_Plan", priority: int, ticket: int) -> dict:
        calls = []
        try:
            calls = [self._call("complete", c, priority, plan) for c in plan.choices]
            outputs = await asyncio.gather(*calls)
        except asyncio.CancelledError:
            for call in calls:
                call.cancel()  # reaches the LLM server, whose engine aborts the request
            raise
        except Exception as exc:
            raise _to_api_error(exc) from exc
        finally:
            self._release(ticket)
        self._spent(plan.key, _usage(outputs, _per_prompt(plan))["total_tokens"])
        plan.replicas = [out.served_by for out in outputs if out.served_by]
        if plan.responses is not None:
            result = self._finish_response(plan, outputs[0], _usage(outputs))
            text = "".join(c["text"] for item in result["output"] if item["type"] == "message"
                           for c in item["content"])
        else:
            choices = [_choice(i, out, plan) for i, out in enumerate(outputs)]
            result = _envelope(plan.object_name, plan.body.model, choices, _usage(outputs, _per_prompt(plan)))
            first = choices[0]
            text = first["message"]["content"] if "message" in first else first["text"]
        self._answered(plan, result["id"], outputs, text or "")
        return result

    def _finish_response(self, plan: "_Plan", out: RequestOutput, usage: dict, items: list[dict] | None = None) -> dict:
        """The Response for a finished output, kept for previous_response_id when store is on."""
        ctx = plan.responses
        reason = out.finish_reason
        if items is None:
            content, calls = plan.parser.parse(out.text) if plan.parser else (out.text, [])
            content, stopped = _filter_text(plan, content or "")
            reason = "content_filter" if stopped else reason
            items = output_items(content, calls)
        elif plan.blocked:
            reason = "content_filter"
        response = response_object(ctx.body, ctx.response_id, reason, items, usage)
        if ctx.body.store:
            self.response_store.put(ctx.response_id, conversation_after(ctx.conversation, items))
        return response

    async def _response_events(self, stream, plan: "_Plan", ticket: int) -> AsyncIterator[str]:
        """A response as the Responses API streams it: typed events, text deltas as they come,
        each tool call (held back until the answer ends) as its item and arguments."""
        ctx, sequence = plan.responses, itertools.count()
        header = response_header(ctx.body, ctx.response_id, "in_progress")
        yield sse_event("response.created", next(sequence), response=header)
        yield sse_event("response.in_progress", next(sequence), response=header)
        text_state, message_id, text, final = _StreamText(plan.parser, plan.filters), None, "", None
        try:
            async for item in _until(stream, plan.expires_at):
                out = read_output(item)
                delta, _ = text_state.feed(out)
                if text_state.blocked and not out.finished:  # a filter ended the output here
                    final, plan.blocked = out, True
                if delta:
                    if message_id is None:
                        message_id = f"msg_{uuid.uuid4().hex}"
                        yield sse_event("response.output_item.added", next(sequence), output_index=0,
                                        item=message_item(message_id, "", "in_progress"))
                        yield sse_event("response.content_part.added", next(sequence), item_id=message_id,
                                        output_index=0, content_index=0, part=_text_part(""))
                    text += delta
                    yield sse_event("response.output_text.delta", next(sequence), item_id=message_id,
                                    output_index=0, content_index=0, delta=delta)
                if plan.blocked:
                    break
                if out.finished:
                    final = out
        except Exception as exc:  # noqa: BLE001 - reported to the client as the stream's error event
            error = _to_api_error(exc)
            yield sse_event("error", next(sequence), code=error.code, message=error.message, param=error.param)
            return
        finally:
            if final is None or plan.blocked:
                stream.cancel()  # a client that left (or a filter that ended it): the request is aborted
            self._release(ticket)
        _add_hits(plan, text_state)
        items = []
        if message_id is not None:
            item = message_item(message_id, text, "completed")
            yield sse_event("response.output_text.done", next(sequence), item_id=message_id, output_index=0,
                            content_index=0, text=text)
            yield sse_event("response.content_part.done", next(sequence), item_id=message_id, output_index=0,
                            content_index=0, part=_text_part(text))
            yield sse_event("response.output_item.done", next(sequence), output_index=0, item=item)
            items.append(item)
        for call in text_state.calls:
            item, index = function_call_item(call), len(items)
            yield sse_event("response.output_item.added", next(sequence), output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"})
            yield sse_event("response.function_call_arguments.delta", next(sequence), item_id=item["id"],
                            output_index=index, delta=item["arguments"])
            yield sse_event("response.function_call_arguments.done", next(sequence), item_id=item["id"],
                            output_index=index, arguments=item["arguments"])
            yield sse_event("response.output_item.done", next(sequence), output_index=index, item=item)
            items.append(item)
        self._spent(plan.key, _usage([final])["total_tokens"])
        response = self._finish_response(plan, final, _usage([final]), items)
        self._answered(plan, ctx.response_id, [final], text)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield sse_event(kind, next(sequence), response=response)

    async def _stream_chunks(self, streams, plan: "_Plan", ticket: int) -> AsyncIterator[str]:
        """Merge the choices' streams into SSE chunks; errors end the stream with an error event."""
        queue: asyncio.Queue = asyncio.Queue()
        object_name, body = plan.chunk_name, plan.body
        response_id = _new_id(object_name)
        chat = object_name == "chat.completion.chunk"

        async def pump(index, stream):
            try:
                async for item in _until(stream, plan.expires_at):
                    await queue.put((index, read_output(item)))
            except asyncio.CancelledError:
                stream.cancel()  # reaches the LLM server, whose engine aborts the request
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the client below
                stream.cancel()  # a timeout: the request must not run on for nobody
                await queue.put((index, exc))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        finals: dict[int, RequestOutput] = {}
        texts = [_StreamText(plan.parser, plan.filters) for _ in streams]
        try:
            for i, choice in enumerate(plan.choices):
                if chat:
                    delta = {"role": "assistant", "content": ""}
                    yield _data(_envelope(object_name, body.model, [_stream_choice(i, delta, None, None, plan)],
                                          None, response_id))
                elif choice.echo:
                    yield _data(_envelope(object_name, body.model, [_stream_choice(i, choice.echo, None, None, plan)],
                                          None, response_id))
            ended: set[int] = set()  # streams that ended (or that a filter ended)
            while len(ended) < len(streams):
                index, item = await queue.get()
                if item is None:
                    ended.add(index)
                    continue
                if isinstance(item, Exception):
                    yield _data(_to_api_error(item).body())
                    return
                if index in finals:  # ended by a filter: what is still on its way is dropped
                    continue
                text, calls = texts[index].feed(item)
                blocked = texts[index].blocked
                if item.finished or blocked:
                    finals[index] = item
                if blocked and not item.finished:
                    tasks[index].cancel()  # the rest is not wanted: abort it in the engine
                    ended.add(index)
                logprobs = item.delta_logprobs if item.delta_logprobs else None
                if not (text or calls or logprobs or item.finished or blocked):
                    continue
                reason = None
                if blocked:
                    reason = "content_filter"
                elif item.finished:
                    reason = _finish_reason(item, bool(texts[index].calls))
                if chat:
                    delta = {"content": text} if text or not calls else {}
                    if calls:
                        delta["tool_calls"] = [{"index": k, **call.to_openai()} for k, call in enumerate(calls)]
                    content = delta
                else:
                    content = text
                choice = _stream_choice(index, content, reason, logprobs, plan)
                yield _data(_envelope(object_name, body.model, [choice], None, response_id))
            outputs = [finals[i] for i in sorted(finals)]
            for state in texts:
                _add_hits(plan, state)
            self._answered(plan, response_id, outputs, texts[0].sent_text)
            self._spent(plan.key, _usage(outputs, _per_prompt(plan))["total_tokens"])
            if body.stream_options and body.stream_options.include_usage:
                yield _data(_envelope(object_name, body.model, [], _usage(outputs, _per_prompt(plan)), response_id))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()  # a client that left: cancelling the streams aborts the requests
            self._release(ticket)


class OpenAIIngress(OpenAIServing):
    """The HTTP routes' logic: the realtime lane runs here, the batch lane's calls go to the
    BatchRunner deployment (`batch`, a DeploymentHandle)."""

    def __init__(self, llm, batch, config: SemlineConfig, router=None) -> None:
        super().__init__(llm, config, router)
        self.batch = batch
        feedback = config.quality.feedback
        self.feedback = FeedbackStore(feedback.storage_dir, feedback.store_outputs, feedback.retention_s,
                                      feedback.max_responses)
        self.quality_metrics.feedback(self.feedback.summary())  # the ratings before a restart count too

    def _answered(self, plan: "_Plan", response_id: str, outputs: list[RequestOutput], text: str) -> None:
        super()._answered(plan, response_id, outputs, text)
        choice = plan.choices[0]
        write = self.feedback.record_response(response_id, plan.target.model, plan.target.experiment,
                                              plan.target.arm, choice.messages if choice.messages is not None
                                              else choice.prompt, text)
        asyncio.get_running_loop().run_in_executor(None, write)  # the file and its lock: off the event loop

    # --- feedback, adapters, experiments ----------------------------------------------

    async def post_feedback(self, request: Request) -> dict:
        body = self._validate_plain(FeedbackRequest, await _json_body(request))
        try:
            record = await asyncio.to_thread(self.feedback.add, body.response_id, body.numeric_score(), body.label,
                                             body.comment)
        except UnknownResponseError as exc:
            raise APIError(404, str(exc), param="response_id", code="response_not_found") from exc
        self.quality_metrics.feedback(await asyncio.to_thread(self.feedback.summary))
        return {"object": "feedback", **record}

    async def get_feedback(self, since: float = 0.0):
        records = await asyncio.to_thread(lambda: list(self.feedback.export(since)))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return Response(body, media_type="application/x-ndjson")

    async def load_lora_adapter(self, request: Request) -> dict:
        body = self._validate_plain(LoadLoRARequest, await _json_body(request))
        if not self.catalog.lora_enabled:
            raise APIError(400, "this deployment serves no LoRA adapters: start it with engine.enable_lora")
        await self._refresh_catalog()
        if self.catalog.knows(body.lora_name):
            raise APIError(400, f"a model named {body.lora_name!r} is already served", param="lora_name")
        # One LLM server reads it now (a bad folder is refused here); the others on first use.
        await self._server_call("load_lora", body.lora_name, body.lora_path)
        await self._router_call("set_adapter", body.lora_name, body.lora_path)
        await self._refresh_catalog()
        return {"object": "lora_adapter", "id": body.lora_name, "root": body.lora_path, "parent": self.catalog.base,
                "status": "loaded"}

    async def unload_lora_adapter(self, request: Request) -> dict:
        body = self._validate_plain(UnloadLoRARequest, await _json_body(request))
        await self._refresh_catalog()
        if body.lora_name not in self.catalog.dynamic:
            reason = "it is listed in the configuration" if body.lora_name in self.catalog.static else "none is loaded"
            raise APIError(404, f"cannot unload LoRA adapter {body.lora_name!r}: {reason}", param="lora_name",
                           code="model_not_found")
        await self._router_call("set_adapter", body.lora_name, None)
        await self._refresh_catalog()
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    async def experiments(self) -> dict:
        await self._refresh_catalog()
        return {"object": "list", "data": [c for c in self.catalog.cards() if "experiment" in c]}

    async def set_experiment_weights(self, name: str, request: Request) -> dict:
        body = self._validate_plain(ExperimentWeightsRequest, await _json_body(request))
        await self._refresh_catalog()
        current = self.catalog.weights.get(name)
        if current is None:
            raise APIError(404, f"no experiment named {name!r}", code="experiment_not_found")
        if set(body.weights) != set(current):
            raise APIError(400, f"weights must name each arm of {name!r}: {sorted(current)}", param="weights")
        if sum(body.weights.values()) <= 0:
            raise APIError(400, "some arm needs a weight above 0", param="weights")
        await self._router_call("set_weights", name, body.weights)
        await self._refresh_catalog()
        return next(c for c in self.catalog.cards() if c["id"] == name)

    async def upload_file(self, request: Request) -> dict:
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=self.config.batch.max_file_bytes)
        except Exception as exc:  # noqa: BLE001 - starlette raises several kinds for bad multipart bodies
            raise APIError(400, f"expected a multipart/form-data body with 'file' and 'purpose': {exc}") from exc
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing the 'file' part", param="file")
        if not isinstance(purpose, str):
            raise APIError(400, "missing the 'purpose' field", param="purpose")
        data = await upload.read()
        return await self._call_batch("create_file", data, upload.filename or "upload.jsonl", purpose)

    async def create_batch(self, request: Request) -> dict:
        data = await _json_body(request)
        try:
            body = BatchCreateRequest.model_validate(data)
        except ValidationError as exc:
            raise _to_api_error(exc) from exc
        return await self._call_batch("create_batch", body.input_file_id, body.endpoint, body.completion_window,
                                      body.metadata, _key_id(request))

    async def _call_batch(self, method: str, *args):
        try:
            result = await self.batch.call.remote(method, *args)
        except Exception as exc:
            raise _to_api_error(exc) from exc
        if isinstance(result, APIError):  # a client error, returned rather than raised
            raise result
        return result


async def _json_body(request: Request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}") from exc


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream")


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _new_id(object_name: str) -> str:
    prefix = "chatcmpl" if object_name.startswith("chat") else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def _envelope(object_name, model, choices, usage, response_id=None) -> dict:
    payload = {"id": response_id or _new_id(object_name), "object": object_name, "created": int(time.time()),
               "model": model, "choices": choices}
    if usage is not None:
        payload["usage"] = usage
    return payload


def _key_id(request: Request) -> str | None:
    return getattr(request.state, "api_key_id", None)


def _deadline_header(request: Request) -> float | None:
    """The request's time-to-first-token deadline in milliseconds (x-semline-deadline-ms)."""
    return _positive_ms_header(request, DEADLINE_HEADER)


def _positive_ms_header(request: Request, name: str) -> float | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = float("nan")
    if not 0 < milliseconds < 1e9:
        raise APIError(400, f"{name} must be a positive number of milliseconds", param=name)
    return milliseconds


def _timeout_error() -> APIError:
    return APIError(504, "the request did not finish within its time limit (http.request_timeout_s, or its "
                    f"{TIMEOUT_HEADER} header); it was stopped", "server_error", code="request_timeout")


async def _until(stream, expires_at: float | None) -> AsyncIterator:
    """The items of a stream until `expires_at` (time.monotonic()); then APIError 504 (the
    caller's cancellation of the stream aborts the request)."""
    iterator = stream.__aiter__()
    while True:
        try:
            if expires_at is None:
                item = await anext(iterator)
            else:
                item = await asyncio.wait_for(anext(iterator), max(0.0, expires_at - time.monotonic()))
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise _timeout_error() from exc
        yield item


@dataclass
class _Headers:
    """What the response headers say of a request that has no plan (embeddings)."""

    ignored: list[str]
    replicas: list[str] = field(default_factory=list)
    target: Target | None = None
    cache: str | None = None


def _with_headers(result, plan: "_Plan | _Headers"):
    """The response, naming in headers the replica(s) that served it, the experiment arm, a
    result-cache hit or miss, and the request fields this version ignored."""
    if isinstance(result, dict):
        result = JSONResponse(result)
    if plan.replicas:
        result.headers[REPLICA_HEADER] = ", ".join(dict.fromkeys(plan.replicas))
    if plan.target is not None and plan.target.arm is not None:
        result.headers[ARM_HEADER] = plan.target.arm
    if plan.cache is not None:
        result.headers[CACHE_HEADER] = plan.cache
    ignored = plan.ignored
    if not ignored:
        return result
    # Field names are anything a client sent: a header carries printable ASCII only.
    names = ", ".join(name.encode("ascii", "backslashreplace").decode() for name in ignored)
    result.headers[IGNORED_FIELDS_HEADER] = "".join(c if " " <= c <= "~" else "?" for c in names)[:1024]
    return result


def _encode_vector(vector: list[float], encoding: str):
    if encoding == "base64":  # OpenAI's: little-endian float32s
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _per_prompt(plan: "_Plan") -> int:
    return plan.body.n


def _usage(outputs: list[RequestOutput], n: int = 1) -> dict:
    """Prompt tokens once per prompt (each has n choices), completion tokens of every choice."""
    prompt = sum(o.metrics.num_prompt_tokens for o in outputs[::n])
    cached = sum(o.metrics.num_cached_tokens for o in outputs[::n])
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_reason(out: RequestOutput, called_tools: bool = False) -> str:
    if out.finish_reason == "length":
        return "length"
    return "tool_calls" if called_tools else "stop"


def _filter_text(plan: "_Plan", text: str) -> tuple[str, bool]:
    """(the text through the output filters, whether they ended it); hits counted on the plan."""
    if plan.filters is None:
        return text, False
    result = plan.filters.apply(text)
    plan.filter_hits.update(result.hits)
    return result.text, result.stopped


def _add_hits(plan: "_Plan", state: "_StreamText") -> None:
    if state.filter is not None:
        plan.filter_hits.update(state.filter.hits)


def _choice(index: int, out: RequestOutput, plan: "_Plan") -> dict:
    if plan.object_name == "chat.completion":
        content, calls = plan.parser.parse(out.text) if plan.parser else (out.text, [])
        filtered, stopped = _filter_text(plan, content or "")
        message = {"role": "assistant", "content": filtered if content is not None or stopped else None}
        if calls and not stopped:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return {"index": index, "message": message, "logprobs": _chat_logprobs(out.logprobs),
                "finish_reason": "content_filter" if stopped else _finish_reason(out, bool(calls))}
    echo = plan.choices[index].echo or ""
    text, stopped = _filter_text(plan, out.text)
    return {"index": index, "text": echo + text, "logprobs": _completion_logprobs(out.logprobs),
            "finish_reason": "content_filter" if stopped else _finish_reason(out)}


def _stream_choice(index: int, content, finish_reason, logprobs, plan: "_Plan") -> dict:
    if plan.chunk_name == "chat.completion.chunk":
        return {"index": index, "delta": content, "logprobs": _chat_logprobs(logprobs),
                "finish_reason": finish_reason}
    return {"index": index, "text": content, "logprobs": _completion_logprobs(logprobs),
            "finish_reason": finish_reason}


def _chat_logprobs(logprobs) -> dict | None:
    if logprobs is None:
        return None
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top_logprobs]}
        for lp in logprobs]}


def _completion_logprobs(logprobs) -> dict | None:
    if logprobs is None:
        return None
    return {"tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t: v for _, t, v in lp.top_logprobs} for lp in logprobs],
            "text_offset": []}


@dataclass
class _Choice:
    """One sequence to generate: a prompt (text or ids) or chat messages, and how to sample."""

    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams
    echo: str | None = None  # completions' echo: the prompt's text, put before the output


@dataclass
class _Plan:
    """A validated request: its sequences (prompts x n), and how their outputs are answered."""

    body: object
    choices: list[_Choice]
    object_name: str
    chunk_name: str
    ignored: list[str] = field(default_factory=list)
    tools: list[dict] | None = None  # offered to the model (rendered by the LLM server)
    parser: ToolParser | None = None  # reads tool calls out of the answers
    responses: "_ResponsesContext | None" = None  # a /v1/responses request, answered as a Response
    priority: int = 0  # within its lane at the router: lower first
    deadline_s: float | None = None  # its first token is due within this many seconds
    expires_at: float | None = None  # time.monotonic() by which it must be done (realtime); None: no limit
    key: str | None = None  # an id of the API key it came with (per-key limits)
    url: str = ""  # the route it came to
    target: Target | None = None  # the model (or experiment arm) that answers it
    filters: FilterChain | None = None  # the output filters its answers go through
    filter_hits: Counter = field(default_factory=Counter)
    blocked: bool = False  # a filter ended its (streamed) answer
    cache: str | None = None  # "hit" or "miss" when the result cache was asked
    replicas: list[str] = field(default_factory=list)  # the LLM server replicas that answered


@dataclass
class _ResponsesContext:
    body: ResponsesRequest
    response_id: str
    conversation: list[dict]  # the input, kept with the output for previous_response_id


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


class _StreamText:
    """One streamed choice's text: passed on as it comes, except from where a tool call may
    begin (held back until the output ends, then parsed into tool calls, or sent as text)."""

    def __init__(self, parser: ToolParser | None, filters: FilterChain | None = None) -> None:
        self.parser, self.text, self.sent = parser, "", 0
        self.in_call = False
        self.calls: list = []
        # The output filters: text is held back while a match may be in progress in it.
        self.filter: StreamFilter | None = filters.stream() if filters is not None else None

    @property
    def blocked(self) -> bool:
        return self.filter is not None and self.filter.stopped

    @property
    def sent_text(self) -> str:
        return self.filter.sent if self.filter is not None else self.text[:self.sent]

    def feed(self, out: RequestOutput) -> tuple[str, list]:
        """(text to send now, tool calls to send now), through the output filters."""
        chunk, calls = self._feed(out)
        if self.filter is None:
            return chunk, calls
        if self.blocked:
            return "", []
        chunk = self.filter.feed(chunk, final=out.finished)
        return chunk, [] if self.blocked else calls

    def _feed(self, out: RequestOutput) -> tuple[str, list]:
        self.text += out.delta_text
        if self.parser is None:
            return out.delta_text, []
        start = self.parser.start
        if not self.in_call:
            found = self.text.find(start, self.sent)
            if found >= 0:
                self.in_call = True
                ready = found
            else:
                ready = len(self.text) - held_back(self.text, start)
        else:
            ready = self.sent
        if out.finished:
            content, self.calls = self.parser.parse(self.text)
            ready = self.sent if self.calls else len(self.text)
        chunk, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        return chunk, self.calls if out.finished else []

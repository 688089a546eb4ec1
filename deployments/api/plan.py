"""A validated request on its way through the ingress (Plan: its sequences, how their outputs
are answered, its limits), what its headers ask (deadline, time limit) and what the response
headers say of it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from deployments.api.errors import APIError
from deployments.api.protocol import ResponsesRequest
from deployments.api.tools import ToolParser
from deployments.quality.catalog import Target
from deployments.quality.filters import FilterChain
from engine import RequestOutput, SamplingParams


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


async def json_body(request: Request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}") from exc


def key_id(request: Request) -> str | None:
    return getattr(request.state, "api_key_id", None)


def tenant_of(request: Request) -> str | None:
    tenant = getattr(request.state, "tenant", None)
    return None if tenant is None else tenant.name


def viewer(request: Request) -> tuple[str, bool] | None:
    """Who calls: (tenant name, is admin), for what belongs to a tenant (config.may_see)."""
    tenant = getattr(request.state, "tenant", None)
    return None if tenant is None else (tenant.name, tenant.role == "admin")


def deadline_header(request: Request) -> float | None:
    """The request's time-to-first-token deadline in milliseconds (x-semline-deadline-ms)."""
    return positive_ms_header(request, DEADLINE_HEADER)


def positive_ms_header(request: Request, name: str) -> float | None:
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


def timeout_error() -> APIError:
    return APIError(504, "the request did not finish within its time limit (http.request_timeout_s, or its "
                    f"{TIMEOUT_HEADER} header); it was stopped", "server_error", code="request_timeout")


async def until(stream, expires_at: float | None) -> AsyncIterator:
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
            raise timeout_error() from exc
        yield item


@dataclass
class Headers:
    """What the response headers say of a request that has no plan (embeddings)."""

    ignored: list[str]
    replicas: list[str] = field(default_factory=list)
    target: Target | None = None
    cache: str | None = None


def with_headers(result, plan: "Plan | Headers"):
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


@dataclass
class Choice:
    """One sequence to generate: a prompt (text or ids) or chat messages, and how to sample."""

    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams
    echo: str | None = None  # completions' echo: the prompt's text, put before the output
    # Completions' echo with max_tokens 0: the engine samples one token, which is dropped.
    echo_only: bool = False

    def received(self, out: RequestOutput) -> RequestOutput:
        """An output as the client is answered with it (echo only: no generated token)."""
        if not self.echo_only:
            return out
        reason = "length" if out.finish_reason in ("stop", "length") else out.finish_reason
        return dataclasses.replace(
            out, text="", token_ids=[], delta_text="", delta_token_ids=[], delta_logprobs=None,
            logprobs=[] if out.logprobs is not None else None, finish_reason=reason, stop_reason=None)


@dataclass
class Plan:
    """A validated request: its sequences (prompts x n), and how their outputs are answered."""

    body: object
    choices: list[Choice]
    object_name: str
    chunk_name: str
    ignored: list[str] = field(default_factory=list)
    tools: list[dict] | None = None  # offered to the model (rendered by the LLM server)
    parser: ToolParser | None = None  # reads tool calls out of the answers
    reasoning: str | None = None  # the reasoning parser's style (deployments/api/reasoning.py); None: none
    template_kwargs: dict | None = None  # chat_template_kwargs, for the LLM server's rendering
    responses: "ResponsesContext | None" = None  # a /v1/responses request, answered as a Response
    priority: int | None = None  # within its lane at the router: lower first (None: not asked)
    deadline_s: float | None = None  # its first token is due within this many seconds
    expires_at: float | None = None  # time.monotonic() by which it must be done (realtime); None: no limit
    key: str | None = None  # an id of the API key it came with (per-key limits)
    owner: str | None = None  # the tenant that sent it: its stored response and feedback are theirs
    lane: str = "realtime"  # the lane it runs in
    url: str = ""  # the route it came to
    target: Target | None = None  # the model (or experiment arm) that answers it
    filters: FilterChain | None = None  # the output filters its answers go through
    filter_hits: Counter = field(default_factory=Counter)
    blocked: bool = False  # a filter ended its (streamed) answer
    cache: str | None = None  # "hit" or "miss" when the result cache was asked
    replicas: list[str] = field(default_factory=list)  # the LLM server replicas that answered


@dataclass
class ResponsesContext:
    body: ResponsesRequest
    response_id: str
    conversation: list[dict]  # the input, kept with the output for previous_response_id
    input_items: list[dict]  # the input as GET /v1/responses/{id}/input_items lists it

"""The realtime lane's handlers: each request is validated and planned (deployments/api/plan.py),
admitted by the router (a ticket per sequence), run on the LLM servers, and answered whole or
streamed as SSE chunks (deployments/api/formatting.py). The HTTP application around them
(middleware, auth, OpenAPI) is deployments/api/http_app.py; errors become OpenAI's error body
in one place (deployments/api/errors.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from pydantic import BaseModel, ValidationError

from cluster.admission import LANE_PRIORITY, REALTIME_LANE
from deployments.api import formatting as fmt
from deployments.api.admission import Admission
from deployments.api import protocol
from deployments.api.errors import APIError, to_api_error
from deployments.api.plan import (TIMEOUT_HEADER, Choice, Headers, Plan, ResponsesContext, deadline_header, json_body,
                                  key_id, positive_ms_header, tenant_of, timeout_error, until, viewer,
                                  with_headers)
from deployments.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                      ResponsesRequest, TokenizeRequest)
from deployments.api.reasoning import THINK_END, THINK_START, ReasoningSplitter
from deployments.api.responses import (CHAT_EXTENSIONS, ResponsesError, ResponseStore, chat_request,
                                       conversation_after, function_call_item, input_items, message_item,
                                       output_items, reasoning_item, response_header, response_object,
                                       sse_event)
from deployments.api.tools import get_parser
from deployments.config import SemlineConfig, may_see, tenant_of_key
from deployments.llm_server import read_output
from deployments.ops.metrics import QualityMetrics
from deployments.quality.catalog import ModelCatalog, Target, UnknownModelError
from deployments.quality.filters import FilterChain
from deployments.quality.result_cache import cache_key, cacheable
from engine import RequestOutput
from engine.structured_output import StructuredOutput

logger = logging.getLogger(__name__)

ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
             "/v1/embeddings": EmbeddingRequest, "/v1/responses": ResponsesRequest}
DEFAULT_MAX_TOKENS = 256
_LOGGED_IGNORED: set[str] = set()  # field names already logged once


# How long /health waits for the router's answer before it says 503.
HEALTH_TIMEOUT_S = 2.0


class OpenAIServing:
    """Runs OpenAI requests through the router and the LLM servers, for both lanes.

    `llm` is a DeploymentHandle to the LLM server; the router actor is looked up
    by the name in the config (created on first use)."""

    def __init__(self, llm, config: SemlineConfig, router=None) -> None:
        self.llm = llm
        self.config = config
        self.admission = self._admission(router)
        self._model_info_cache: dict | None = None
        http = config.http
        self.response_store = ResponseStore(self.admission, http.max_stored_responses, http.response_ttl_s,
                                            http.max_stored_response_bytes)
        # Which model answers a name (base, adapter, experiment arm), filters, result cache.
        self.catalog = ModelCatalog(config)
        FilterChain(config.quality.filters)  # a classifier that cannot be imported fails the start, not a request
        self._filter_chains: dict[str, FilterChain | None] = {}
        self.quality_metrics = QualityMetrics()
        self._background: set[asyncio.Task] = set()  # background responses running here

    def _admission(self, router) -> Admission:
        """How requests get their seats: the router actor's tickets."""
        return Admission(self.config, f"{type(self).__name__}-{uuid.uuid4().hex[:12]}", router)

    # --- routes --------------------------------------------------------------

    async def health(self) -> dict:
        """Readiness: 200 once at least one LLM server replica has loaded its model and reported
        to the router (a replica registers only after its engine is up), else 503 with the
        reason: what a load balancer or a Kubernetes readiness probe should route by."""
        try:
            stats = await asyncio.wait_for(self.admission.call("stats"), timeout=HEALTH_TIMEOUT_S)
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
        try:
            max_model_len = (await self._model_info())["max_model_len"]
        except APIError:  # no LLM server replica yet: the cards without it
            max_model_len = None
        return {"object": "list", "data": [{**card, "max_model_len": max_model_len} for card in self.catalog.cards()]}

    async def completions(self, request: Request):
        return await self._http("/v1/completions", request)

    async def chat_completions(self, request: Request):
        return await self._http("/v1/chat/completions", request)

    async def _http(self, url: str, request: Request):
        """A realtime request; fields the API does not know are named in a response header."""
        expires_at = self._expiry(request)
        plan = await self.plan(url, await json_body(request), REALTIME_LANE, deadline_header(request))
        plan.key, plan.expires_at, plan.owner = key_id(request), expires_at, tenant_of(request)
        self._check_priority(plan)
        return with_headers(await self._run_until(plan, REALTIME_LANE), plan)

    def _check_priority(self, plan: "Plan") -> None:
        """A tenant asks for no more urgent a priority than its max_priority (403); a request
        that asks for none gets the default, 0, or its tenant's max_priority where that is later."""
        tenant = self.config.tenant(tenant_of_key(plan.key))
        floor = tenant.max_priority if tenant is not None else None
        if plan.priority is None:
            plan.priority = 0 if floor is None else max(0, floor)
        elif floor is not None and plan.priority < floor:
            raise APIError(403, f"priority {plan.priority} is more urgent than tenant {tenant.name!r} may ask for "
                           f"(its max_priority is {tenant.max_priority}; lower is more urgent)", "permission_error",
                           param="priority", code="priority_not_allowed")

    def _expiry(self, request: Request | None) -> float:
        """When (time.monotonic()) a realtime request that arrives now must be done."""
        timeout_s = self.config.http.request_timeout_s
        header = positive_ms_header(request, TIMEOUT_HEADER) if request is not None else None
        return time.monotonic() + (timeout_s if header is None else min(timeout_s, header / 1000))

    async def _run_until(self, plan: "Plan", lane: str):
        """_run within the plan's expiry: admission and a whole non-streamed answer; a stream
        checks it between chunks (until)."""
        try:
            return await asyncio.wait_for(self._run(plan, lane), max(0.0, plan.expires_at - time.monotonic()))
        except TimeoutError as exc:  # _run was cancelled: its calls aborted, its ticket released
            raise timeout_error() from exc

    async def respond(self, url: str, data, lane: str, key: str | None = None):
        """Validate one request for `url` and run it in `lane`: a response dict, or an SSE
        response when it asks to stream. Raises APIError. key: the id of the API key it is
        counted against (per-key limits)."""
        if url == "/v1/embeddings":
            return await self._embed(self.validate(url, data), lane, key)
        if url == "/v1/responses":
            plan = await self._responses_plan(data, lane, caller=(tenant_of_key(key), False))
            if plan.responses.body.background:
                raise APIError(400, "background: a batch's requests run in the background already; leave it out",
                               param="background")
        else:
            plan = await self.plan(url, data, lane)
        plan.key, plan.owner = key, tenant_of_key(key)
        self._check_priority(plan)
        return await self._run(plan, lane)

    async def responses(self, request: Request):
        expires_at = self._expiry(request)
        data = await json_body(request)
        plan = await self._responses_plan(data, REALTIME_LANE, deadline_header(request), viewer(request))
        plan.key, plan.expires_at, plan.owner = key_id(request), expires_at, tenant_of(request)
        self._check_priority(plan)
        if plan.responses.body.background:
            return with_headers(await self._start_background(plan), plan)
        return with_headers(await self._run_until(plan, REALTIME_LANE), plan)

    async def _start_background(self, plan: "Plan") -> dict:
        """A background response: stored as queued and answered at once; it runs on in this
        replica (GET /v1/responses/{id} reads it from any), until it ends or is cancelled."""
        ctx = plan.responses
        header = response_header(ctx.body, ctx.response_id, "queued")
        if not await self.response_store.start(header, ctx.input_items, plan.owner):
            raise APIError(413, "the response's input is larger than the response store holds "
                           "(http.max_stored_response_bytes)", param="input")
        task = asyncio.create_task(self._run_background(plan, header))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return header

    async def _run_background(self, plan: "Plan", header: dict) -> None:
        ctx = plan.responses
        run = asyncio.ensure_future(self._run_until(plan, REALTIME_LANE))
        cancelled = asyncio.ensure_future(self.response_store.wait_cancel(ctx.response_id))
        await asyncio.wait({run, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        if not run.done() and not cancelled.exception() and cancelled.result():
            run.cancel()  # aborts its engine request and releases its seat
        await asyncio.gather(run, return_exceptions=True)
        if run.cancelled() or run.exception() is None:
            return  # cancelled, or ended and stored (_finish_response)
        error = to_api_error(run.exception())
        logger.info("background response %s failed: %s", ctx.response_id, error.message)
        failed = {**header, "status": "failed", "error": {"code": error.code or error.type, "message": error.message}}
        try:
            await self.response_store.put(failed, ctx.input_items, ctx.conversation, plan.owner)
        except Exception as exc:  # noqa: BLE001 - the router is gone: nothing more to keep it in
            logger.warning("background response %s: its failure could not be stored: %r", ctx.response_id, exc)

    async def cancel_response(self, response_id: str, request: Request) -> dict:
        """POST /v1/responses/{id}/cancel: a background response stops (its status says
        cancelled); one already ended is returned as it is."""
        await self._stored_response(response_id, viewer(request))  # another tenant's: 404
        stored = await self.response_store.cancel(response_id)
        if stored is None:
            raise self._no_response(response_id)
        if not stored["response"].get("background"):
            raise APIError(400, "only a background response (background: true) can be cancelled",
                           param="response_id")
        return stored["response"]

    async def get_response(self, response_id: str, request: Request) -> dict:
        return (await self._stored_response(response_id, viewer(request)))["response"]

    async def response_input_items(self, response_id: str, request: Request) -> dict:
        items = (await self._stored_response(response_id, viewer(request)))["input_items"]
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}

    async def delete_response(self, response_id: str, request: Request) -> dict:
        await self._stored_response(response_id, viewer(request))  # another tenant's: 404
        if not await self.response_store.delete(response_id):
            raise self._no_response(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def _stored_response(self, response_id: str, caller: tuple[str, bool] | None) -> dict:
        """A stored response the caller may see (its tenant's, or any for an admin); else 404,
        which does not say whether another tenant's exists."""
        stored = await self.response_store.get(response_id)
        if stored is None or not may_see(caller, stored.get("owner")):
            raise self._no_response(response_id)
        return stored

    @staticmethod
    def _no_response(response_id: str) -> APIError:
        return APIError(404, f"response {response_id!r} was not found (responses are kept when stored, for a "
                        "limited time)", param="response_id", code="response_not_found")

    async def _responses_plan(self, data, lane: str, deadline_ms: float | None = None,
                              caller: tuple[str, bool] | None = None) -> "Plan":
        """A Responses request, translated into a chat completion's plan (deployments/api/responses.py).
        caller: who sends it (previous_response_id must be a response they may see)."""
        await self._know_model(data)
        body = self._validate_plain(ResponsesRequest, data)
        history: list[dict] = []
        if body.previous_response_id is not None:
            stored = await self.response_store.get(body.previous_response_id)
            history = stored["conversation"] if stored is not None and may_see(caller, stored.get("owner")) else None
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
        plan.responses = ResponsesContext(body, f"resp_{uuid.uuid4().hex}", conversation, input_items(body.input))
        plan.ignored = [name for name in body.ignored_fields() if name not in CHAT_EXTENSIONS]
        return plan

    async def embeddings(self, request: Request):
        data = await json_body(request)
        await self._know_model(data)
        body = self.validate("/v1/embeddings", data)
        return with_headers(await self._embed(body, REALTIME_LANE, key_id(request)), Headers(body.ignored_fields()))

    async def _embed(self, body: EmbeddingRequest, lane: str, key: str | None = None) -> dict:
        """Each input embedded by an LLM server replica (a seat each at the router)."""
        if body.dimensions is not None:
            size = (await self._model_info())["hidden_size"]
            if body.dimensions != size:
                raise APIError(400, f"dimensions {body.dimensions}: this model's embeddings have {size} "
                               "(shortening them is not supported)", param="dimensions")
        inputs = body.inputs()
        ticket = await self.admission.admit(lane, len(inputs), key=key)
        try:
            results = await asyncio.gather(*(self._server_call("embed", x) for x in inputs))
        finally:
            self.admission.release(ticket)
        self.admission.spent(key, sum(n for _, n in results), len(inputs))
        data = [{"object": "embedding", "index": i, "embedding": fmt.encode_vector(vector, body.encoding_format)}
                for i, (vector, _) in enumerate(results)]
        tokens = sum(n for _, n in results)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def tokenize(self, request: Request) -> dict:
        body = self._validate_plain(TokenizeRequest, await json_body(request))
        messages = [m.template_message() for m in body.messages] if body.messages is not None else None
        tools = [t.model_dump(exclude_none=True, include={"type", "function"}) for t in body.tools or []] or None
        tokens, strs = await self._server_call("tokenize", body.prompt, messages, tools, body.add_special_tokens,
                                               body.return_token_strs)
        info = await self._model_info()
        return {"count": len(tokens), "max_model_len": info["max_model_len"], "tokens": tokens, "token_strs": strs}

    async def detokenize(self, request: Request) -> dict:
        body = self._validate_plain(DetokenizeRequest, await json_body(request))
        return {"prompt": await self._server_call("detokenize", body.tokens)}

    def _validate_plain(self, model: type[BaseModel], data):
        """A request body validated by `model` (400), naming the served model if any (404)."""
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            raise to_api_error(exc) from exc
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
            self.catalog.update(await self.admission.call("catalog_state"))
        except Exception as exc:  # noqa: BLE001 - a restarting router: serve what is known
            logger.debug("catalog refresh failed: %s", exc)

    async def plan(self, url: str, data, lane: str, deadline_ms: float | None = None) -> "Plan":
        """Validate a request and turn it into the sequences to generate. Raises APIError.
        deadline_ms: from the request's deadline header (its body's ttft_deadline_ms wins)."""
        await self._know_model(data)
        body = self.validate(url, data)
        plan = await self._plan(body, lane)
        plan.url = url
        plan.priority = body.priority if "priority" in body.model_fields_set else None
        deadline_ms = body.ttft_deadline_ms if body.ttft_deadline_ms is not None else deadline_ms
        plan.deadline_s = None if deadline_ms is None else deadline_ms / 1000
        return plan

    async def _plan(self, body, lane: str) -> "Plan":
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
        info = await self._model_info()
        defaults = info.get("generation_defaults") or {}
        default_max_tokens = min(defaults.get("max_tokens", DEFAULT_MAX_TOKENS), limit)
        for name in ignored:
            if name not in _LOGGED_IGNORED and len(_LOGGED_IGNORED) < 1024:
                _LOGGED_IGNORED.add(name)
                logger.warning("ignoring the request field %r, which this version does not know", name)
        if isinstance(body, ChatCompletionRequest):
            max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
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
            choices = [Choice(None, messages, body.sampling_params(max_tokens, num_logprobs, i, structured,
                                                                    skip_special, body.prompt_logprobs, defaults))
                       for i in range(body.n)]
            plan = Plan(body, choices, "chat.completion", "chat.completion.chunk", ignored, tools, parser)
            plan.template_kwargs = body.template_options()
            self._plan_thinking(plan, body, info)
            return plan
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max_tokens
        # echo with logprobs: the prompt's logprobs come first (as many alternatives as asked).
        prompt_logprobs = body.prompt_logprobs
        if body.echo and body.logprobs is not None:
            prompt_logprobs = max(body.logprobs, prompt_logprobs or 0)
        choices = []
        for prompt in body.prompts():
            echo = (prompt if isinstance(prompt, str) else await self._server_call("detokenize", prompt)) \
                if body.echo else None
            choices += [Choice(prompt, None, body.sampling_params(max(1, max_tokens), body.logprobs, i, structured,
                                                                  prompt_logprobs=prompt_logprobs, defaults=defaults),
                               echo, echo_only=max_tokens == 0)
                        for i in range(body.n)]
        return Plan(body, choices, "text_completion", "text_completion", ignored)

    def _plan_thinking(self, plan: "Plan", body: ChatCompletionRequest, info: dict) -> None:
        """A reasoning model's thinking (deployments/api/reasoning.py, engine/thinking.py): how
        its answer is split, and what the engine follows (the thinking's end, after which a
        grammar applies; the budget; the reasoning tokens counted)."""
        style = info.get("reasoning_parser")
        if body.thinking_budget is not None and style is None:
            raise APIError(400, "thinking_budget: this model does not think (no reasoning parser)",
                           param="thinking_budget")
        if style is None or (body.chat_template_kwargs or {}).get("enable_thinking") is False:
            plan.reasoning = style  # thinking off: an output without a block is all answer
            return
        last = body.messages[-1]
        if body.continue_final_message and isinstance(last.content, str) \
                and last.content.rfind(THINK_START) > last.content.rfind(THINK_END):
            style = "deepseek_r1"  # the model goes on with a thought begun for it: the output is thinking
        plan.reasoning = style
        budget = body.thinking_budget if body.thinking_budget is not None else self.config.http.reasoning_budget
        ids = info["thinking_tokens"]
        thinking = {"thinking_budget": budget, "thinking_start": ids["start"], "thinking_end": ids["end"]}
        for choice in plan.choices:
            choice.params = choice.params.model_copy(update=thinking)

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
            raise to_api_error(exc) from exc
        if not self.catalog.knows(body.model):
            raise APIError(404, f"model {body.model!r} does not exist", param="model", code="model_not_found")
        return body

    def _resolve(self, plan: "Plan") -> Target:
        """The model (or experiment arm) that answers the plan; sticky per user, else API key."""
        try:
            return self.catalog.resolve(plan.body.model, getattr(plan.body, "user", None) or plan.key)
        except UnknownModelError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from exc

    async def _run(self, plan: "Plan", lane: str):
        """Admit through the router, then stream the choices or wait for their final outputs.
        A deterministic request already answered is answered from the result cache."""
        plan.target, plan.lane = self._resolve(plan), lane
        plan.filters = self._filters_for(plan.body.model)
        key, settings = None, self.config.quality.result_cache
        if settings.enabled and self.admission.router is not None and plan.responses is None and cacheable(plan) \
                and (settings.models is None or plan.body.model in settings.models):
            key = cache_key(plan.url, plan.target, plan.body, plan.owner)
            cached = await self.admission.call("cache_get", key, settings.ttl_s)
            self.quality_metrics.cache_lookup(plan.target, cached is not None)
            plan.cache = "miss" if cached is None else "hit"
            if cached is not None:
                return json.loads(cached)
        # A seat per sequence (n choices); the request's priority and deadline order the queue.
        ticket = await self.admission.admit(lane, len(plan.choices), plan.priority, plan.deadline_s, plan.key)
        priority = LANE_PRIORITY[lane]
        try:
            if plan.body.stream:
                streams = [self._call("stream", c, priority, plan, stream=True) for c in plan.choices]
                replicas = await self._accepted(streams)
                plan.replicas = [r for r in replicas if isinstance(r, str)]
                if plan.responses is not None:
                    return fmt.sse(self._response_events(streams[0], plan, ticket))
                return fmt.sse(self._stream_chunks(streams, plan, ticket))
        except BaseException:
            self.admission.release(ticket)
            raise
        result = await self._complete(plan, priority, ticket)
        if key is not None and all(c["finish_reason"] in ("stop", "length") for c in result["choices"]):
            self.admission.call("cache_put", key, json.dumps(result).encode(), settings.max_entries,
                                settings.max_bytes, plan.owner)
        return result

    def _filters_for(self, model: str) -> FilterChain | None:
        """The output filters of a public model name (None: it has none)."""
        if model not in self._filter_chains:
            chain = FilterChain([f for f in self.config.quality.filters if f.models is None or model in f.models])
            self._filter_chains[model] = chain or None
            if len(self._filter_chains) > 4096:  # names are checked before this, but bound it anyway
                self._filter_chains.pop(next(iter(self._filter_chains)))
        return self._filter_chains[model]

    def _answered(self, plan: "Plan", response_id: str, outputs: list[RequestOutput], text: str) -> None:
        """Count an answer for its model and arm (and, in the HTTP ingress, keep it for feedback)."""
        self.quality_metrics.answered(plan.target, outputs, plan.owner, plan.lane)
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
                raise to_api_error(exc) from exc
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
            raise to_api_error(exc) from exc

    # --- helpers -------------------------------------------------------------

    def _call(self, method: str, choice: "Choice", priority: int, plan: "Plan", stream: bool = False):
        """Call the LLM server: an awaitable (a stream when `stream`, whose first item says the
        engine accepted the request) that `.cancel()` aborts."""
        handle = self.llm.options(stream=True) if stream else self.llm
        return getattr(handle, method).remote(choice.prompt, choice.messages, choice.params, priority,
                                              uuid.uuid4().hex, tools=plan.tools, announce=stream,
                                              lora=plan.target.lora, template_kwargs=plan.template_kwargs)

    async def _complete(self, plan: "Plan", priority: int, ticket: int) -> dict:
        calls = []
        try:
            calls = [self._call("complete", c, priority, plan) for c in plan.choices]
            outputs = [c.received(out) for c, out in zip(plan.choices, await asyncio.gather(*calls))]
        except asyncio.CancelledError:
            for call in calls:
                call.cancel()  # reaches the LLM server, whose engine aborts the request
            raise
        except Exception as exc:
            raise to_api_error(exc) from exc
        finally:
            self.admission.release(ticket)
        self.admission.spent(plan.key, fmt.usage(outputs, fmt.per_prompt(plan))["total_tokens"], len(plan.choices))
        plan.replicas = [out.served_by for out in outputs if out.served_by]
        if plan.responses is not None:
            result = await self._finish_response(plan, outputs[0], fmt.usage(outputs))
            text = "".join(c["text"] for item in result["output"] if item["type"] == "message"
                           for c in item["content"])
        else:
            choices = [fmt.choice(i, out, plan) for i, out in enumerate(outputs)]
            result = fmt.envelope(plan.object_name, plan.body.model, choices, fmt.usage(outputs, fmt.per_prompt(plan)))
            if "message" in choices[0] and plan.body.prompt_logprobs is not None:  # vLLM: once, for the prompt
                result["prompt_logprobs"] = fmt.vllm_prompt_logprobs(outputs[0].prompt_logprobs)
            first = choices[0]
            text = first["message"]["content"] if "message" in first else first["text"]
        self._answered(plan, result["id"], outputs, text or "")
        return result

    async def _finish_response(self, plan: "Plan", out: RequestOutput, usage: dict,
                               items: list[dict] | None = None) -> dict:
        """The Response for a finished output, stored (GET /v1/responses/{id}, previous_response_id)
        when store is on."""
        ctx = plan.responses
        reason = out.finish_reason
        if items is None:
            reasoning, content, calls = fmt.parse_answer(plan, out.text)
            content, stopped = fmt.filter_text(plan, content or "")
            reason = "content_filter" if stopped else reason
            items = ([reasoning_item(f"rs_{uuid.uuid4().hex}", reasoning)] if reasoning else []) \
                + output_items(content, calls)
        elif plan.blocked:
            reason = "content_filter"
        response = response_object(ctx.body, ctx.response_id, reason, items, usage)
        if ctx.body.store:
            await self.response_store.put(response, ctx.input_items, conversation_after(ctx.conversation, items),
                                          plan.owner)
        return response

    async def _response_events(self, stream, plan: "Plan", ticket: int) -> AsyncIterator[str]:
        """A response as the Responses API streams it: typed events, text deltas as they come,
        each tool call (held back until the answer ends) as its item and arguments."""
        ctx, sequence = plan.responses, itertools.count()
        header = response_header(ctx.body, ctx.response_id, "in_progress")
        yield sse_event("response.created", next(sequence), response=header)
        yield sse_event("response.in_progress", next(sequence), response=header)
        text_state, message_id, text, final = fmt.StreamText(plan.parser, plan.filters), None, "", None
        # A reasoning model's thinking: its own output item (index 0), before the message's.
        thinking = ReasoningSplitter(plan.reasoning) if plan.reasoning else None
        reasoning = {"id": None, "text": "", "open": False}
        index = 0  # the message's output index

        def close_reasoning() -> list[str]:
            if not reasoning["open"]:
                return []
            reasoning["open"] = False
            rid, thought = reasoning["id"], reasoning["text"]
            return [sse_event("response.reasoning_text.done", next(sequence), item_id=rid, output_index=0,
                              content_index=0, text=thought),
                    sse_event("response.output_item.done", next(sequence), output_index=0,
                              item=reasoning_item(rid, thought))]

        try:
            async for item in until(stream, plan.expires_at):
                out = read_output(item)
                if thinking is not None:
                    thought, answer = thinking.feed(out.delta_text, out.finished)
                    out = dataclasses.replace(out, delta_text=answer)
                    if thought:
                        if reasoning["id"] is None:
                            reasoning.update(id=f"rs_{uuid.uuid4().hex}", open=True)
                            index = 1
                            yield sse_event("response.output_item.added", next(sequence), output_index=0,
                                            item=reasoning_item(reasoning["id"], "", "in_progress"))
                        reasoning["text"] += thought
                        yield sse_event("response.reasoning_text.delta", next(sequence), item_id=reasoning["id"],
                                        output_index=0, content_index=0, delta=thought)
                delta, _ = text_state.feed(out)
                if text_state.blocked and not out.finished:  # a filter ended the output here
                    final, plan.blocked = out, True
                if delta:
                    for event in close_reasoning():
                        yield event
                    if message_id is None:
                        message_id = f"msg_{uuid.uuid4().hex}"
                        yield sse_event("response.output_item.added", next(sequence), output_index=index,
                                        item=message_item(message_id, "", "in_progress"))
                        yield sse_event("response.content_part.added", next(sequence), item_id=message_id,
                                        output_index=index, content_index=0, part=fmt.text_part(""))
                    text += delta
                    yield sse_event("response.output_text.delta", next(sequence), item_id=message_id,
                                    output_index=index, content_index=0, delta=delta)
                if plan.blocked:
                    break
                if out.finished:
                    final = out
        except Exception as exc:  # noqa: BLE001 - reported to the client as the stream's error event
            error = to_api_error(exc)
            yield sse_event("error", next(sequence), code=error.code, message=error.message, param=error.param)
            return
        finally:
            if final is None or plan.blocked:
                stream.cancel()  # a client that left (or a filter that ended it): the request is aborted
            self.admission.release(ticket)
        fmt.add_hits(plan, text_state)
        for event in close_reasoning():
            yield event
        items = [reasoning_item(reasoning["id"], reasoning["text"])] if reasoning["id"] is not None else []
        if message_id is not None:
            item = message_item(message_id, text, "completed")
            yield sse_event("response.output_text.done", next(sequence), item_id=message_id, output_index=index,
                            content_index=0, text=text)
            yield sse_event("response.content_part.done", next(sequence), item_id=message_id, output_index=index,
                            content_index=0, part=fmt.text_part(text))
            yield sse_event("response.output_item.done", next(sequence), output_index=index, item=item)
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
        self.admission.spent(plan.key, fmt.usage([final])["total_tokens"], len(plan.choices))
        response = await self._finish_response(plan, final, fmt.usage([final]), items)
        self._answered(plan, ctx.response_id, [final], text)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield sse_event(kind, next(sequence), response=response)

    async def _stream_chunks(self, streams, plan: "Plan", ticket: int) -> AsyncIterator[str]:
        """Merge the choices' streams into SSE chunks; errors end the stream with an error event."""
        queue: asyncio.Queue = asyncio.Queue()
        object_name, body = plan.chunk_name, plan.body
        response_id = fmt.new_id(object_name)
        chat = object_name == "chat.completion.chunk"

        async def pump(index, stream):
            try:
                async for item in until(stream, plan.expires_at):
                    await queue.put((index, plan.choices[index].received(read_output(item))))
            except asyncio.CancelledError:
                stream.cancel()  # reaches the LLM server, whose engine aborts the request
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the client below
                stream.cancel()  # a timeout: the request must not run on for nobody
                await queue.put((index, exc))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        finals: dict[int, RequestOutput] = {}
        texts = [fmt.StreamText(plan.parser, plan.filters) for _ in streams]
        # Chat with a reasoning model: each choice's thinking goes apart, before its answer.
        thinking = [ReasoningSplitter(plan.reasoning) for _ in streams] if chat and plan.reasoning else None
        # Completions: where each choice's next token starts in its text (logprobs' text_offset);
        # an echo with logprobs waits for the prompt's logprobs (in the first output).
        offsets = [len(c.echo or "") for c in plan.choices]
        echo_later = {i for i, c in enumerate(plan.choices) if c.echo is not None and c.params.logprobs is not None}
        options = body.stream_options
        running = fmt.RunningUsage(len(streams), fmt.per_prompt(plan)) if options and options.continuous_usage_stats \
            else None
        released = False
        try:
            for i, choice in enumerate(plan.choices):
                if chat:
                    delta = {"role": "assistant", "content": ""}
                    yield fmt.data(fmt.envelope(object_name, body.model, [fmt.stream_choice(i, delta, None, None, plan)],
                                          None, response_id))
                elif choice.echo and i not in echo_later:
                    yield fmt.data(fmt.envelope(object_name, body.model, [fmt.stream_choice(i, choice.echo, None, None, plan)],
                                          None, response_id))
            ended: set[int] = set()  # streams that ended (or that a filter ended)
            while len(ended) < len(streams):
                index, item = await queue.get()
                if item is None:
                    ended.add(index)
                    continue
                if isinstance(item, Exception):
                    yield fmt.data(to_api_error(item).body())
                    return
                if index in finals:  # ended by a filter: what is still on its way is dropped
                    continue
                if index in echo_later:
                    echo_later.discard(index)
                    echoed = fmt.stream_choice(index, plan.choices[index].echo, None, item.prompt_logprobs or [], plan)
                    yield fmt.data(fmt.envelope(object_name, body.model, [echoed], None, response_id))
                reasoning = ""
                if thinking is not None:
                    reasoning, answer = thinking[index].feed(item.delta_text, item.finished)
                    item = dataclasses.replace(item, delta_text=answer)
                text, calls = texts[index].feed(item)
                if running is not None:
                    running.add(index, item)
                blocked = texts[index].blocked
                if item.finished or blocked:
                    finals[index] = item
                if blocked and not item.finished:
                    tasks[index].cancel()  # the rest is not wanted: abort it in the engine
                    ended.add(index)
                logprobs = item.delta_logprobs if item.delta_logprobs else None
                if not (text or calls or logprobs or reasoning or item.finished or blocked):
                    continue
                reason = None
                if blocked:
                    reason = "content_filter"
                elif item.finished:
                    reason = fmt.finish_reason(item, bool(texts[index].calls))
                if chat:
                    delta = {"content": text} if text or not (calls or reasoning) else {}
                    if reasoning:
                        delta["reasoning_content"] = delta["reasoning"] = reasoning
                    if calls:
                        delta["tool_calls"] = [{"index": k, **call.to_openai()} for k, call in enumerate(calls)]
                    content = delta
                else:
                    content = text
                choice = fmt.stream_choice(index, content, reason, logprobs, plan, offsets[index])
                offsets[index] += sum(len(lp.token) for lp in logprobs or ())
                yield fmt.data(fmt.envelope(object_name, body.model, [choice], running and running.usage(), response_id))
            # Every sequence ended: the seats go back before the last chunks, so a client that
            # sends its next request on [DONE] finds them free (not still on their way).
            released = True
            self.admission.release(ticket)
            outputs = [finals[i] for i in sorted(finals)]
            for state in texts:
                fmt.add_hits(plan, state)
            self._answered(plan, response_id, outputs, texts[0].sent_text)
            self.admission.spent(plan.key, fmt.usage(outputs, fmt.per_prompt(plan))["total_tokens"],
                                 len(plan.choices))
            if options and options.include_usage:
                yield fmt.data(fmt.envelope(object_name, body.model, [], fmt.usage(outputs, fmt.per_prompt(plan)), response_id))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()  # a client that left: cancelling the streams aborts the requests
            if not released:
                self.admission.release(ticket)

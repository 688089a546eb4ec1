"""The LLM server deployment: each Serve replica owns one AsyncEngine.

A thin shim: the engine knows nothing of Ray. Prompts arrive as text, token ids
or chat messages; outputs stream back as RequestOutput objects.

Each replica also keeps the router informed (a heartbeat thread: it is alive
and how many requests it takes), reports the router's backlog to Serve's
autoscaler (`record_autoscaling_stats`) and its free KV blocks to the request
router that picks replicas (`record_routing_stats`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

import ray
import torch

from cluster.executors import ParallelConfig, RayExecutor
from cluster.router import get_or_create_router
from deployments.ops.metrics import ServerMetrics
from engine import AsyncEngine, EngineConfig, RequestError, RequestOutput, SamplingParams
from engine.loader import encode_text
from deployments.api.chat import render_chat, resolve_parser_name
from deployments.api.reasoning import resolve_reasoning_parser, thinking_tokens

logger = logging.getLogger(__name__)

HEARTBEAT_PERIOD_S = 1.0
# The window of the realtime TTFT reported to the autoscaler (seconds).
TTFT_WINDOW_S = 10.0


class LLMServer:
    def __init__(self, engine_config: dict, num_threads: int, router_name: str | None = None,
                 router_config: dict | None = None, capacity: int | None = None,
                 model_name: str = "semline", parallel_config: dict | None = None,
                 tool_call_parser: str = "auto", stream_interval_ms: float = 0.0,
                 stream_chunks_per_s: float | None = None, reasoning_parser: str = "auto") -> None:
        # First: Serve calls __del__ even when the engine fails to start.
        self._stop, self.router = threading.Event(), None
        # Ray sets OMP_NUM_THREADS=1 in replicas: use the CPUs this replica was given.
        torch.set_num_threads(max(1, num_threads))
        self.engine = AsyncEngine(EngineConfig.from_dict({**engine_config, "num_threads": max(1, num_threads)}),
                                  executor=RayExecutor(ParallelConfig.from_dict(parallel_config)))
        # None: the engine's max_num_seqs, less the router's headroom for light tenants (their seats
        # beyond the capacity must find room in the engine).
        self.capacity = capacity or max(1, self.engine.engine.config.max_num_seqs
                                        - (router_config or {}).get("light_headroom", 0))
        self.stream_interval_s = stream_interval_ms / 1000
        self.stream_chunks_per_s = stream_chunks_per_s
        self.num_streams = 0  # streams open now (generate() calls that stream)
        self.replica_id = _replica_id()
        self.tool_call_parser = resolve_parser_name(self.engine.tokenizer, tool_call_parser)
        self.reasoning_parser = resolve_reasoning_parser(self.engine.tokenizer, reasoning_parser)
        self.max_token_bytes = max_token_bytes(self.engine.tokenizer)
        self.router_stats: dict = {}
        # LoRA adapters: those of the configuration, and those loaded at run time (name -> folder).
        self.static_loras = dict(self.engine.engine.config.lora_modules or {})
        self._lora_paths: dict[str, str] = {}
        self._lora_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the replica's, once an adapter was loaded
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=4096)  # (when, realtime TTFT)
        self.metrics = ServerMetrics(model_name)
        self.router_name, self.router_config = router_name, router_config or {}
        if router_name is not None:
            self.router = get_or_create_router(router_name, self.router_config)
            self._heartbeat()  # the router knows this replica before the first request arrives
        threading.Thread(target=self._background_loop, name="heartbeat-and-metrics", daemon=True).start()

    async def model_info(self) -> dict:
        core = self.engine.engine
        return {"max_model_len": core.max_model_len, "vocab_size": core.runner.args.vocab_size,
                "hidden_size": core.runner.args.hidden_size, "tool_call_parser": self.tool_call_parser,
                "generation_defaults": dict(core.generation_defaults), "reasoning_parser": self.reasoning_parser,
                "thinking_tokens": thinking_tokens(self.engine.tokenizer, self.reasoning_parser)}

    def prompt_ids(self, prompt: str | list[int] | None, messages: list[dict] | None,
                   tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        """A request's prompt token ids (its text tokenized, or its chat messages and tools
        rendered), checked against the engine's limits (RequestError). Run off the event loop
        and the engine's thread (generate does): tokenizing 1 MiB of text takes ~0.8 s here,
        which would stall every stream of the replica. A text so long that its bytes alone
        make more tokens than the engine accepts is refused before it is tokenized."""
        core = self.engine.engine
        texts = [prompt] if isinstance(prompt, str) else [m.get("content") for m in messages or ()]
        num_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str))
        at_least = -(-num_bytes // self.max_token_bytes)
        if at_least > core.max_prompt_tokens:
            raise RequestError(f"the prompt has at least {at_least} tokens; this server accepts at most "
                               f"{core.max_prompt_tokens}")
        if messages is not None:
            ids = render_chat(self.engine.tokenizer, messages, tools, self.tool_call_parser, template_kwargs)
        elif isinstance(prompt, str):
            ids = encode_text(self.engine.tokenizer, prompt)
        else:
            ids = list(prompt)
        core.check_prompt(ids)
        return ids

    async def generate(self, prompt: str | list[int] | None, messages: list[dict] | None,
                       params: SamplingParams, priority: int, request_id: str, tools: list[dict] | None = None,
                       announce: bool = False, lora: tuple[str, str] | None = None, interval: float | None = None,
                       template_kwargs: dict | None = None) -> AsyncIterator[RequestOutput | None]:
        """Stream one request's outputs; cancelling the stream aborts it in the engine.
        announce: first yield None once the engine has accepted the request (its validation
        error is raised before that), so a caller can answer 4xx before it starts a stream.
        Every output names this replica (served_by); so does the announcement (instead of None).
        lora: (name, folder) of the LoRA adapter that serves it, loaded here on first use.
        template_kwargs: more variables for the chat template (chat_template_kwargs).
        interval: outputs within this many seconds of the last one go as one (merged; the
        first and the last never wait); None: the replica's stream_interval_ms, longer while
        many streams are open (chunk_interval)."""
        if lora is not None:
            await self.load_lora(*lora)
        # Outputs cross processes: each carries what is new, the last the totals too.
        params = params.model_copy(update={"output_kind": "delta"})
        ids = await asyncio.to_thread(self.prompt_ids, prompt, messages, tools, template_kwargs)
        stream = await self.engine.submit(ids, params, request_id, priority, lora[0] if lora is not None else None)
        tracker = self.metrics.request_tracker(priority)
        started, first = time.monotonic(), True
        counted = interval is None
        self.num_streams += counted
        try:
            if announce:
                yield self.replica_id
            async for output in stream.coalesced(self.chunk_interval if interval is None else interval):
                tracker.observe(output)
                if first and output.delta_token_ids and priority == 0:  # realtime TTFT, for the autoscaler
                    self._ttfts.append((time.monotonic(), time.monotonic() - started))
                first = first and not output.delta_token_ids
                output.served_by = self.replica_id
                yield output
        finally:
            self.num_streams -= counted
            # Serve cancels this generator when the caller goes away; close the engine's
            # stream now (not at garbage collection) so the request is aborted at once.
            await stream.aclose()

    async def stream(self, *args, **kwargs) -> AsyncIterator[str | bytes]:
        """generate() for a caller in another process (the ingress, through a Serve handle):
        each output pickled here by the C pickler, which Ray then moves as plain bytes (its
        own cloudpickle of a RequestOutput was a visible share of a busy replica's CPU); read
        them with read_output. The announcement (the replica id) stays a string."""
        async for output in self.generate(*args, **kwargs):
            yield output if isinstance(output, str) else pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)

    def chunk_interval(self) -> float:
        """How long an open stream waits after a chunk before it sends its next: the
        configured stream_interval_ms, or, while many streams are open, long enough that all of
        them together send at most stream_chunks_per_s chunks a second."""
        if not self.stream_chunks_per_s:
            return self.stream_interval_s
        return max(self.stream_interval_s, self.num_streams / self.stream_chunks_per_s)

    async def complete(self, prompt: str | list[int] | None, messages: list[dict] | None,
                       params: SamplingParams, priority: int, request_id: str, tools: list[dict] | None = None,
                       announce: bool = False, lora: tuple[str, str] | None = None,
                       template_kwargs: dict | None = None) -> RequestOutput:
        """The final output only: no per-token messages for callers that do not stream
        (the batch lane, non-streamed requests). Cancelling the call aborts the request."""
        final = None
        # Only the end is wanted: everything after the first token (which the realtime TTFT
        # figure needs) is merged into it.
        async for output in self.generate(prompt, messages, params, priority, request_id, tools, lora=lora,
                                          interval=math.inf, template_kwargs=template_kwargs):
            final = output
        return final

    async def load_lora(self, name: str, path: str) -> None:
        """Serve the adapter `name` from `path` here, unless it already is (LoRAError if the
        folder cannot be served). Loaded at run time, it goes when the router no longer lists it."""
        if self._lora_paths.get(name) == path or (name in self.static_loras and self.static_loras[name] == path):
            return
        self._loop = asyncio.get_running_loop()
        async with self._lora_lock:
            if self._lora_paths.get(name) == path:
                return
            if name in self._lora_paths:  # the name now serves another folder
                await self.engine.remove_lora(name)
                del self._lora_paths[name]
            await self.engine.add_lora(name, path)
            self._lora_paths[name] = path

    async def _drop_unlisted_loras(self, listed: dict[str, str]) -> None:
        async with self._lora_lock:
            for name in [n for n, p in self._lora_paths.items() if listed.get(n) != p]:
                await self.engine.remove_lora(name)
                del self._lora_paths[name]

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, tools: list[dict] | None,
                       add_special_tokens: bool, with_strings: bool = False) -> tuple[list[int], list[str] | None]:
        """(token ids, and each token's text when asked) of a prompt, or of chat messages
        rendered as a chat completion renders them (off the event loop, as generate's)."""
        tokenizer = self.engine.tokenizer

        def run() -> tuple[list[int], list[str] | None]:
            if messages is not None:
                ids = render_chat(tokenizer, messages, tools, self.tool_call_parser)
            else:
                ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            return ids, tokenizer.convert_ids_to_tokens(ids) if with_strings else None

        return await asyncio.to_thread(run)

    async def embed(self, text: str | list[int]) -> tuple[list[float], int]:
        """(the embedding, the number of tokens) of a text or of token ids."""
        ids = await asyncio.to_thread(self.prompt_ids, text, None)
        return await self.engine.embed(ids), len(ids)

    async def detokenize(self, token_ids: list[int]) -> str:
        vocab = self.engine.engine.runner.args.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        return self.engine.tokenizer.decode(token_ids)

    def stats(self) -> dict:
        stats = self.engine.stats()
        return {"replica_id": self.replica_id, "num_running": stats.num_running, "num_waiting": stats.num_waiting,
                "kv_cache_usage": stats.kv_cache_usage, "num_free_blocks": stats.num_free_blocks,
                "num_generation_tokens": stats.num_generation_tokens,
                "prefix_cache_hit_rate": stats.prefix_cache_hit_rate}

    def record_routing_stats(self) -> dict:
        """Read by deployments.routing.FreeKVRouter in every process that calls this deployment."""
        stats = self.engine.stats()
        return {"num_free_blocks": stats.num_free_blocks, "num_waiting": stats.num_waiting}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Work the router holds back counts as demand, and the realtime latency users feel
        (router wait, this replica's TTFT) can ask for replicas (deployments.ops.autoscaling)."""
        queued = self.router_stats.get("queued", {})
        now = time.monotonic()
        while self._ttfts and now - self._ttfts[0][0] > TTFT_WINDOW_S:
            self._ttfts.popleft()
        ttfts = sorted(t for _, t in self._ttfts)
        return {"router_queued": float(sum(queued.values())),
                "router_queue_wait_s": float(self.router_stats.get("realtime_queue_wait_s", 0.0)),
                "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else 0.0}

    def check_health(self) -> None:
        """Called by Serve: an engine whose loop died makes the replica unhealthy."""
        if not self.engine.is_running:
            raise RuntimeError("engine loop is not running")
        problem = self.engine.engine.health_problem  # e.g. a pipeline stage being replaced
        if problem:
            raise RuntimeError(problem)

    def __del__(self) -> None:
        self._stop.set()
        if self.router is not None:
            try:
                self.router.deregister.remote(self.replica_id)
            except Exception:  # noqa: BLE001 - shutting down; the router's TTL covers it
                pass

    def _heartbeat(self) -> None:
        try:
            self.router_stats = ray.get(self.router.heartbeat.remote(self.replica_id, self.capacity), timeout=5)
            listed = self.router_stats.get("adapters", {})
            if self._loop is not None and any(listed.get(n) != p for n, p in self._lora_paths.items()):
                asyncio.run_coroutine_threadsafe(self._drop_unlisted_loras(listed), self._loop)
        except ray.exceptions.RayActorError:
            if not self._stop.is_set():  # the router went away with its owner: find or start a new one
                logger.warning("router is gone; reconnecting")
                self.router = get_or_create_router(self.router_name, self.router_config)
        except Exception as exc:  # noqa: BLE001 - a slow or restarting router: try again next period
            if not self._stop.is_set():
                logger.warning("router heartbeat failed: %s", exc)

    def _background_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_PERIOD_S):
            if self.router is not None:
                self._heartbeat()
            try:
                self.metrics.update_engine(self.engine.stats())
            except Exception as exc:  # noqa: BLE001 - metrics must never take the replica down
                logger.warning("metrics update failed: %s", exc)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not running under Serve
        return uuid.uuid4().hex


def read_output(item: str | bytes | RequestOutput) -> str | RequestOutput:
    """An item of LLMServer.stream as it was before pickling (generate()'s items pass as they are)."""
    return pickle.loads(item) if isinstance(item, bytes) else item


def max_token_bytes(tokenizer) -> int:
    """The most bytes of text one token stands for. A token's vocabulary string takes at least
    as many UTF-8 bytes as the text it decodes to (byte-level BPE writes a byte as one or two
    bytes' worth of character, SentencePiece a space as 3), so the tokens are decoded longest
    string first until no longer string is left that could beat the best found."""
    strings = sorted(tokenizer.get_vocab(), key=lambda t: len(t.encode("utf-8", "surrogatepass")), reverse=True)
    best = 1
    for token in strings:
        if len(token.encode("utf-8", "surrogatepass")) <= best:
            break
        best = max(best, len(tokenizer.convert_tokens_to_string([token]).encode("utf-8", "surrogatepass")))
    return best

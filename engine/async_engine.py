"""AsyncEngine: the engine loop in a background thread, many asyncio callers.

The engine is owned by one thread. Callers talk to it through a command queue
(add, abort) and receive outputs on per-request asyncio queues, so any number of
coroutines on any event loops can stream at once. Leaving the iterator early
(break, cancellation, client disconnect) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import math
import queue
import ctypes
import ctypes.util
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, RequestError
from engine.lora import load_adapter
from engine.metrics import EngineStats
from engine.outputs import RequestOutput, merge_outputs
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Idle periods trim the heap at most this often (benchmarks/soak.py measures the memory).
TRIM_INTERVAL_S = 5.0
# Python's GIL switch interval while an AsyncEngine runs (see AsyncEngine.__init__).
SWITCH_INTERVAL_S = 0.0005


def _load_libc():
    """glibc, for malloc_trim; None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no more requests can run."""


class RequestFailedError(RuntimeError):
    """This request failed on its own (its sampling, its stop checks); the engine and the
    other requests go on."""


@dataclass
class _AddCommand:
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    priority: int
    stream: "_Stream"
    accepted: concurrent.futures.Future
    grammar: object = None
    lora: str | None = None


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    # When the consumer next takes an output (time.monotonic(), the loop's clock; set by
    # OutputStream.coalesced): until then a step's output waits here, on the engine's
    # thread, and goes with the next one due, so the consumer's loop is not woken (nor the
    # GIL and a core taken from the step) once a step for outputs it would only merge.
    due: float = -math.inf
    held: list = field(default_factory=list)

    def put(self, item) -> None:
        _hand_over(self.loop, [(self.queue, item)])


def _next_send(now: float, interval: float) -> float:
    """When a coalesced stream that sent at `now` may send again: the multiple of `interval`
    nearest to now + interval (half an interval to one and a half later, one on average), so
    streams with the same interval send at the same moments and their consumers wake once
    for all of them, not once each."""
    if interval <= 0 or not math.isfinite(interval):
        return now + interval
    return math.ceil((now + interval / 2) / interval) * interval


def _hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Put (queue, item) pairs on queues of `loop` from the engine's thread, with one wake-up."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the caller's loop is closed: nobody is listening
        pass


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


class OutputStream:
    """One accepted request's outputs, as an async iterator; the last has `finished=True`.
    Closing it before then (aclose, or leaving an `async for` through generate) aborts the
    request and frees its blocks."""

    def __init__(self, engine: "AsyncEngine", request_id: str, outputs: _Stream) -> None:
        self._engine, self.request_id, self._outputs = engine, request_id, outputs.queue
        self._stream = outputs
        self._finished = self._closed = False

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._outputs.get()
        except BaseException:
            await self.aclose()
            raise
        return self._take(item)

    def _take(self, item) -> RequestOutput:
        """An item off the queue: the output (noting whether it is the last), or its error raised."""
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finished
        return item

    async def coalesced(self, interval: float | Callable[[], float]) -> AsyncIterator[RequestOutput]:
        """The outputs, those that come less than `interval` seconds after the last one handed
        out merged into one (merge_outputs), so a consumer that pays per item (a Serve stream:
        a message through the ingress and the proxy for each) takes fewer of them when tokens
        come faster than that. The first output is never held back; nor is the last, once it
        has come. 0: what is already waiting when the consumer asks goes as one (a consumer
        that keeps up gets each output alone). A callable is asked again after each item."""
        loop = asyncio.get_running_loop()
        next_interval = interval if callable(interval) else lambda: interval
        due = -math.inf  # when the next output may go (math.inf: only with the last)
        async for first in self:
            batch = [first]
            while not batch[-1].finished:
                wait = due - loop.time()
                try:  # cancelling Queue.get loses no item
                    if wait <= 0:
                        item = self._outputs.get_nowait()
                    elif wait == math.inf:
                        item = await self._outputs.get()
                    else:
                        item = await asyncio.wait_for(self._outputs.get(), wait)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                batch.append(self._take(item))
            due = self._stream.due = _next_send(loop.time(), next_interval())
            yield merge_outputs(batch)

    async def aclose(self) -> None:
        if not self._finished and not self._closed:
            self._engine.abort(self.request_id)
        self._closed = True

    def __del__(self) -> None:  # dropped unread: the request must not run on for nobody
        if not self._finished and not self._closed:
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 executor=None) -> None:
        """Runs `engine`, or one built from `config` (and `executor`) on the engine thread itself.

        Built there so that one thread runs the process's parallel CPU work: each thread that
        starts OpenMP regions gets its own pool of workers, and once a process has more of
        them than cores, libgomp's workers stop spinning between regions and every region
        pays a wake-up: a model loaded on the caller's thread and stepped on this one decoded
        ~2.5x slower per token (q4_linear 15 -> 40-60 us a call on 2 cores)."""
        # The engine thread shares the GIL with the caller's event loop. Back from a kernel
        # (run without the GIL) while the loop held it, the engine thread waited up to Python's
        # switch interval (5 ms) for it, on steps of ~4 ms: one stream through semline serve
        # made 189-193 tok/s at 5 ms, 205-213 at 0.5 ms (the engine alone in one thread: 217).
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._holding: dict[str, _Stream] = {}  # streams with outputs held for their consumer (_Stream.due)
        self._stopped = False
        self._owns_engine = engine is None
        self._dead_error: BaseException | None = None
        # 1: the first idle moment also gives back what loading the model left free.
        self._steps_since_trim, self._last_trim = 1, 0.0
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(built, engine, config, executor),
                                        name="semline-engine", daemon=True)
        self.engine: LLMEngine  # set by the engine thread before it resolves `built`
        self._thread.start()
        built.result()  # a load error is raised here, to the caller

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    # --- public API -----------------------------------------------------------

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; the last one has `finished=True`."""
        outputs = await self.submit(prompt, sampling_params, request_id, priority, lora)
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()

    async def submit(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0, lora: str | None = None) -> "OutputStream":
        """Queue one request and wait until the engine has accepted it: its validation error
        (a prompt too long, a bad grammar, an unknown LoRA adapter) is raised here, before any
        output. Returns the stream of its outputs; closing it early (aclose) aborts the request."""
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running ({self._dead_error!r})")
        params = sampling_params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        grammar = None
        if params.structured_output is not None:  # compiled here, not in the engine's step
            grammar = await asyncio.to_thread(self.engine.compile_grammar, params.structured_output)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._send(_AddCommand(prompt, params, request_id, priority, stream, accepted, grammar, lora))
        try:
            await asyncio.wrap_future(accepted)  # raises the engine's validation error, if any
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller left while the engine was adding it
            raise
        return OutputStream(self, request_id, stream)

    async def embed(self, token_ids: list[int]) -> list[float]:
        """LLMEngine.embed, run by the engine's thread between steps."""
        return await self._call(self.engine.embed, token_ids)

    async def add_lora(self, name: str, path: str) -> None:
        """LLMEngine.add_lora: the folder is read off the engine's thread, registered on it."""
        if self.engine.loras is None:
            raise RequestError("this engine was started without LoRA (set enable_lora or lora_modules)")
        adapter = await asyncio.to_thread(load_adapter, name, path, self.engine.config.max_lora_rank)
        await self._call(self.engine.add_lora, name, path, adapter)

    async def remove_lora(self, name: str) -> None:
        await self._call(self.engine.remove_lora, name)

    def lora_names(self) -> list[str]:
        return self.engine.lora_names()

    async def _call(self, function, *args):
        """Run function(*args) on the engine's thread between steps; its result or error."""
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running ({self._dead_error!r})")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", function, args, done))
        return await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters and gauges."""
        return copy.deepcopy(self.engine.stats)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; an engine this object built is closed too (its workers and
        memory given back). One handed in stays open: its owner closes it."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)
        if self._owns_engine and hasattr(self, "engine"):
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.0f s; its engine stays open", timeout)
            else:
                self.engine.close()

    # --- the engine thread --------------------------------------------------------

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _run(self, built: concurrent.futures.Future, engine: LLMEngine | None, config, executor) -> None:
        try:
            self.engine = engine or LLMEngine(config, executor)
        except BaseException as exc:  # noqa: BLE001 - the constructor raises it
            built.set_exception(exc)
            return
        built.set_result(self.engine)
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._release_memory()
                    # A trim skipped for its rate limit happens once the engine has stayed idle.
                    self._wakeup.wait(TRIM_INTERVAL_S if self._steps_since_trim else None)
                    self._wakeup.clear()
                    continue
                self._step()
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine loop died")
            self._dead_error = exc
            self._stopped = True
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"engine loop died: {exc!r}"))

    def _release_memory(self) -> None:
        """Going idle after work: hand the heap's free pages back to the OS (glibc keeps them,
        so a replica's resident size would stay at the high-water mark of its largest batch).
        At most once per TRIM_INTERVAL_S: a request arriving meanwhile waits for it."""
        now = time.monotonic()
        if self._steps_since_trim == 0 or now - self._last_trim < TRIM_INTERVAL_S or _LIBC is None:
            return
        _LIBC.malloc_trim(0)
        self._steps_since_trim, self._last_trim = 0, now

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _AddCommand):
                self._add(command)
            elif command[0] == "call":
                self._run_call(*command[1:])
            else:
                self._abort(command[1])

    def _add(self, command: _AddCommand) -> None:
        if not command.accepted.set_running_or_notify_cancel():
            return  # the caller left before the engine saw the request
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id, command.priority,
                                    grammar=command.grammar, lora=command.lora)
        except Exception as exc:  # validation errors go back to the caller
            command.accepted.set_exception(exc)
            return
        self._streams[command.request_id] = command.stream
        command.accepted.set_result(True)

    @staticmethod
    def _run_call(function, args: tuple, done: concurrent.futures.Future) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(function(*args))
        except Exception as exc:  # noqa: BLE001 - the caller's error (a text too long, a bad adapter, ...)
            done.set_exception(exc)

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _step(self) -> None:
        self._steps_since_trim += 1
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # A failed step fails the requests in it rather than the whole engine.
            logger.exception("engine step failed; aborting running requests")
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
                stream = self._streams.pop(request_id, None)
                if stream:
                    stream.put(RuntimeError(f"engine step failed: {exc!r}"))
            return
        # One wake-up of each caller's loop per step, whatever the number of its streams, and
        # none for streams whose consumer only takes outputs later (held until then).
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            elif now < stream.due and output.finish_reason != "error":
                stream.held.append(output)
                self._holding[output.request_id] = stream
                continue
            item = RequestFailedError(output.error) if output.finish_reason == "error" else output
            items = deliveries.setdefault(stream.loop, [])
            if stream.held:
                items.extend((stream.queue, held) for held in stream.held)
                stream.held = []
            items.append((stream.queue, item))
        # Held outputs whose time came without a new one (a request preempted, or waiting
        # for its next chunk of prompt) go now; those of requests aborted meanwhile are dropped.
        for request_id, stream in list(self._holding.items()):
            if not stream.held or request_id not in self._streams:
                del self._holding[request_id]
            elif now >= stream.due:
                deliveries.setdefault(stream.loop, []).extend((stream.queue, held) for held in stream.held)
                stream.held = []
                del self._holding[request_id]
        for loop, items in deliveries.items():
            _hand_over(loop, items)

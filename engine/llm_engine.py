"""The engine: one replica of the production line.

step() = schedule -> run the model -> sample -> update requests and emit outputs.
Not thread-safe: one thread owns an LLMEngine (AsyncEngine runs it in its own thread).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import warnings
import weakref
from collections import deque

import torch

from engine.block_manager import BlockManager
from engine.config import ConfigError, EngineConfig
from engine.loader import (encode_text, load_generation_config, load_hf_config, load_tokenizer,
                           read_chat_template, resolve_model_dir)
from engine.lora import LoRAAdapter, LoRAManager
from engine.metrics import EnergyMeter, EngineStats, account_step
from engine.executor import ExecutorError, ExecutorFactory, in_process_executor
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import Sampler, position_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler
from engine.speculative import propose
from engine import thinking
from engine.structured_output import GrammarBackend, StructuredOutput


logger = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192


class RequestError(ValueError):
    """A request cannot be served as asked (too long, duplicate id, ...)."""


@dataclasses.dataclass
class _Batch:
    """A step's batch between launch (scheduled, handed to the runner) and landing."""

    chunks: list[ScheduledChunk]
    handle: object  # the runner's pending result
    start_time: float
    start_energy: float


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, executor: ExecutorFactory | None = None) -> None:
        """executor: builds where the model runs (engine/executor.py); default: this process.
        cluster.executors.ray_executor runs pipeline stages on Ray actors."""
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.model_dir = resolve_model_dir(config.model, config.resolve_cache_dir())
        self.hf_config = load_hf_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        if config.chat_template is not None:
            self.tokenizer.chat_template = read_chat_template(config.chat_template)
        # The model's own sampling defaults (generation_config.json) and its extra EOS ids.
        self.generation_defaults, generation_eos = load_generation_config(config.generation_config, self.model_dir)
        self.model_name = config.model or "SmolLM2-135M-Instruct"
        max_len = config.max_model_len or min(self.hf_config.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
        if max_len > self.hf_config.max_position_embeddings:
            raise ConfigError(f"max_model_len {max_len} exceeds the model's "
                              f"max_position_embeddings {self.hf_config.max_position_embeddings}")
        self.runner = (executor or in_process_executor)(config, self.hf_config, self.model_dir, self.device,
                                                        self.dtype, max_len)
        self.drafter = None
        if config.speculative_method in ("draft_model", "self_speculative"):
            from engine.draft import Drafter

            self.drafter = Drafter(config, self.runner, self.tokenizer, max_len)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        # A lone request must always fit in the cache, or preemption could never make room.
        self.max_model_len = min(max_len, self.runner.num_blocks * config.block_size)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        if not config.enable_chunked_prefill:
            # A whole prompt must fit in one step's budget, or it would wait forever.
            config = self.config = dataclasses.replace(
                config, max_num_batched_tokens=max(config.max_num_batched_tokens, self.max_model_len))
        self.loras: LoRAManager | None = None
        if config.lora_enabled:
            self.loras = LoRAManager(config.max_loras, config.max_cpu_loras or 2 * config.max_loras,
                                     config.max_lora_rank, self.runner)
            for name, path in (config.lora_modules or {}).items():
                self.add_lora(name, path)
        self.scheduler = Scheduler(config, self.block_manager, self.loras)
        self.sampler = Sampler(config.seed, self.runner.device)  # where the logits are
        self.eos_token_ids = self._eos_token_ids() | set(generation_eos)
        self.energy_meter = EnergyMeter(self.device, config.power_watts)
        self.stats = EngineStats(num_free_blocks=self.block_manager.num_free_blocks)
        self.requests: dict[str, Request] = {}
        self._id_counter = itertools.count()
        self._grammars: GrammarBackend | None = None  # built on the first constrained request
        # Why the engine cannot serve right now (a pipeline being rebuilt), or None.
        self.health_problem: str | None = None
        # Batches handed to the runner, oldest first, and when the last one landed.
        self.max_inflight = self.runner.max_inflight
        self._inflight: deque[_Batch] = deque()
        self._last_landed = (0.0, 0.0)
        # Detokenize after launching the next step (config.async_detokenize): one batch in flight.
        defer = config.async_detokenize
        if defer is None:
            defer = torch.device(getattr(self.runner, "device", self.device)).type == "cuda"
        self._defer_text = bool(defer) and self.max_inflight == 1
        self.is_closed = False
        # What close() releases, released too if the engine is collected unclosed (holds the
        # runners, not the engine). At exit Ray tears its own workers down.
        self._finalizer = weakref.finalize(self, _release_collected, self._runners(), config.num_model_workers)
        self._finalizer.atexit = False

    def _eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.hf_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    @property
    def num_parameters(self) -> int:
        return self.runner.args.num_parameters

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's own defaults (generation_config.json) applied."""
        return SamplingParams(**self.generation_defaults)

    # --- requests -----------------------------------------------------------

    def compile_grammar(self, spec: StructuredOutput):
        """Compile a structured output's grammar (cached). Thread-safe, so callers can compile
        off the engine's thread (AsyncEngine does) and hand the result to add_request."""
        if self._grammars is None:
            self._grammars = GrammarBackend(self.tokenizer, self.runner.args.vocab_size, self.eos_token_ids)
        return self._grammars.compile(spec)

    # --- LoRA adapters ----------------------------------------------------------

    def add_lora(self, name: str, path: str, adapter: LoRAAdapter | None = None) -> None:
        """Serve the PEFT LoRA folder `path` under `name` (LoRAError if it cannot be).
        adapter: the folder already parsed (engine.lora.load_adapter), e.g. off this thread."""
        if self.loras is None:
            raise RequestError("this engine was started without LoRA (set enable_lora or lora_modules)")
        if name == self.model_name:
            raise RequestError(f"{name!r} is the base model's name")
        self.loras.register(name, path, adapter)

    def remove_lora(self, name: str) -> None:
        """Stop serving an adapter; requests already accepted for it still finish with it."""
        if self.loras is None:
            raise RequestError("this engine was started without LoRA (set enable_lora or lora_modules)")
        self.loras.unregister(name)

    def lora_names(self) -> list[str]:
        return self.loras.names() if self.loras is not None else []

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    arrival_time: float | None = None, grammar=None, lora: str | None = None) -> Request:
        """Queue a prompt (text or token ids). Raises RequestError if it cannot be served.
        grammar: the request's structured output compiled by compile_grammar (else compiled here).
        lora: the name of a LoRA adapter to serve it with (LoRAError if none is loaded so named)."""
        self._check_open()
        params = sampling_params or self.default_sampling_params()
        request_id = request_id if request_id is not None else f"req-{next(self._id_counter)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, encode_text(self.tokenizer, prompt)
        else:
            text, token_ids = None, list(prompt)
        self.check_prompt(token_ids)
        vocab = self.runner.args.vocab_size
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {vocab})")
        handle = None
        if lora is not None:
            if self.loras is None:
                raise RequestError("this engine was started without LoRA (set enable_lora or lora_modules)")
            handle = self.loras.handle(lora)
        if params.structured_output is not None and grammar is None:
            grammar = self.compile_grammar(params.structured_output)
        request = Request(request_id, text, token_ids, params, priority, arrival_time)
        request.lora = handle
        if params.prompt_logprobs is not None:
            self.output_processor.start_prompt_logprobs(request)
        if params.thinking_end:
            thinking.start_following(request, token_ids, self.tokenizer.decode)
        if grammar is not None:
            request.grammar = self._grammars.matcher(grammar)
        if params.seed is not None:
            request.generator = self.sampler.make_generator(params.seed)
        self.requests[request_id] = request
        self.output_processor.add_request(request)
        self.scheduler.add_request(request)
        self._refresh_gauges()
        return request

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt accepted (the config's max_prompt_tokens, and room for one token)."""
        limit = self.max_model_len - 1
        return limit if self.config.max_prompt_tokens is None else min(limit, self.config.max_prompt_tokens)

    def check_prompt(self, token_ids: list[int]) -> None:
        """RequestError if these prompt token ids cannot be served. Reads only settings, so it
        may run off the engine's thread (the LLM server checks a prompt before it submits it)."""
        if not token_ids:
            raise RequestError("the prompt is empty")
        limit = self.config.max_prompt_tokens
        if limit is not None and len(token_ids) > limit:
            raise RequestError(f"the prompt has {len(token_ids)} tokens; this server accepts at most {limit}")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(token_ids)} tokens; this model's context "
                               f"is {self.max_model_len} tokens, including the output")
        vocab = self.runner.args.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        self._refresh_gauges()
        return self.output_processor.make_output(request)

    def score(self, token_ids: list[int], chunk_size: int = 32) -> list[float]:
        """Log-probability of each token after the first, given the ones before it (teacher
        forcing), from the engine's own model, dtype and quantization: chunks of `chunk_size`
        tokens through the paged KV cache, as decoding and chunked prefill run them.
        For quality checks (perplexity); call it from the thread that owns the engine."""
        self._check_open()
        self.check_prompt(token_ids)
        request = Request(f"score-{next(self._id_counter)}", None, token_ids, SamplingParams(max_tokens=1))
        if not self.block_manager.allocate_slots(request, len(token_ids)):
            raise RequestError("not enough free KV blocks to score this text now")
        logprobs: list[float] = []
        try:
            for start in range(0, len(token_ids) - 1, chunk_size):
                end = min(start + chunk_size, len(token_ids) - 1)
                chunk = ScheduledChunk(request, end - start, samples_token=False, all_logits=True)
                logits = self.runner.execute(self.runner.prepare([chunk]))
                logprobs += position_logprobs(logits, token_ids[start + 1:end + 1], 0).logprobs
                request.num_computed_tokens = end
        finally:
            self.block_manager.free(request)
        return logprobs

    def embed(self, token_ids: list[int]) -> list[float]:
        """An embedding of a text: the model's last-layer hidden state at its last token (after
        the final norm; decoder models read the whole text only there), L2-normalised. Runs
        the text alone through the paged KV cache in chunks of the step's token budget, so it
        is the same whatever else is served. Call it from the thread that owns the engine."""
        self._check_open()
        self.check_prompt(token_ids)
        if not hasattr(self.runner, "embed"):
            raise RequestError("embeddings need the in-process executor (no tensor or pipeline split)")
        request = Request(f"embed-{next(self._id_counter)}", None, token_ids, SamplingParams(max_tokens=1))
        if not self.block_manager.allocate_slots(request, len(token_ids)):
            raise RequestError("not enough free KV blocks to embed this text now")
        step = self.config.max_num_batched_tokens
        try:
            for start in range(0, len(token_ids), step):
                end = min(start + step, len(token_ids))
                chunk = ScheduledChunk(request, end - start, samples_token=end == len(token_ids))
                model_input = self.runner.prepare([chunk])
                if end < len(token_ids):
                    self.runner.execute(model_input)
                else:
                    vector = self.runner.embed(model_input)[0]
                request.num_computed_tokens = end
        finally:
            self.block_manager.free(request)
        return torch.nn.functional.normalize(vector, dim=0).tolist()

    def has_unfinished_requests(self) -> bool:
        return not self.is_closed and (self.scheduler.has_unfinished_requests() or bool(self._inflight))

    # --- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Release what the engine holds: the executor's workers (Ray actors, their placement
        group, compiled graphs, shared memory), the draft model, the KV cache and the weights.
        Unfinished requests are aborted. Idempotent; the engine serves nothing afterwards
        (add_request raises RequestError)."""
        if self.is_closed:
            return
        for request_id in list(self.requests):
            self.abort_request(request_id)
        self.is_closed = True
        self._inflight.clear()
        self._finalizer.detach()
        _shut_down(self._runners())
        self.drafter = None

    def _runners(self) -> list:
        return [self.runner] + ([self.drafter.runner] if self.drafter is not None else [])

    def _check_open(self) -> None:
        if self.is_closed:
            raise RequestError("this engine is closed")

    # --- the loop -------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns outputs of requests that got a token or finished.

        Launches batches until the runner holds as many as it can overlap (one in process;
        in a pipeline one per stage by default, so stage 1 computes batch k+1 while stage 2
        computes batch k), then lands the oldest: sample, update, outputs."""
        try:
            while len(self._inflight) < self.max_inflight:
                batch = self._launch()
                if batch is None:
                    break
                self._inflight.append(batch)
            if not self._inflight:
                return []
            self.stats.max_batches_in_flight = max(self.stats.max_batches_in_flight, len(self._inflight))
            batch = self._inflight.popleft()
            logits = self.runner.result(batch.handle)
        except ExecutorError as exc:
            self._rebuild_executor(exc)
            return []
        return self._land(batch, logits)

    def _launch(self) -> _Batch | None:
        """Schedule a batch from the requests not in flight and hand it to the runner."""
        if self.config.speculative_method != "none":
            propose(self.scheduler.running, self.config, self.max_model_len, drafting=self.drafter is not None)
        max_chunks = None
        if self.max_inflight > 1:  # spread the requests over the batches in flight
            active = self.scheduler.num_running + self.scheduler.num_waiting
            max_chunks = max(1, -(-active // self.max_inflight))
        scheduled = self.scheduler.schedule(max_chunks)
        self.stats.num_preemptions += len(scheduled.preempted)
        if scheduled.is_empty:
            return None
        start_time, start_energy = time.perf_counter(), self.energy_meter.read()
        if self.drafter is not None:  # fill the proposals the scheduler made room for
            drafted = self.drafter.propose([c for c in scheduled.chunks if c.num_spec_tokens])
            self.stats.flops += 2.0 * self.drafter.num_parameters * drafted
        for chunk in scheduled.chunks:
            chunk.request.in_flight = True
        handle = self.runner.submit(self.runner.prepare(scheduled.chunks))
        return _Batch(scheduled.chunks, handle, start_time, start_energy)

    def _land(self, batch: _Batch, logits: torch.Tensor) -> list[RequestOutput]:
        for chunk in batch.chunks:
            chunk.request.in_flight = False
        sampling = [c for c in batch.chunks if c.samples_token]
        if any(c.all_logits for c in batch.chunks):
            logits = self._take_prompt_logprobs(batch.chunks, logits)
        tokens = self._sample(logits, sampling)
        # Overlapping batches: each is charged from its launch or the previous landing, whichever
        # is later, so the busy time and energy add up to the wall clock, not more.
        begin_time, begin_energy = max((batch.start_time, batch.start_energy), self._last_landed)
        now, energy = time.perf_counter(), self.energy_meter.read()
        self._last_landed = (now, energy)
        account_step(self.stats, self.runner.args, batch.chunks, now - begin_time, energy - begin_energy,
                     self.energy_meter.source)
        pending: list[tuple[Request, int]] | None = [] if self._defer_text else None
        landed = self._update(batch.chunks, sampling, tokens, pending)
        if pending:
            # The next step goes to the device before this one's tokens become text.
            if len(self._inflight) < self.max_inflight:
                try:
                    launched = self._launch()
                    if launched is not None:
                        self._inflight.append(launched)
                except ExecutorError as exc:
                    self._rebuild_executor(exc)
            for request, token_id in pending:
                if not request.is_finished:
                    try:
                        self._take_text(request, token_id)
                    except Exception as exc:  # noqa: BLE001 - this request fails, not its step
                        self._fail(request, "detokenizing", exc)
        outputs = []
        for request in landed:
            output = self.output_processor.make_output(request)
            if output is not None:
                outputs.append(output)
            if request.is_finished:
                self._forget(request)
        self._refresh_gauges()
        return outputs

    def _take_prompt_logprobs(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> torch.Tensor:
        """Prompt logprobs from the rows of the chunks that returned every position's logits;
        returns the rows that sample, laid out as _sample reads them."""
        keep, row = [], 0
        for chunk in chunks:
            n = chunk.num_logits
            if chunk.all_logits:
                request = chunk.request
                if not request.is_finished:
                    try:
                        self._prompt_logprobs(request, logits[row:row + n])
                    except Exception as exc:  # noqa: BLE001 - this request fails, not its step
                        self._fail(request, "computing its prompt logprobs", exc)
                if chunk.samples_token:
                    keep += range(row + n - 1 - chunk.num_spec_tokens, row + n)
            else:
                keep += range(row, row + n)
            row += n
        return logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]

    def _prompt_logprobs(self, request: Request, rows: torch.Tensor) -> None:
        """Row i of `rows` is the logits at position num_computed_tokens + i, which predict the
        token after it: the logprobs of the prompt tokens not yet reported (a preempted
        request computes its prompt again: positions it already reported are skipped)."""
        start, prompt = request.num_computed_tokens, request.prompt_token_ids
        first = len(request.prompt_logprobs) - 1 - start  # the first row not yet reported
        last = min(len(prompt) - 1 - start, rows.shape[0])  # the rows that predict prompt tokens
        if first >= last:
            return
        targets = prompt[start + first + 1:start + last + 1]
        found = position_logprobs(rows[first:last], targets, request.sampling_params.prompt_logprobs)
        self.output_processor.add_prompt_logprobs(request, targets, found)

    def _rebuild_executor(self, exc: ExecutorError) -> None:
        """A worker of the executor failed: every running request goes back to the queue to be
        recomputed (no KV cache can be trusted, the prefix cache is dropped), and the broken
        workers are replaced. Unhealthy (health_problem) until the executor is whole again; if
        the rebuild itself fails, the error goes to the caller and the next step tries again."""
        logger.error("%s; rebuilding the model workers and recomputing %d running request(s)",
                     exc, self.scheduler.num_running)
        self.health_problem = f"rebuilding the model workers after: {exc}"
        self._inflight.clear()
        self.scheduler.preempt_all()
        self.block_manager.reset_prefix_cache()
        self.runner.rebuild()
        self.stats.num_executor_rebuilds += 1
        self.health_problem = None

    def _sample(self, logits: torch.Tensor, sampling: list[ScheduledChunk]) -> list[list[tuple[int, object]]]:
        """Per sampling chunk, its new tokens with their logprobs: one token, or for a chunk
        that verifies proposals, the accepted ones plus the model's own."""
        rows, row = [], 0  # each chunk's first logits row: a verifying chunk has 1 + k
        for chunk in sampling:
            rows.append(row)
            row += 1 + chunk.num_spec_tokens
        result: list[list[tuple[int, object]]] = [[] for _ in sampling]
        plain_chunks = [i for i, c in enumerate(sampling) if not c.num_spec_tokens]
        if plain_chunks:
            if len(plain_chunks) < logits.shape[0]:
                logits_plain = logits[torch.tensor([rows[i] for i in plain_chunks], device=logits.device)]
            else:
                logits_plain = logits  # no proposals this step: every row samples
            try:
                sampled = self.sampler(logits_plain, [sampling[i].request for i in plain_chunks])
                for i, token_id, logprobs in zip(plain_chunks, sampled.token_ids, sampled.logprobs):
                    result[i] = [(token_id, logprobs)]
            except Exception:  # noqa: BLE001 - find the rows that fail; the others sample alone
                for n, i in enumerate(plain_chunks):
                    try:
                        one = self.sampler(logits_plain[n:n + 1], [sampling[i].request])
                        result[i] = [(one.token_ids[0], one.logprobs[0])]
                    except Exception as exc:  # noqa: BLE001 - this request fails, not its step
                        self._fail(sampling[i].request, "sampling", exc)
        for i, chunk in enumerate(sampling):
            if chunk.num_spec_tokens and not chunk.request.is_finished:
                draft = chunk.request.spec_token_ids[: chunk.num_spec_tokens]
                try:
                    accepted = self.sampler.verify(logits[rows[i]: rows[i] + 1 + len(draft)], chunk.request, draft)
                except Exception as exc:  # noqa: BLE001 - this request fails, not its step
                    self._fail(chunk.request, "verifying proposals", exc)
                    continue
                result[i] = [(token_id, None) for token_id in accepted]
                self.stats.spec_num_verify_steps += 1
                self.stats.spec_num_draft_tokens += len(draft)
                self.stats.spec_num_accepted_tokens += len(accepted) - 1
        return result

    def _update(self, chunks: list[ScheduledChunk], sampling: list[ScheduledChunk],
                tokens: list[list[tuple[int, object]]], pending: list | None) -> list[Request]:
        """Take the step's tokens; returns the requests to report on. With `pending` (a list),
        a lone new token of a request that goes on is appended there as (request, token id)
        for _take_text, instead of being detokenized now."""
        now = time.time()
        for chunk in chunks:
            request = chunk.request
            if request.is_finished:  # aborted while its batch was in flight
                continue
            # Proposed positions count only once accepted (below).
            request.num_computed_tokens += chunk.num_new_tokens - chunk.num_spec_tokens
            if not chunk.num_spec_tokens:
                self.block_manager.register_full_blocks(request)
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
                self.stats.num_prompt_tokens += request.num_prompt_tokens
                self.stats.prefix_cache_queries += request.num_prompt_tokens
                self.stats.prefix_cache_hits += request.metrics.num_cached_tokens
        landed = []
        for chunk, new_tokens in zip(sampling, tokens):
            request = chunk.request
            if request.status == RequestStatus.FINISHED_ERROR and request.request_id in self.requests:
                landed.append(request)  # failed while sampling: say so once
                continue
            if request.is_finished:
                continue
            try:
                self._take_tokens(chunk, new_tokens, now, pending if len(new_tokens) == 1 else None)
            except Exception as exc:  # noqa: BLE001 - this request fails, not its step
                self._fail(request, "taking its new tokens", exc)
            landed.append(request)
        return landed

    def _take_tokens(self, chunk: ScheduledChunk, new_tokens: list[tuple[int, object]], now: float,
                     pending: list | None = None) -> None:
        request = chunk.request
        request.spec_token_ids = []
        # Accepted proposals have their K/V in the cache; the last token does not yet.
        request.num_computed_tokens += len(new_tokens) - 1
        # The draft's K/V stays valid up to the first rejected proposal.
        request.draft_num_computed_tokens = min(request.draft_num_computed_tokens, request.num_computed_tokens)
        for n, (token_id, logprobs) in enumerate(new_tokens):
            self._append_token(request, token_id, logprobs, now, pending)
            self.stats.num_generation_tokens += n > 0  # the first is counted with the step
            if request.is_finished:
                break
        if chunk.num_spec_tokens and not request.is_finished:
            self.block_manager.register_full_blocks(request)

    def _fail(self, request: Request, stage: str, exc: Exception) -> None:
        """End one request whose own processing raised (its KV blocks freed); the step goes on."""
        logger.exception("request %s failed while %s", request.request_id, stage, exc_info=exc)
        request.error = f"request failed while {stage}: {exc!r}"
        self._retire(request, RequestStatus.FINISHED_ERROR)  # no flush: its detokenizer may be what failed

    def _append_token(self, request: Request, token_id: int, logprobs, now: float,
                      pending: list | None = None) -> None:
        params = request.sampling_params
        request.output_token_ids.append(token_id)
        request.metrics.num_generated_tokens += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        if logprobs is not None:
            request.output_logprobs.append(self.output_processor.token_logprob(token_id, logprobs))
        thought = bool(params.thinking_end) and not request.thinking_done and thinking.on_token(request)
        if request.grammar is not None:  # a grammar reads the answer, after any thinking
            if not thought:
                request.grammar.accept(token_id)  # GrammarError: this request fails alone
            if request.grammar.is_terminated:  # the grammar took a stop token: nothing may follow
                request.stop_reason = token_id if token_id in params.stop_token_ids else None
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                return
        # A stop token (EOS or a requested stop id) ends the request and is left out of the text.
        if token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos):
            request.stop_reason = token_id if token_id in params.stop_token_ids else None
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            return
        if pending is not None and not self.output_processor.at_length_limit(request):
            pending.append((request, token_id))  # goes on: its text after the next launch
            return
        self._take_text(request, token_id)

    def _take_text(self, request: Request, token_id: int) -> None:
        """The text of a request's newest token: a stop string, or the length limit, ends it."""
        stop_string = self.output_processor.take_text(request, token_id)
        if stop_string is not None:
            request.stop_reason = stop_string
            self._finish(request, RequestStatus.FINISHED_STOPPED)
        elif self.output_processor.at_length_limit(request):
            self._finish(request, RequestStatus.FINISHED_LENGTH)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.is_finished:
            return
        if not isinstance(request.stop_reason, str):  # not already cut at a stop string
            stop_string = self.output_processor.flush_text(request)
            if stop_string is not None:
                request.stop_reason = stop_string
                status = RequestStatus.FINISHED_STOPPED
        self._retire(request, status)
        if status == RequestStatus.FINISHED_ABORTED:
            self._forget(request)

    def _retire(self, request: Request, status: RequestStatus) -> None:
        """Out of the scheduler for good (its blocks freed), timed and counted by reason."""
        self.scheduler.finish_request(request, status)
        request.metrics.finished_time = time.time()
        self.stats.finished_reasons[status.value] = self.stats.finished_reasons.get(status.value, 0) + 1

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)

    # --- metrics ----------------------------------------------------------------

    def _refresh_gauges(self) -> None:
        self.stats.num_running = self.scheduler.num_running
        self.stats.num_waiting = self.scheduler.num_waiting
        self.stats.kv_cache_usage = self.block_manager.usage
        self.stats.num_free_blocks = self.block_manager.num_free_blocks


def _shut_down(runners: list) -> None:
    for runner in runners:
        shutdown = getattr(runner, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _release_collected(runners: list, num_model_workers: int) -> None:
    message = ("an engine was collected without being closed: call llm.close() (or use `with LLM(...) as "
               "llm:`) to give back its workers and memory when you are done")
    warnings.warn(message, ResourceWarning, stacklevel=2)
    if num_model_workers > 1:  # Ray workers: say it where warnings are filtered out too
        logger.warning(message)
    _shut_down(runners)

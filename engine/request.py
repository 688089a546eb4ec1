"""A request's state as it moves through the line.

There is no prefill phase or decode phase: each request has a number of
computed tokens (whose K/V sit in the cache) that must catch up with its number
of tokens (prompt + generated). A fresh request is far behind (its prompt), a
decoding one is one token behind, a preempted one starts again from zero.
"""

from __future__ import annotations

import enum
import time

import torch

from engine.outputs import RequestMetrics, TokenLogprob
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # Something about this request failed (its sampling, its stop checks): it ends alone,
    # with the reason in Request.error; the others of its step go on.
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_ERROR,
        )


class Request:
    """Mutable state of one request; owned by the engine thread."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        # 0 = realtime; larger numbers run later.
        self.priority = priority
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        # Monotonic tie-breaker for FIFO order within a priority; set by the scheduler.
        self.arrival_seq = 0
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprob] = []
        # A reasoning model's thinking (engine/thinking.py): where in the output it began (None:
        # not yet), whether it has ended, and tokens still to force (the sampler takes them).
        self.thinking_from: int | None = None
        self.thinking_done = False
        self.forced_token_ids: list[int] = []
        # SamplingParams.prompt_logprobs: filled position by position as the prompt is computed.
        self.prompt_logprobs: list[TokenLogprob] | None = None
        # Output tokens already reported in a RequestOutput (for deltas).
        self.num_output_tokens_sent = 0
        # Tokens whose K/V are in the cache.
        self.num_computed_tokens = 0
        # KV block ids, one per block_size tokens.
        self.block_table: list[int] = []
        # Prefix caching: chained hashes of the full blocks of tokens (they depend only on
        # the tokens, so they survive preemption) and how many of this request's blocks
        # are registered. (metrics.num_cached_tokens: prompt tokens found cached.)
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        # Speculative decoding: tokens proposed to follow the last one, verified this step.
        self.spec_token_ids: list[int] = []
        # In a pipeline micro-batch whose result has not come back yet.
        self.in_flight = False
        # Positions whose K/V the draft model holds (engine/draft.py).
        self.draft_num_computed_tokens = 0
        self.stop_reason: str | int | None = None
        # Why the request failed (status FINISHED_ERROR).
        self.error: str | None = None
        # Constrained decoding: where the output stands in its grammar (engine/structured_output.py).
        self.grammar = None
        # LoRA: the adapter this request is served by (engine/lora.py; None: the base model),
        # and the model slot holding it while the request runs.
        self.lora = None
        self.lora_slot: int | None = None
        # Per-request RNG so a seed gives the same text whatever else is in the batch.
        self.generator: torch.Generator | None = None
        self.metrics = RequestMetrics(
            arrival_time=self.arrival_time, num_prompt_tokens=len(prompt_token_ids)
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet: every position's logits are
        needed, and none of the prompt may come from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output (+ proposed tokens past the end), without
        building the whole list."""
        n = self.num_tokens
        if end > n:
            head = self.token_ids_slice(start, n) if start < n else []
            return head + self.spec_token_ids[max(0, start - n): end - n]
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority number first, then earlier arrival."""
        return (self.priority, self.arrival_seq)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prio={self.priority}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )

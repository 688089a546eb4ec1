"""What the engine hands back to callers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position."""

    token_id: int
    token: str
    # None: the prompt's first token, which nothing before it predicts.
    logprob: float | None
    # [(token_id, token text, logprob)] of the top-n tokens, most likely first.
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    # 1 + how many tokens were more likely (prompt logprobs; None where not computed).
    rank: int | None = None


@dataclass
class RequestMetrics:
    """Timings (seconds, time.time() clock) and costs of one request."""

    arrival_time: float
    # When the request was first scheduled (end of queueing).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # Prompt tokens whose KV came from the prefix cache.
    num_cached_tokens: int = 0
    # A reasoning model's output tokens up to and with the end of its thinking (engine/thinking.py).
    num_reasoning_tokens: int = 0
    num_preemptions: int = 0
    # 2 x parameters x tokens computed plus attention score/value FLOPs.
    flops: float = 0.0
    # Energy attributed to this request, joules; `energy_source` says how it was obtained.
    energy_joules: float = 0.0
    energy_source: str = "estimate"

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first (seconds)."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        if self.num_generated_tokens < 2:
            return 0.0
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)

    def to_dict(self) -> dict:
        return {
            "arrival_time": self.arrival_time,
            "time_to_first_token": self.time_to_first_token,
            "time_per_output_token": self.time_per_output_token,
            "e2e_latency": self.e2e_latency,
            "queue_time": self.queue_time,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "num_cached_tokens": self.num_cached_tokens,
            "num_preemptions": self.num_preemptions,
            "flops": self.flops,
            "energy_joules": self.energy_joules,
            "energy_source": self.energy_source,
        }


@dataclass
class RequestOutput:
    """The state of one request: final when `finished`, else an increment-so-far snapshot.

    `text` and `token_ids` are cumulative; `delta_text` / `delta_token_ids` hold
    what is new since the previous output of the same request (for streaming).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None
    # SamplingParams.prompt_logprobs: one per prompt token (the first's logprob None). In the
    # final output, in every cumulative one, and in a delta stream's first output.
    prompt_logprobs: list[TokenLogprob] | None = None
    # The stop string or token id that ended the request, if any.
    stop_reason: str | int | None = None
    metrics: RequestMetrics | None = None
    # finish_reason "error": what failed (this request alone; the others of its step went on).
    error: str | None = None
    # Set by a serving layer: which replica answered (semline's Serve app: x-semline-replica).
    served_by: str | None = None


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: the last one's state (its cumulative text,
    tokens, logprobs, finish, metrics) with every one's increment joined in order."""
    last = outputs[-1]
    if len(outputs) == 1:
        return last
    deltas = [o.delta_logprobs for o in outputs if o.delta_logprobs]
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return dataclasses.replace(
        last, delta_text="".join(o.delta_text for o in outputs),
        delta_token_ids=[t for o in outputs for t in o.delta_token_ids],
        delta_logprobs=[lp for d in deltas for lp in d] if deltas else last.delta_logprobs,
        prompt_logprobs=prompt_logprobs)

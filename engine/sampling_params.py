"""Per-request sampling parameters, validated by pydantic (errors name the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.structured_output import StructuredOutput

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256


# Temperatures below this sample greedily (as vLLM does).
GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingParams(BaseModel):
    """How to pick each next token and when to stop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 (or below 1e-5) means greedy decoding.")
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1 keeps all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="HF-style penalty on tokens already in prompt or output."
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI presence penalty.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI frequency penalty.")
    seed: int | None = Field(None, description="Same seed gives the same text, whatever else runs.")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation (removed).")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end generation.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Return the sampled token's logprob and this many top ones."
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Return each prompt token's logprob given the tokens before it "
        "(the first has none) and this many top alternatives. Computed over the whole prompt, never taken from "
        "the prefix cache.")
    thinking_budget: int | None = Field(
        None, ge=0, description="Most tokens a reasoning model may think (after thinking_start, or from the "
        "output's start when that is None): then the thinking_end tokens are forced and it answers.")
    thinking_start: list[int] | None = Field(None, description="Token ids an output that thinks begins with "
                                             "(Qwen3's <think>; one that does not begin so answers at once); "
                                             "None: the output starts inside the thinking (DeepSeek-R1).")
    thinking_end: list[int] = Field(default_factory=list, description="Token ids that close a reasoning model's "
                                    "thinking. Given, the thinking is followed (engine/thinking.py): a "
                                    "structured_output grammar applies after it, and its tokens are counted.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    logit_bias: dict[int, float] | None = Field(
        None, description="Added to the logits of these token ids before sampling (OpenAI: -100 bans, 100 forces).")
    structured_output: StructuredOutput | None = Field(
        None, description="A grammar the output must match (JSON schema, JSON object, regex, choice, EBNF); "
        "with thinking_end, the answer after the thinking.")
    output_kind: Literal["cumulative", "delta", "final_only"] = Field(
        "cumulative", description="What each output carries (engine/output_processor.py): cumulative: the whole "
        "text, tokens and logprobs so far plus what is new; delta: only what is new until the last output, which "
        "carries both (streams: bytes that grow with the answer's length, not its square); final_only: one output "
        "at the end.")

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value):
        if value and any(t < 0 or not -100.0 <= b <= 100.0 for t, b in value.items()):
            raise ValueError("logit_bias maps token ids (>= 0) to values in [-100, 100]")
        return value or None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        for s in value:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_LEN} characters")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, value: list[int]) -> list[int]:
        if any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be non-negative")
        return value

    @model_validator(mode="after")
    def _check_thinking(self):
        if self.thinking_budget is not None and not self.thinking_end:
            raise ValueError("thinking_budget needs thinking_end (the token ids that close the thinking)")
        return self

    @model_validator(mode="after")
    def _check_seed(self):
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise ValueError("seed must fit in 64 bits")
        return self

    @property
    def is_greedy(self) -> bool:
        """Temperature 0, or so close to it that logits / temperature would overflow float32
        (1e-38 gives inf and NaN probabilities): both mean the most likely token."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def reads_only_argmax(self) -> bool:
        """The sampler needs nothing of this request's logits but their argmax."""
        return (self.is_greedy and not self.needs_penalties and self.logprobs is None
                and self.logit_bias is None and self.structured_output is None)

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

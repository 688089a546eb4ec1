"""From the engine's new tokens to what callers receive.

The engine core schedules, runs the model and samples; this processor sits beside it (as
vLLM v1's OutputProcessor does): one incremental detokenizer per request, stop strings and
the length limit checked on the text, each token's logprobs with their strings, and the
RequestOutput a caller asked for (`SamplingParams.output_kind`):

- "cumulative": every output carries the whole text, token ids and logprobs so far, and what
  is new since the previous output (the library's default: simple to read).
- "delta": outputs before the last carry only what is new (`delta_*`; the cumulative fields
  and the prompt are left empty), the last carries both. What a stream moves between
  processes then grows with its length, not with its square.
- "final_only": one output, when the request ends.
"""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import Request

OUTPUT_KINDS = ("cumulative", "delta", "final_only")


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        self._detokenizers[request.request_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, params.skip_special_tokens, params.stop)

    def at_length_limit(self, request: Request) -> bool:
        return (request.num_output_tokens >= request.sampling_params.max_tokens
                or request.num_tokens >= self.max_model_len)

    def take_text(self, request: Request, token_id: int) -> str | None:
        """Detokenize a request's newest token; returns the stop string its text now ends at
        (the text is cut there), if any."""
        return self._detokenizers[request.request_id].add_token(token_id)

    def text(self, request: Request) -> str:
        """The request's output text so far."""
        return self._detokenizers[request.request_id].text

    def flush_text(self, request: Request) -> str | None:
        """At the end: the text still waiting for the rest of a character; the stop string
        it completes, if any."""
        return self._detokenizers[request.request_id].flush()

    def token_logprob(self, token_id: int, logprobs) -> TokenLogprob:
        """A sampled token's logprob and its top alternatives, with their strings."""
        decode = self.tokenizer.decode
        return TokenLogprob(
            token_id=token_id,
            token=decode([token_id]),
            logprob=logprobs.logprob,
            top_logprobs=[(i, decode([i]), lp) for i, lp in zip(logprobs.top_ids, logprobs.top_logprobs)],
        )

    def start_prompt_logprobs(self, request: Request) -> None:
        """The prompt's first token: nothing predicts it, so it has no logprob."""
        first = request.prompt_token_ids[0]
        request.prompt_logprobs = [TokenLogprob(first, self.tokenizer.decode([first]), None)]

    def add_prompt_logprobs(self, request: Request, targets: list[int], found) -> None:
        """Append the logprobs of prompt tokens `targets` (sampler.PositionLogprobs `found`)."""
        decode = self.tokenizer.decode
        for n, token_id in enumerate(targets):
            request.prompt_logprobs.append(TokenLogprob(
                token_id=token_id, token=decode([token_id]), logprob=found.logprobs[n], rank=found.ranks[n],
                top_logprobs=[(i, decode([i]), lp) for i, lp in zip(found.top_ids[n], found.top_logprobs[n])]))

    def make_output(self, request: Request) -> RequestOutput | None:
        """The output owed to the request's caller now (None: its kind wants none yet)."""
        finished = request.is_finished
        kind = request.sampling_params.output_kind
        if kind == "final_only" and not finished:
            return None
        detok = self._detokenizers[request.request_id]
        delta_text = detok.take_delta(finished)
        if finished:
            self._detokenizers.pop(request.request_id, None)
        num_sent = request.num_output_tokens_sent
        request.num_output_tokens_sent = request.num_output_tokens
        logprobs = request.output_logprobs if request.sampling_params.logprobs is not None else None
        output = RequestOutput(
            request_id=request.request_id,
            prompt=None,
            prompt_token_ids=[],
            text="",
            token_ids=[],
            finished=finished,
            finish_reason=request.status.value if finished else None,
            delta_text=delta_text,
            delta_token_ids=request.output_token_ids[num_sent:],
            delta_logprobs=logprobs[num_sent:] if logprobs is not None else None,
            stop_reason=request.stop_reason,
            metrics=request.metrics,
            error=request.error,
        )
        if finished or kind == "cumulative" or num_sent == 0:
            output.prompt_logprobs = request.prompt_logprobs
        if finished or kind == "cumulative":
            output.prompt, output.prompt_token_ids = request.prompt, request.prompt_token_ids
            output.text = detok.text if finished else detok.text[: detok.num_emitted]
            output.token_ids = list(request.output_token_ids)
            output.logprobs = list(logprobs) if logprobs is not None else None
        return output

    def remove(self, request_id: str) -> None:
        self._detokenizers.pop(request_id, None)

"""What goes back to the client: OpenAI's bodies and SSE chunks for completions and chat
(choices, usage, logprobs, finish reasons), and a streamed choice's text on its way out
(StreamText: tool calls held back, output filters applied as the text comes)."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from deployments.api.plan import Plan
from deployments.api.reasoning import split_reasoning
from deployments.api.tools import ToolParser, held_back
from deployments.quality.filters import FilterChain, StreamFilter
from engine import RequestOutput


def sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream")


def data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def new_id(object_name: str) -> str:
    prefix = "chatcmpl" if object_name.startswith("chat") else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(object_name, model, choices, usage, response_id=None) -> dict:
    payload = {"id": response_id or new_id(object_name), "object": object_name, "created": int(time.time()),
               "model": model, "choices": choices}
    if usage is not None:
        payload["usage"] = usage
    return payload


def encode_vector(vector: list[float], encoding: str):
    if encoding == "base64":  # OpenAI's: little-endian float32s
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def per_prompt(plan: "Plan") -> int:
    return plan.body.n


def usage(outputs: list[RequestOutput], n: int = 1) -> dict:
    """Prompt tokens once per prompt (each has n choices), completion tokens of every choice."""
    prompt = sum(o.metrics.num_prompt_tokens for o in outputs[::n])
    cached = sum(o.metrics.num_cached_tokens for o in outputs[::n])
    completion = sum(len(o.token_ids) for o in outputs)
    reasoning = sum(o.metrics.num_reasoning_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


class RunningUsage:
    """The usage of a stream so far, for stream_options.continuous_usage_stats: each choice's
    prompt (from its outputs' metrics) and the tokens it has streamed."""

    def __init__(self, choices: int, n: int) -> None:
        self.n = n
        self.prompt = [0] * choices
        self.completion = [0] * choices

    def add(self, index: int, output: RequestOutput) -> None:
        self.completion[index] += len(output.delta_token_ids)
        if output.metrics is not None:
            self.prompt[index] = output.metrics.num_prompt_tokens

    def usage(self) -> dict:
        # Each prompt once: known from whichever of its n choices has sent output so far.
        prompt = sum(max(self.prompt[i:i + self.n]) for i in range(0, len(self.prompt), self.n))
        completion = sum(self.completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(out: RequestOutput, called_tools: bool = False) -> str:
    if out.finish_reason == "length":
        return "length"
    return "tool_calls" if called_tools else "stop"


def filter_text(plan: "Plan", text: str) -> tuple[str, bool]:
    """(the text through the output filters, whether they ended it); hits counted on the plan."""
    if plan.filters is None:
        return text, False
    result = plan.filters.apply(text)
    plan.filter_hits.update(result.hits)
    return result.text, result.stopped


def add_hits(plan: "Plan", state: "StreamText") -> None:
    if state.filter is not None:
        plan.filter_hits.update(state.filter.hits)


def parse_answer(plan: "Plan", text: str) -> tuple[str | None, str | None, list]:
    """A finished chat answer's parts: (the thinking, or None; the content, None when it is only
    tool calls; the tool calls)."""
    reasoning, answer = split_reasoning(plan.reasoning, text) if plan.reasoning else (None, text)
    content, calls = plan.parser.parse(answer) if plan.parser else (answer, [])
    return reasoning, content, calls


def choice(index: int, out: RequestOutput, plan: "Plan") -> dict:
    if plan.object_name == "chat.completion":
        reasoning, content, calls = parse_answer(plan, out.text)
        filtered, stopped = filter_text(plan, content or "")
        message = {"role": "assistant", "content": filtered if content is not None or stopped else None}
        if reasoning is not None:  # vLLM's, SGLang's and llama.cpp's name, and vLLM's newer one
            message["reasoning_content"] = message["reasoning"] = reasoning
        if calls and not stopped:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return {"index": index, "message": message, "logprobs": chat_logprobs(out.logprobs),
                "finish_reason": "content_filter" if stopped else finish_reason(out, bool(calls))}
    choice_plan = plan.choices[index]
    echo = choice_plan.echo or ""
    text, stopped = filter_text(plan, out.text)
    logprobs = out.logprobs
    if choice_plan.echo is not None and logprobs is not None:  # echo: the prompt's logprobs first
        logprobs = (out.prompt_logprobs or []) + logprobs
    result = {"index": index, "text": echo + text, "logprobs": completion_logprobs(logprobs),
              "finish_reason": "content_filter" if stopped else finish_reason(out)}
    if plan.body.prompt_logprobs is not None:
        result["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs)
    return result


def stream_choice(index: int, content, finish_reason, logprobs, plan: "Plan", offset: int = 0) -> dict:
    if plan.chunk_name == "chat.completion.chunk":
        return {"index": index, "delta": content, "logprobs": chat_logprobs(logprobs),
                "finish_reason": finish_reason}
    return {"index": index, "text": content, "logprobs": completion_logprobs(logprobs, offset),
            "finish_reason": finish_reason}


def chat_logprobs(logprobs) -> dict | None:
    if logprobs is None:
        return None
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top_logprobs]}
        for lp in logprobs]}


def completion_logprobs(logprobs, offset: int = 0) -> dict | None:
    """The legacy completions shape; `offset`: where the first token's text starts in the
    choice's text. A prompt's first token (echo) has no logprob and no alternatives: null."""
    if logprobs is None:
        return None
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [None if lp.logprob is None else {t: v for _, t, v in lp.top_logprobs}
                             for lp in logprobs],
            "text_offset": offsets}


def vllm_prompt_logprobs(entries) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank,
    decoded_token}} for the token itself and its top alternatives."""
    if entries is None:
        return None
    result = [None]
    for entry in entries[1:]:
        position = {str(token_id): {"logprob": value, "rank": rank, "decoded_token": token}
                    for rank, (token_id, token, value) in enumerate(entry.top_logprobs, start=1)}
        position[str(entry.token_id)] = {"logprob": entry.logprob, "rank": entry.rank, "decoded_token": entry.token}
        result.append(position)
    return result


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


class StreamText:
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

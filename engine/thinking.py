"""A reasoning model's thinking, followed token by token in the engine.

A request whose SamplingParams carry `thinking_end` (the token ids that close the thinking,
Qwen3's and DeepSeek-R1's `</think>`) is followed as it generates: where its thinking
begins (at once when `thinking_start` is None or the prompt ends inside an open block, as
DeepSeek-R1's template and an assistant message continued mid-thought leave it; else when
the output begins with `thinking_start`), and where it ends. Three things read that:

- `thinking_budget`: once that many tokens were thought, the closing tokens are forced (the
  sampler takes them one a step), as llama.cpp's `--reasoning-budget`.
- structured output: the grammar applies to the answer, after the thinking ends, as vLLM does
  with a reasoning parser. While the output may still open its thinking, its first token may
  be the opening tag as well as what the grammar allows; an opening of several tokens is then
  forced whole.
- the usage's reasoning tokens (RequestMetrics.num_reasoning_tokens): the output's tokens up
  to and with the closing tag.

In the output, tags are matched as token ids (a model writes its own special tokens; forced
ones are exact), so following costs a list comparison per token, never a scan of the text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.request import Request

# How far back in a prompt an open thinking block is looked for.
PROMPT_TAIL_TOKENS = 4096


def start_following(request: Request, prompt_ids: list[int], decode) -> None:
    """At add_request: whether the output starts inside the thinking. The prompt's tail is
    read as text (decode: the tokenizer's), where a tag may sit in other tokens than its own."""
    params = request.sampling_params
    start, end = params.thinking_start, params.thinking_end
    if start is None:
        inside = True
    else:
        tail = decode(prompt_ids[-PROMPT_TAIL_TOKENS:])
        inside = tail.rfind(decode(start)) > tail.rfind(decode(end))
    if inside:
        request.thinking_from = 0
        if params.thinking_budget == 0:
            request.forced_token_ids = list(end)


def on_token(request: Request) -> bool:
    """After the request's newest output token: follow its thinking. True when the grammar
    (if any) must not read the token: it is the thinking's (its tags included), or the
    grammar took it here."""
    params, ids = request.sampling_params, request.output_token_ids
    count = len(ids)
    if request.thinking_from is None:  # not yet known whether it thinks: does it open the block?
        start = params.thinking_start
        if ids != start[:count]:
            request.thinking_done = True  # it answers without thinking
            return False
        if count == 1 and request.grammar is not None:
            if request.grammar.try_accept(ids[0]):  # what the grammar allows is the answer's
                request.thinking_done = True
                return True
            request.forced_token_ids = list(start[1:])  # the opening alone was let through: all of it
        if count == len(start):
            request.thinking_from = count
        return True
    end = params.thinking_end
    if count - request.thinking_from >= len(end) and ids[-len(end):] == end:
        request.thinking_done = True
        request.metrics.num_reasoning_tokens = count
        return True
    request.metrics.num_reasoning_tokens = count
    if (params.thinking_budget is not None and not request.forced_token_ids
            and count - request.thinking_from >= params.thinking_budget):
        request.forced_token_ids = list(end)
    return True


def may_open(request: Request) -> int | None:
    """The opening tag's first token, when a constrained request's next token may open its
    thinking (the sampler lets it through beside the grammar's tokens); else None."""
    params = request.sampling_params
    if (params.thinking_end and params.thinking_start and request.thinking_from is None
            and not request.thinking_done and not request.output_token_ids):
        return params.thinking_start[0]
    return None


def in_thinking(request: Request) -> bool:
    """The request is thinking: a grammar waits."""
    return bool(request.sampling_params.thinking_end) and request.thinking_from is not None \
        and not request.thinking_done

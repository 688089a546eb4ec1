"""Reasoning models' thinking returned apart from the answer (deployments/api/reasoning.py):
the splitter alone, then through the session application, whose chat template carries Qwen3's
thinking switch (tests/deployments/conftest.py), so `reasoning_parser: auto` finds qwen3."""

from __future__ import annotations

import random

import openai
import pytest

from deployments.api.reasoning import ReasoningSplitter, parser_for_template, split_reasoning
from tests.deployments.conftest import MODEL

CASES = [
    # (style, output, reasoning or None, answer)
    ("qwen3", "<think>\nadd them\n</think>\n\nFour.", "\nadd them\n", "\n\nFour."),
    ("qwen3", "Four.", None, "Four."),  # thinking off: no block at all
    ("qwen3", "<think>still going", "still going", ""),  # stopped while thinking
    ("qwen3", "<thin", None, "<thin"),  # not a tag after all
    ("deepseek_r1", "add them</think>Four.", "add them", "Four."),  # the template opened <think>
    ("deepseek_r1", "<think>add them</think>Four.", "add them", "Four."),
    ("deepseek_r1", "no end tag", "no end tag", ""),
    ("deepseek_r1", "a </thin> b</think> c", "a </thin> b", " c"),
]


@pytest.mark.parametrize("style, text, reasoning, answer", CASES)
def test_streamed_in_any_pieces_the_split_is_the_whole_ones(style, text, reasoning, answer):
    assert split_reasoning(style, text) == (reasoning, answer)
    rng = random.Random(0)
    for _ in range(50):  # every way of cutting it, a </think> split across pieces included
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        splitter, got = ReasoningSplitter(style), ["", ""]
        for n, piece in enumerate(pieces):
            r, a = splitter.feed(piece, final=n == len(pieces) - 1)
            got[0] += r
            got[1] += a
        assert (got[0] if splitter.reasoned else None, got[1]) == (reasoning, answer), pieces


def test_auto_reads_the_style_off_the_template():
    assert parser_for_template("{{ '<think>' }}{% if enable_thinking %}") == "qwen3"
    assert parser_for_template("{{ bos }}<｜Assistant｜><think>\n") == "deepseek_r1"
    assert parser_for_template("<|im_start|>assistant\n") is None


# The answer a grammar forces, so the tiny model writes a thinking block.
FORCED = {"guided_regex": r"<think>[a-z]{2,8} [a-z]{2,8}</think>[A-Z][a-z]{2,6}\."}


def test_chat_returns_the_thinking_apart_streamed_or_not(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=40,
                  temperature=0, extra_body=FORCED)
    message = client.chat.completions.create(**kwargs).choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and " " in reasoning and message.model_extra["reasoning"] == reasoning
    assert message.content and message.content[0].isupper() and "<think>" not in message.content
    chunks = [c.choices[0].delta for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in chunks) == reasoning
    assert "".join(d.content or "" for d in chunks) == message.content
    first_content = next(i for i, d in enumerate(chunks) if d.content)
    assert all(not d.model_extra.get("reasoning_content") for d in chunks[first_content:])  # thinking first
    plain = client.chat.completions.create(**{**kwargs, "extra_body": {}}).choices[0].message
    assert plain.model_extra.get("reasoning_content") is None  # no block: all answer (qwen3 style)


def test_responses_give_a_reasoning_item_streamed_or_not(client):
    kwargs = dict(model=MODEL, input="What is 2 + 2?", max_output_tokens=40, temperature=0, extra_body=FORCED)
    response = client.responses.create(**kwargs)
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    thought = response.output[0].content[0].text
    events = list(client.responses.create(**kwargs, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert [i.type for i in events[-1].response.output] == kinds
    assert events[-1].response.output_text == response.output_text and "<think>" not in response.output_text


def test_chat_template_kwargs_reach_the_template(client):
    messages = [{"role": "user", "content": "Hi"}]
    on = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    off = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the empty thinking block opens the answer
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert refused.value.body["param"] == "chat_template_kwargs"


def test_a_thinking_budget_cuts_the_thinking_short(client):
    """After thinking_budget tokens of thinking, </think> is forced and the model answers: the
    budgeted thinking is the start of the unbudgeted one (greedy), and shorter."""
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=60,
                  temperature=0)
    loose = {"guided_regex": r"<think>[a-z]{0,40}</think>[A-Z][a-z]{2,6}\."}
    free = client.chat.completions.create(**kwargs, extra_body=loose).choices[0].message
    cut = client.chat.completions.create(**kwargs, extra_body={**loose, "thinking_budget": 3}).choices[0].message
    thought, short = free.model_extra["reasoning_content"], cut.model_extra["reasoning_content"]
    assert len(thought) >= 8 and free.content
    assert thought.startswith(short) and 0 < len(short) < len(thought) and cut.content and cut.content[0].isupper()

"""Reasoning models' thinking returned apart from the answer (deployments/api/reasoning.py):
the splitter alone, then through the session application, whose chat template carries Qwen3's
thinking switch (tests/deployments/conftest.py), so `reasoning_parser: auto` finds qwen3."""

from __future__ import annotations

import json
import random

import jsonschema
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


# A thought begun for the model (vLLM's continue_final_message): it goes on thinking, and the
# budget closes the thinking (the embedded model does not think of itself).
BEGUN = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "<think>\nLet me"}]
GO_ON = {"add_generation_prompt": False, "continue_final_message": True}


def test_chat_returns_the_thinking_apart_streamed_or_not(client, tokenizer):
    kwargs = dict(model=MODEL, messages=BEGUN, max_tokens=24, temperature=0,
                  extra_body={**GO_ON, "thinking_budget": 6})
    answer = client.chat.completions.create(**kwargs)
    message = answer.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.model_extra["reasoning"] == reasoning and "<think>" not in reasoning
    assert message.content and "</think>" not in message.content
    closing = len(tokenizer.encode("</think>", add_special_tokens=False))
    assert answer.usage.completion_tokens_details.reasoning_tokens == 6 + closing
    chunks = [c.choices[0].delta for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in chunks) == reasoning
    assert "".join(d.content or "" for d in chunks) == message.content
    first_content = next(i for i, d in enumerate(chunks) if d.content)
    assert all(not d.model_extra.get("reasoning_content") for d in chunks[first_content + 1:])  # thinking first
    plain = client.chat.completions.create(model=MODEL, messages=BEGUN[:1], max_tokens=8, temperature=0)
    assert plain.choices[0].message.model_extra.get("reasoning_content") is None  # no block: all answer (qwen3)
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=BEGUN[:1], max_tokens=2, extra_body=GO_ON)
    assert refused.value.body["param"] == "continue_final_message"


def test_the_grammar_applies_after_the_thinking(client):
    """response_format constrains the answer, not the thought before it."""
    schema = {"type": "object", "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["sum"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=MODEL, messages=BEGUN, max_tokens=40, temperature=0, extra_body={**GO_ON, "thinking_budget": 5},
        response_format={"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}})
    message = answer.choices[0].message
    assert message.model_extra["reasoning_content"] and "{" not in message.model_extra["reasoning_content"]
    jsonschema.validate(json.loads(message.content), schema)


def test_responses_give_a_reasoning_item_streamed_or_not(client):
    kwargs = dict(model=MODEL, input=BEGUN, max_output_tokens=24, temperature=0,
                  extra_body={**GO_ON, "thinking_budget": 6})
    response = client.responses.create(**kwargs)
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    thought = response.output[0].content[0].text
    assert response.usage.output_tokens_details.reasoning_tokens > 6
    events = list(client.responses.create(**kwargs, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert [i.type for i in events[-1].response.output] == kinds
    assert events[-1].response.output_text == response.output_text and "</think>" not in response.output_text


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
    """After thinking_budget tokens of thinking, </think> is forced and the model answers: a
    shorter budget's thinking is the start of a longer one's (greedy)."""
    kwargs = dict(model=MODEL, messages=BEGUN, max_tokens=30, temperature=0)
    long, short = (client.chat.completions.create(**kwargs, extra_body={**GO_ON, "thinking_budget": budget})
                   .choices[0].message for budget in (12, 3))
    thought, cut = long.model_extra["reasoning_content"], short.model_extra["reasoning_content"]
    assert thought.startswith(cut) and 0 < len(cut) < len(thought) and short.content

"""Constrained decoding and logit_bias in the engine (the embedded model, float32)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import RequestError, SamplingParams
from engine.structured_output import GrammarError, StructuredOutput

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                   "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def _chat(llm, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def test_json_schema_rows_and_free_rows_share_a_step(llm):
    """A batch mixing constrained (greedy and seeded) and free requests: every constrained
    output validates against its schema, and the free ones are the same as run alone."""
    prompt = _chat(llm, "Describe a person as JSON.")
    schema = SamplingParams(max_tokens=80, temperature=0.0, structured_output=StructuredOutput(json_schema=PERSON))
    sampled = SamplingParams(max_tokens=80, temperature=0.9, seed=7,
                             structured_output=StructuredOutput(json_schema=PERSON))
    free = SamplingParams(max_tokens=24, temperature=0.0)
    alone = llm.generate([prompt], free)[0].token_ids
    outputs = llm.generate([prompt, prompt, prompt], [schema, free, sampled])
    for out in (outputs[0], outputs[2]):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert outputs[1].token_ids == alone


def test_json_object_regex_and_choice(llm):
    prompt = _chat(llm, "Answer yes or no: is the sky blue?")
    cases = [
        (StructuredOutput(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (StructuredOutput(choice=["maybe", "certainly not"]), lambda t: t in ("maybe", "certainly not")),
        (StructuredOutput(grammar='root ::= "The answer is " ("yes" | "no") "."'),
         lambda t: t in ("The answer is yes.", "The answer is no.")),
    ]
    params = [SamplingParams(max_tokens=60, temperature=0.0, structured_output=spec) for spec, _ in cases]
    for (spec, check), out in zip(cases, llm.generate([prompt] * len(cases), params)):
        assert out.finish_reason == "stop" and check(out.text), (spec, out.text)


def test_bad_grammars_are_refused_before_running(llm):
    with pytest.raises(GrammarError):
        llm.generate([[1, 2, 3]], SamplingParams(structured_output=StructuredOutput(regex="(unclosed")))
    with pytest.raises(GrammarError):
        llm.generate([[1, 2, 3]], SamplingParams(structured_output=StructuredOutput(grammar="root ::= missing")))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", choice=["b"])
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_bans_and_forces_tokens(llm):
    prompt = _chat(llm, "Say hello.")
    greedy = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids[0]
    banned = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                   logit_bias={greedy: -100.0}))[0].token_ids[0]
    assert banned != greedy
    forced = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.8, seed=1,
                                                   logit_bias={42: 100.0}))[0].token_ids
    assert forced == [42, 42, 42]
    with pytest.raises(RequestError, match="logit_bias"):
        llm.generate([prompt], SamplingParams(logit_bias={10**9: 1.0}))


def test_a_grammar_applies_after_the_thinking(llm, tokenizer):
    """With thinking_end given, the grammar waits for the thinking to end (engine/thinking.py):
    an output that starts inside it (a prompt left mid-thought) thinks freely for its budget,
    then answers in the grammar; one that may open it (thinking_start) may begin with the
    opening as well as with what the grammar allows, and the thinking's tokens are counted."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    start, end = encode("<think>"), encode("</think>")
    prompt = _chat(llm, "Describe a person as JSON.")
    spec = StructuredOutput(json_schema=PERSON)
    base = dict(max_tokens=90, temperature=0.0, structured_output=spec, thinking_end=end)
    [free] = llm.generate([prompt + start], SamplingParams(max_tokens=4, temperature=0.0))
    [inside] = llm.generate([prompt + start], SamplingParams(**base, thinking_start=start, thinking_budget=4))
    assert inside.token_ids[:4] == free.token_ids  # thought freely, as without a grammar
    assert inside.token_ids[4:4 + len(end)] == end and inside.metrics.num_reasoning_tokens == 4 + len(end)
    assert inside.finish_reason == "stop", inside.text
    jsonschema.validate(json.loads(tokenizer.decode(inside.token_ids[4 + len(end):], skip_special_tokens=True)), PERSON)
    # It may open the thinking: a bias makes it, then the budget closes it and the grammar answers.
    opened_params = SamplingParams(**base, thinking_start=start, thinking_budget=2, logit_bias={start[0]: 100})
    [opened] = llm.generate([prompt], opened_params)
    thought = len(start) + 2 + len(end)
    assert opened.token_ids[:len(start)] == start and opened.token_ids[len(start) + 2:thought] == end
    assert opened.metrics.num_reasoning_tokens == thought
    jsonschema.validate(json.loads(tokenizer.decode(opened.token_ids[thought:], skip_special_tokens=True)), PERSON)
    # Not opened: the grammar from the first token, nothing counted as thinking.
    [direct] = llm.generate([prompt], SamplingParams(**base, thinking_start=start))
    jsonschema.validate(json.loads(direct.text), PERSON)
    assert direct.metrics.num_reasoning_tokens == 0

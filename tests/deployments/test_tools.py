"""Tool-call parsers, their grammars on the real model, and streaming hold-back (no Ray)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from deployments.api.chat import render_chat
from deployments.api.formatting import StreamText
from deployments.api.tools import PARSERS, get_parser, held_back, parser_for_template
from engine import RequestOutput, SamplingParams
from engine.structured_output import StructuredOutput

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "Oslo", "unit": "c"}'}}]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_each_parser_reads_back_what_it_writes(name):
    parser = get_parser(name)
    text = parser.format_calls(CALLS)
    content, calls = parser.parse(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in CALLS]
    assert parser.parse("Just an answer.") == ("Just an answer.", [])


def test_text_that_is_not_a_call_stays_content():
    hermes = get_parser("hermes")
    content, calls = hermes.parse("Sure. <tool_call>\n{not json}\n</tool_call>")
    assert calls == [] and content.startswith("Sure.")
    content, calls = hermes.parse('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                                  '</tool_call>')
    assert content == "Let me check." and calls[0].name == "add"
    assert get_parser("llama3_json").parse('{"name": "add", "parameters": {"a": 1}}; {"name": "x", "parameters": {}}')[
        1][1].name == "x"


def test_parser_defaults_follow_the_chat_template():
    assert parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_for_template("<|python_tag|>{{ tools }}") == "llama3_json"
    assert parser_for_template("<|im_start|>{{ message }}") == "hermes"
    assert parser_for_template(None) == "hermes"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_parser("nope")


def test_held_back_text():
    assert held_back("Hello <tool", "<tool_call>") == 5
    assert held_back("Hello", "<tool_call>") == 0
    assert held_back("a <", "<tool_call>") == 1


def _out(delta: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], text="", token_ids=[], finished=finished,
                         finish_reason="stop" if finished else None, delta_text=delta)


def test_streamed_text_holds_back_a_tool_call_and_releases_what_is_not_one():
    stream = StreamText(get_parser("hermes"))
    sent = [stream.feed(_out(d))[0] for d in ("Let me ", "check <tool", "_call>\n{\"name\": \"add\", ")]
    text, calls = stream.feed(_out('"arguments": {"a": 1, "b": 2}}\n</tool_call>', finished=True))
    assert "".join(sent) + text == "Let me check " and calls[0].name == "add"
    plain = StreamText(get_parser("hermes"))
    pieces = [plain.feed(_out("a <to"))[0], plain.feed(_out("ast> b", finished=True))[0]]
    assert pieces == ["a ", "<toast> b"]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_forced_grammar_makes_the_real_model_call_a_tool(llm, name):
    """With the grammar of a required call, the embedded model's answer parses into calls whose
    arguments validate, in every parser's format (tools rendered into the system prompt)."""
    parser = get_parser(name)
    prompt = render_chat(llm.tokenizer, [{"role": "user", "content": "What is the weather in Oslo?"}], TOOLS, name)
    params = SamplingParams(max_tokens=150, temperature=0.0, skip_special_tokens=False,
                            structured_output=StructuredOutput(grammar=parser.grammar(TOOLS[:1], parallel=False)))
    out = llm.generate([prompt], params)[0]
    assert out.finish_reason == "stop", out.text
    content, calls = parser.parse(out.text)
    assert content is None and len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), TOOLS[0]["function"]["parameters"])


def test_history_with_calls_renders_inline_for_a_template_without_tools(tokenizer):
    messages = [{"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": None, "tool_calls": CALLS[:1]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    text = tokenizer.decode(render_chat(tokenizer, messages, TOOLS, "hermes"))
    assert '"name": "get_weather"' in text  # the signatures, in the system message
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in text
    assert "<tool_response>\n3\n</tool_response>" in text

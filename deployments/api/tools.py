"""Tool calls: how a model writes them, how they are read back, and how they are forced.

Each parser knows one model family's convention:
- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen 2.5/3, Hermes,
  and semline's default for ChatML models such as SmolLM2);
- `llama3_json`: a bare `{"name": ..., "parameters": {...}}` (Llama 3.1+), optionally after
  `<|python_tag|>`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

`parse` turns a finished output into (content, calls); `grammar` gives the EBNF that forces
one call (or several, when parallel calls are allowed) whose arguments match the function's
JSON schema, for `tool_choice: required` or a named function; `system_prompt` and
`format_calls` render tools and past calls for chat templates that do not take `tools`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

# The most calls a forced, parallel tool choice may emit in one answer.
MAX_PARALLEL_CALLS = 8


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def to_openai(self) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class ToolParser:
    name = ""
    # The text that opens a tool call: streamed text is held back from where it may begin.
    start = ""
    # The key of a call's arguments in the model's JSON.
    arguments_key = "arguments"
    # Whether the opening text is a special token (kept in the text only if not skipped).
    start_is_special = False

    def system_prompt(self, tools: list[dict]) -> str:
        signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("You may call one or more functions to assist with the user query. The functions you can "
                f"call are described below as JSON:\n{signatures}\n{self._instructions()}")

    def _instructions(self) -> str:
        raise NotImplementedError

    def format_calls(self, calls: list[dict]) -> str:
        raise NotImplementedError

    def format_result(self, content: str) -> str:
        return content

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(the content outside tool calls or None, the calls); text that does not parse as
        calls is left as content."""
        raise NotImplementedError

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """EBNF (xgrammar's dialect) for the answer when a call is required."""
        repeat = f' ({self.grammar_separator} call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        return (f"root ::= {self.grammar_prefix}call{repeat}{self.grammar_suffix}\ncall ::= {self.grammar_call}\n"
                + _json_rules(tools, self.arguments_key))

    # EBNF pieces of the forced answer: around the calls, between calls, around each call.
    grammar_prefix, grammar_suffix, grammar_separator, grammar_call = "", "", '"\\n"', "call_json"

    def _call(self, obj) -> ParsedCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    _pattern = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _instructions(self) -> str:
        return ('For each function call, return a JSON object with the function name and arguments '
                'within <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, '
                '"arguments": <args-json-object>}\n</tool_call>')

    def format_calls(self, calls: list[dict]) -> str:
        return "\n".join(f'<tool_call>\n{json.dumps(_plain_call(c, self.arguments_key))}\n</tool_call>'
                         for c in calls)

    def format_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        first = text.find(self.start)
        if first < 0:
            return text, []
        calls = []
        for match in self._pattern.finditer(text, first):
            call = self._call(_loads(match.group(1)))
            if call is None:
                return text, []
            calls.append(call)
        content = text[:first].strip()
        return content or None, calls

    grammar_call = '"<tool_call>\\n" call_json "\\n</tool_call>"'


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start = "{"
    arguments_key = "parameters"

    def _instructions(self) -> str:
        return ('To call a function, respond with only a JSON object of the form {"name": <function-name>, '
                '"parameters": <args-json-object>}; separate several calls with "; ".')

    def format_calls(self, calls: list[dict]) -> str:
        return "; ".join(json.dumps(_plain_call(c, self.arguments_key)) for c in calls)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder, position = json.JSONDecoder(), 0
        while position < len(body):
            try:
                obj, end = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return text, []
            call = self._call(obj)
            if call is None:
                return text, []
            calls.append(call)
            position = end
            rest = body[position:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            position = len(body) - len(rest)
        return None, calls

    grammar_separator = '"; "'


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    start_is_special = True

    def _instructions(self) -> str:
        return ('To call functions, respond with [TOOL_CALLS] followed by a JSON list of objects of the form '
                '{"name": <function-name>, "arguments": <args-json-object>}.')

    def format_calls(self, calls: list[dict]) -> str:
        return "[TOOL_CALLS]" + json.dumps([_plain_call(c, self.arguments_key) for c in calls])

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        first = text.find(self.start)
        if first < 0:
            return text, []
        try:
            items, _ = json.JSONDecoder().raw_decode(text[first + len(self.start):].lstrip())
        except json.JSONDecodeError:
            return text, []
        calls = [self._call(item) for item in (items if isinstance(items, list) else [items])]
        if not calls or None in calls:
            return text, []
        content = text[:first].strip()
        return content or None, calls

    grammar_prefix, grammar_suffix, grammar_separator = '"[TOOL_CALLS][" ', ' "]"', '", "'


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for_template(chat_template: str | None) -> str:
    """The parser that matches a chat template's own tool format; hermes when it has none
    (ChatML models, like the embedded SmolLM2, follow Qwen's convention best)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|eot_id|>" in template and "tools" in template):
        return "llama3_json"
    return "hermes"


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(PARSERS)}") from None


def held_back(text: str, start: str) -> int:
    """How many characters at the end of `text` could be the beginning of `start` (streamed
    text is held back by that much until the next tokens tell)."""
    for size in range(min(len(start) - 1, len(text)), 0, -1):
        if start.startswith(text[-size:]):
            return size
    return 0


def _json_rules(tools: list[dict], arguments_key: str) -> str:
    """EBNF rules for `call_json`: one of the tools' {"name": ..., <arguments_key>: ...} objects."""
    import xgrammar as xgr

    schema = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]},
                       arguments_key: t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", arguments_key], "additionalProperties": False,
    } for t in tools]}
    text = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True))
    return re.sub(r"\broot\b", "call_json", text)


def _plain_call(call: dict, arguments_key: str) -> dict:
    """An OpenAI tool call as the model would have written it."""
    function = call.get("function", call)
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        arguments = _loads(arguments)
        arguments = arguments if arguments is not None else {}
    return {"name": function.get("name", ""), arguments_key: arguments}


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None

"""A chat request rendered to prompt tokens, tools included, through the model's own template.

A template that takes `tools` (Qwen, Llama 3.1+, Mistral) gets them, and the history's
tool calls and results, as transformers passes them. A template that does not (ChatML
models such as the embedded SmolLM2) gets them written in by semline in the tool parser's
convention: the function signatures in the system message, past calls in the assistant
messages' text, tool results as the parser wraps them.
"""

from __future__ import annotations

import json

from deployments.api.tools import get_parser, parser_for_template
from engine.llm import apply_chat_template


def resolve_parser_name(tokenizer, configured: str) -> str:
    return parser_for_template(getattr(tokenizer, "chat_template", None)) if configured == "auto" else configured


def takes_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None, parser_name: str,
                template_kwargs: dict | None = None) -> list[int]:
    """Prompt token ids of a conversation (OpenAI message dicts: content a string or None,
    assistant `tool_calls` with JSON-string arguments, `tool` messages) ready for the answer.
    template_kwargs: more variables for the template (e.g. Qwen3's enable_thinking)."""
    if takes_tools(tokenizer):
        return apply_chat_template(tokenizer, [_native(m) for m in messages], tools=tools or None,
                                   template_kwargs=template_kwargs)
    return apply_chat_template(tokenizer, _inline(messages, tools, get_parser(parser_name)),
                               template_kwargs=template_kwargs)


def _native(message: dict) -> dict:
    """As transformers' templates expect: arguments as objects, content never None."""
    message = {**message, "content": message.get("content") or ""}
    if message.get("tool_calls"):
        message["tool_calls"] = [
            {**call, "function": {**call["function"], "arguments": _as_object(call["function"].get("arguments"))}}
            for call in message["tool_calls"]]
    return message


def _inline(messages: list[dict], tools: list[dict] | None, parser) -> list[dict]:
    rendered = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = parser.format_calls(message["tool_calls"])
            rendered.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            rendered.append({"role": "user", "content": parser.format_result(content)})
        else:
            rendered.append({"role": role, "content": content})
    if tools:
        prompt = parser.system_prompt(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{prompt}"}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    # Consecutive tool results become consecutive user messages: a template may expect
    # alternation, so they are joined.
    joined: list[dict] = []
    for message in rendered:
        if joined and message["role"] == "user" and joined[-1]["role"] == "user":
            joined[-1] = {"role": "user", "content": f"{joined[-1]['content']}\n{message['content']}"}
        else:
            joined.append(message)
    return joined


def _as_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return {}
    return arguments or {}

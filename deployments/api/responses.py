"""OpenAI's Responses API (`POST /v1/responses`) on top of the chat path.

A Responses request is translated into a chat completion request (instructions as the
system message, the previous response's conversation, input items as messages, flat
function tools nested, `text.format` as `response_format`), planned and run as one;
its output is translated back into a Response object, or into the Responses stream's
typed events. Stored responses (GET/DELETE /v1/responses/{id}, its input items,
`previous_response_id`) are kept by the router actor for every ingress replica, for a
bounded time, number and size.
"""

from __future__ import annotations

import json
import time
import uuid

from cluster.router import BoundedStore
from deployments.api.protocol import ResponsesRequest


class ResponsesError(ValueError):
    """A Responses request that cannot be translated (400), naming the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


class ResponseStore:
    """Stored responses (store: true): the Response, its input items and the conversation after
    it (for previous_response_id). Kept by the router actor, so every ingress replica sees the
    same ones (in this process where there is no router: the Ray Data batch job), bounded in
    count and bytes for each owner (a tenant's answers never push out another's), each for
    `ttl_s` seconds."""

    def __init__(self, admission, max_entries: int = 4096, ttl_s: float = 3600.0,
                 max_bytes: int = 64 * 2**20) -> None:
        self.admission, self.max_entries, self.ttl_s, self.max_bytes = admission, max_entries, ttl_s, max_bytes
        self._local = BoundedStore() if admission.router is None else None

    async def put(self, response: dict, input_items: list[dict], conversation: list[dict],
                  owner: str | None = None) -> bool:
        record = _record(response, input_items, conversation, owner)
        if self._local is not None:
            return self._local.put(response["id"], record, self.max_entries, self.max_bytes, owner)
        if response.get("background"):  # kept unless it was cancelled or deleted meanwhile
            return await self.admission.call("response_finish", response["id"], record, self.max_entries,
                                             self.max_bytes, owner)
        return await self.admission.call("response_put", response["id"], record, self.max_entries, self.max_bytes,
                                         owner)

    # Background responses (the realtime lane's: the router keeps them).

    async def start(self, response: dict, input_items: list[dict], owner: str | None) -> bool:
        """A background response accepted, stored as it stands until it ends (put)."""
        return await self.admission.call("response_start", response["id"],
                                         _record(response, input_items, [], owner), self.max_entries, self.max_bytes,
                                         owner)

    async def wait_cancel(self, response_id: str) -> bool:
        """Returns when the background response ended (False) or was cancelled or deleted (True)."""
        return await self.admission.call("response_wait_cancel", response_id)

    async def cancel(self, response_id: str) -> dict | None:
        """Cancel a running background response: its record, saying so; another's as it is."""
        record = await self.admission.call("response_cancel", response_id, self.ttl_s, self.max_entries,
                                           self.max_bytes)
        return None if record is None else json.loads(record)

    async def get(self, response_id: str) -> dict | None:
        if self._local is not None:
            record = self._local.get(response_id, self.ttl_s)
        else:
            record = await self.admission.call("response_get", response_id, self.ttl_s)
        return None if record is None else json.loads(record)

    async def delete(self, response_id: str) -> bool:
        if self._local is not None:
            return self._local.delete(response_id)
        return await self.admission.call("response_delete", response_id)


def _record(response: dict, input_items: list[dict], conversation: list[dict], owner: str | None) -> bytes:
    return json.dumps({"response": response, "input_items": input_items, "conversation": conversation,
                       "owner": owner}, ensure_ascii=False).encode()


def input_items(value: str | list[dict]) -> list[dict]:
    """A request's input as the Responses API lists it back: items with ids."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return [{**item, "id": item.get("id") or f"msg_{uuid.uuid4().hex}"} for item in value]


# Chat completion fields beyond OpenAI's that a Responses request may carry too (vLLM's and
# semline's extensions): passed on as they are.
CHAT_EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "seed", "ignore_eos", "logit_bias",
                   "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                   "chat_template_kwargs", "thinking_budget", "add_generation_prompt", "continue_final_message",
                   "priority", "ttft_deadline_ms")


def chat_request(body: ResponsesRequest, history: list[dict]) -> tuple[dict, list[dict]]:
    """(the chat completion request body, the conversation to keep for the next response)."""
    conversation = list(history) + input_messages(body.input)
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    chat = {"model": body.model, "messages": messages, "stream": body.stream,
            "parallel_tool_calls": body.parallel_tool_calls}
    for name in ("temperature", "top_p"):  # only those the request set: the model's defaults otherwise
        if name in body.model_fields_set:
            chat[name] = getattr(body, name)
    if body.max_output_tokens is not None:
        chat["max_tokens"] = body.max_output_tokens
    if body.user is not None:
        chat["user"] = body.user
    extra = body.model_extra or {}
    chat.update({name: extra[name] for name in CHAT_EXTENSIONS if name in extra})
    if body.tools:
        chat["tools"] = [_nested_tool(tool, i) for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = _tool_choice(body.tool_choice)
    fmt = (body.text or {}).get("format") if isinstance(body.text, dict) else None
    if fmt:
        chat["response_format"] = _response_format(fmt)
    return chat, conversation


def input_messages(value) -> list[dict]:
    """Responses input (a string, or items: messages, function calls and their outputs) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ResponsesError(f"input item {index} is not an object", f"input.{index}")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"), index)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # a reasoning model's item sent back: nothing for these models to read
        else:
            raise ResponsesError(f"input item {index} is of type {kind!r}, which is not supported "
                                 "(message, function_call, function_call_output)", f"input.{index}.type")
    return messages


def output_items(text: str, calls: list) -> list[dict]:
    """A finished answer's output items: its text as a message, then its tool calls."""
    items = [message_item(f"msg_{uuid.uuid4().hex}", text, "completed")] if text else []
    return items + [function_call_item(call) for call in calls]


def response_object(body: ResponsesRequest, response_id: str, finish_reason: str | None, items: list[dict],
                    usage: dict) -> dict:
    """A finished Response."""
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)
    return {**response_header(body, response_id, "incomplete" if reason else "completed"),
            "output": items, "incomplete_details": {"reason": reason} if reason else None,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                      "total_tokens": usage["total_tokens"],
                      "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                      "output_tokens_details": {
                          "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]}}}


def response_header(body: ResponsesRequest, response_id: str, status: str) -> dict:
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
            "model": body.model, "output": [], "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "temperature": body.temperature,
            "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [], "text": body.text or {"format": {"type": "text"}},
            "metadata": body.metadata or {}, "store": body.store, "background": body.background, "user": body.user,
            "usage": None}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict:
    """A reasoning model's thinking, as the Responses API's reasoning output item."""
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else []}


def message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def function_call_item(call, status: str = "completed") -> dict:
    openai_call = call.to_openai()
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": openai_call["id"],
            "name": call.name, "arguments": call.arguments if status == "completed" else "", "status": status}


def conversation_after(conversation: list[dict], items: list[dict]) -> list[dict]:
    """The conversation a next response continues: this one's input and its output."""
    text = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call"]
    answer = {"role": "assistant", "content": text or None}
    if calls:
        answer["tool_calls"] = calls
    return conversation + [answer] if (text or calls) else conversation


def sse_event(kind: str, sequence_number: int, **fields) -> str:
    payload = {"type": kind, "sequence_number": sequence_number, **fields}
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ResponsesError(f"input item {index} has no text content", f"input.{index}.content")
    texts = []
    for part_index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise ResponsesError(f"content part {part_index} of input item {index} is of type {kind!r}: the served "
                                 "model reads text only (input_text)", f"input.{index}.content.{part_index}")
        texts.append(part["text"])
    return "\n".join(texts)


def _nested_tool(tool: dict, index: int) -> dict:
    if tool.get("type") != "function":
        raise ResponsesError(f"tool {index} is of type {tool.get('type')!r}: only function tools are supported",
                             f"tools.{index}.type")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise ResponsesError("tool_choice: only none, auto, required or a function are supported", "tool_choice")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(fmt: dict) -> dict:
    kind = fmt.get("type")
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "response"), "schema": fmt.get("schema", {"type": "object"}),
            "strict": fmt.get("strict")}}
    return {"type": kind}

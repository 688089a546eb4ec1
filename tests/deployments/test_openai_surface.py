"""The OpenAI API as agents and apps send it (issue 18), through the official openai client
against the real application: tools, structured output, prompt lists, echo, streamed
logprobs, unknown fields, embeddings, /tokenize and /detokenize."""

from __future__ import annotations

import base64
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.deployments.conftest import API_KEY, MODEL

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False},
    },
}
ADD = {
    "type": "function",
    "function": {"name": "add", "description": "Add two integers.",
                 "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                "required": ["a", "b"]}},
}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _schema_of(name: str) -> dict:
    return {t["function"]["name"]: t for t in (WEATHER, ADD)}[name]["function"]["parameters"]


def test_forced_tool_calls_parse_and_validate(client):
    """tool_choice required and a named function: the answer is a tool call whose arguments
    parse and validate against that function's schema; finish_reason tool_calls."""
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        resp = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, ADD],
                                              tool_choice=choice, max_tokens=120, temperature=0)
        out = resp.choices[0]
        assert out.finish_reason == "tool_calls" and out.message.tool_calls, out.message
        for call in out.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), _schema_of(call.function.name))
        if isinstance(choice, dict):
            assert {c.function.name for c in out.message.tool_calls} == {"add"}


def test_streamed_tool_calls_reassemble_to_the_unstreamed_ones(client):
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=120,
                  temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            assert not choice.delta.content  # the call's text is not streamed as content
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"name": "", "arguments": ""})
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    assert [(c.function.name, c.function.arguments) for c in full] == [
        (calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    assert "tool_calls" in reasons


def test_tool_history_and_tool_choice_none(client):
    """An assistant message with tool_calls (content null) and the tool's answer render and
    run; tool_choice none answers in text."""
    messages = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                          max_tokens=30, temperature=0)
    assert resp.choices[0].message.content and not resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_json_schema_outputs_validate_in_a_mixed_batch(client):
    """Constrained (strict json_schema, json_object) and free requests at once: every
    constrained answer parses and validates; the free ones are unconstrained text."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(i):
        kind = ("schema", "object", "free")[i % 3]
        extra = {"schema": {"response_format": fmt}, "object": {"response_format": {"type": "json_object"}},
                 "free": {}}[kind]
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Describe person number {i} as JSON."}],
            max_tokens=80, temperature=0.7, seed=i, **extra)
        return kind, resp.choices[0]

    with ThreadPoolExecutor(6) as pool:  # the session's router admits 4 and queues 4
        answers = list(pool.map(ask, range(6)))
    for kind, choice in answers:
        if kind == "schema":
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), PERSON)
        elif kind == "object":  # any object: the small model may ramble on until max_tokens
            text = choice.message.content
            assert text.startswith("{")
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
        else:
            assert choice.message.content
    with pytest.raises(openai.BadRequestError):  # a pattern that does not compile: 400, not 500
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "(unclosed"})
    resp = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0,
                                     extra_body={"structured_outputs": {"choice": ["blue", "green"]}})
    assert resp.choices[0].text in ("blue", "green")


def test_prompt_lists_echo_and_logit_bias(client):
    resp = client.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"], n=2, max_tokens=4,
                                     temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text and resp.choices[2].text == resp.choices[3].text
    alone = client.completions.create(model=MODEL, prompt="Red, green,", max_tokens=4, temperature=0)
    assert resp.choices[2].text == alone.choices[0].text
    assert resp.usage.prompt_tokens == 2 * alone.usage.prompt_tokens or resp.usage.prompt_tokens > alone.usage.prompt_tokens
    ids = client.completions.create(model=MODEL, prompt=[[504, 28], [504, 28, 506]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2
    echoed = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "One, two," + resp.choices[0].text
    first = alone.choices[0]
    tokenized = httpx.post(f"{client.base_url.scheme}://{client.base_url.host}:{client.base_url.port}/tokenize",
                           json={"prompt": first.text}, headers=HEADERS).json()["tokens"]
    banned = client.completions.create(model=MODEL, prompt="Red, green,", max_tokens=4, temperature=0,
                                       logit_bias={str(tokenized[0]): -100})
    assert banned.choices[0].text != first.text


def test_streamed_logprobs_match_the_unstreamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8,
                  temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [lp for chunk in client.chat.completions.create(**kwargs, stream=True) for choice in chunk.choices
                for lp in ((choice.logprobs.content or []) if choice.logprobs else [])]
    # (the second request reads the first's prompt from the prefix cache: the same numbers to ~1e-4)
    assert [t.token for t in streamed] == [t.token for t in full]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, full)) < 1e-3
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    text = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5, temperature=0, logprobs=1,
                                     stream=True)
    tokens = [t for chunk in text for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert len(tokens) == 5


def test_streamed_prompt_too_long_is_400_before_the_stream(client):
    with pytest.raises(openai.BadRequestError, match="tokens"):
        client.completions.create(model=MODEL, prompt=[5] * 9000, max_tokens=5, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=5, stream=True,
                                       extra_body={"guided_grammar": "root ::= undefined_rule"})


def test_unknown_fields_are_ignored_and_named_unsupported_ones_refused(serve_app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi", "future_field": 1}], "max_tokens": 3,
            "metadata": {"k": "v"}, "store": False, "brand_new_option": {"x": 1}, "parallel_tool_calls": False}
    resp = httpx.post(f"{serve_app}/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-semline-ignored-fields"] == "brand_new_option, messages.future_field"
    refused = httpx.post(f"{serve_app}/v1/chat/completions", json={**body, "functions": [{"name": "f"}]},
                         headers=HEADERS, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "functions"
    audio = httpx.post(f"{serve_app}/v1/chat/completions", json={**body, "modalities": ["text", "audio"]},
                       headers=HEADERS, timeout=60)
    assert audio.status_code == 400 and audio.json()["error"]["param"] == "modalities"


def test_embeddings_are_stable_across_calls_and_batches(client):
    texts = ["The cat sat on the mat.", "A KV cache stores keys and values.", "Paris is in France."]
    one = client.embeddings.create(model=MODEL, input=texts[1]).data[0].embedding
    batch = client.embeddings.create(model=MODEL, input=texts)
    again = client.embeddings.create(model=MODEL, input=[texts[2], texts[1]])
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.data[1].embedding == one == again.data[1].embedding
    assert abs(sum(x * x for x in one) - 1.0) < 1e-4 and len(one) == 576
    assert batch.usage.prompt_tokens > 10
    similar = sum(a * b for a, b in zip(one, client.embeddings.create(
        model=MODEL, input="KV caches store the keys and values.").data[0].embedding))
    unrelated = sum(a * b for a, b in zip(one, batch.data[2].embedding))
    assert similar > unrelated
    raw = httpx.post(f"{client.base_url}embeddings", json={"model": MODEL, "input": texts[1],
                                                           "encoding_format": "base64"}, headers=HEADERS).json()
    decoded = struct.unpack(f"<{len(one)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, one)) < 1e-6
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="x", dimensions=8)


def test_tokenize_and_detokenize(serve_app, client):
    tok = httpx.post(f"{serve_app}/tokenize", json={"model": MODEL, "prompt": "Hello world",
                                                    "return_token_strs": True}, headers=HEADERS).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0 and len(tok["token_strs"]) == tok["count"]
    back = httpx.post(f"{serve_app}/detokenize", json={"tokens": tok["tokens"]}, headers=HEADERS).json()
    assert back == {"prompt": "Hello world"}
    chat = httpx.post(f"{serve_app}/tokenize", json={"messages": ASK_WEATHER}, headers=HEADERS).json()
    usage = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert httpx.post(f"{serve_app}/tokenize", json={"prompt": "x"}).status_code == 401
    bad = httpx.post(f"{serve_app}/detokenize", json={"tokens": [10**9]}, headers=HEADERS)
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    assert httpx.post(f"{serve_app}/tokenize", json={"model": "other", "prompt": "x"},
                      headers=HEADERS).status_code == 404


def test_responses_api_text_conversation_and_stream(client):
    first = client.responses.create(model=MODEL, input="Name a color.", instructions="Answer in one word.",
                                    max_output_tokens=8, temperature=0)
    assert first.object == "response" and first.status in ("completed", "incomplete") and first.output_text
    assert first.usage.input_tokens > 5 and first.usage.output_tokens > 0
    second = client.responses.create(model=MODEL, input="And another one?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    # The second prompt holds the first turn (its input and answer), without its instructions.
    assert second.usage.input_tokens > first.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown", max_output_tokens=4)
    events = list(client.responses.create(model=MODEL, input="Name a color.", instructions="Answer in one word.",
                                          max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == first.output_text


def test_stored_responses_are_retrieved_listed_and_deleted_from_any_ingress(client, serve_app):
    """GET /v1/responses/{id} (streamed ones too), its input_items, DELETE, through the openai
    client; a response with store: false is not kept. The store is the router actor's, which
    every ingress replica reads and writes."""
    import json

    import ray

    made = client.responses.create(model=MODEL, input="Name a color.", max_output_tokens=6, temperature=0)
    streamed = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Name a fruit."}],
                                            max_output_tokens=6, temperature=0, stream=True))[-1].response
    again = client.responses.retrieve(made.id)
    assert again.id == made.id and again.output_text == made.output_text and again.usage == made.usage
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    items = client.responses.input_items.list(made.id).data
    assert [(i.role, i.content[0].text) for i in items] == [("user", "Name a color.")]
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)

    router = ray.get_actor("semline-router")  # what every ingress replica reads and writes
    assert json.loads(ray.get(router.response_get.remote(made.id, 3600)))["response"]["id"] == made.id
    assert client.responses.delete(made.id) is None  # the SDK returns nothing for a deletion
    assert ray.get(router.response_get.remote(made.id, 3600)) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(made.id)


def test_background_responses_run_on_and_are_cancelled(client):
    """background: answered at once (queued), read back when done (the foreground's answer),
    or cancelled while it runs (its status stays cancelled; the seat and the engine request go);
    cancel on a response that is not a background one is refused, on an unknown id 404."""
    import time

    import ray

    kwargs = dict(model=MODEL, input="Name a color.", max_output_tokens=6, temperature=0)
    made = client.responses.create(**kwargs, background=True)
    assert made.status == "queued" and made.background is True and made.output == []
    for _ in range(600):
        done = client.responses.retrieve(made.id)
        if done.status not in ("queued", "in_progress"):
            break
        time.sleep(0.05)
    assert done.status in ("completed", "incomplete") and done.usage.output_tokens > 0
    assert done.output_text == client.responses.create(**kwargs).output_text
    assert client.responses.cancel(made.id).status == done.status  # ended already: as it is

    long = client.responses.create(model=MODEL, input="Count to a thousand.", max_output_tokens=256, temperature=0,
                                   background=True, extra_body={"ignore_eos": True})
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.id == long.id
    router = ray.get_actor("semline-router")
    for _ in range(100):  # its seat released (nothing else runs now)
        if ray.get(router.stats.remote())["requests_inflight"] == 0:
            break
        time.sleep(0.05)
    assert ray.get(router.stats.remote())["requests_inflight"] == 0
    assert client.responses.retrieve(long.id).status == "cancelled"  # its runner does not overwrite it
    with pytest.raises(openai.BadRequestError, match="only a background response"):
        client.responses.cancel(client.responses.create(**kwargs).id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(**kwargs, background=True, store=False)


def test_responses_api_function_tools_and_structured_text(client):
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
            "parameters": WEATHER["function"]["parameters"]}
    called = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],
                                     tool_choice="required", max_output_tokens=120, temperature=0)
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
    answer = client.responses.create(model=MODEL, previous_response_id=called.id, tools=[tool], max_output_tokens=16,
                                     temperature=0, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                            "output": '{"temperature": 21}'}])
    assert answer.status in ("completed", "incomplete") and answer.usage.input_tokens > called.usage.input_tokens
    streamed = list(client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],
                                            tool_choice="required", max_output_tokens=120, temperature=0, stream=True))
    done = [e.item for e in streamed if e.type == "response.output_item.done"]
    assert [(i.name, i.arguments) for i in done] == [(c.name, c.arguments) for c in calls]
    person = client.responses.create(model=MODEL, input="Describe a person as JSON.", max_output_tokens=80,
                                     temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                                                     "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(person.output_text), PERSON)
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}], max_output_tokens=4)

"""The realtime lane through the official openai client, against real Ray Serve and the real model."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.deployments.conftest import API_KEY, MAX_PROMPT_TOKENS, MODEL


def test_list_models(client):
    from tests.deployments.conftest import ADAPTER, ALIAS, EXPERIMENT, FILTERED

    models = client.models.list().data
    # base (and its other served name), adapters, experiments
    assert [m.id for m in models] == [MODEL, ALIAS, ADAPTER, EXPERIMENT, FILTERED]
    assert models[2].model_extra["parent"] == MODEL
    [context] = {m.model_extra["max_model_len"] for m in models}  # one engine: its context (KV cache-bound here)
    assert isinstance(context, int) and MAX_PROMPT_TOKENS < context <= 8192
    kwargs = dict(prompt="Hello", max_tokens=3, temperature=0)
    assert client.completions.create(model=ALIAS, **kwargs).choices[0].text == \
        client.completions.create(model=MODEL, **kwargs).choices[0].text


def test_the_models_sampling_defaults_apply_to_the_fields_a_request_leaves_out():
    from deployments.api.protocol import ChatCompletionRequest

    defaults = {"temperature": 0.3, "top_k": 5, "top_p": 0.8}
    body = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0})
    params = body.sampling_params(16, None, 0, defaults=defaults)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (1.0, 5, 0.8, 0.0)
    assert body.sampling_params(16, None, 0).top_k == 0  # no defaults: OpenAI's


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=20, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_content_parts_and_the_developer_role(client):
    """Messages as the newer SDKs and agent frameworks send them: content as a list of text
    parts (joined one per line) and the `developer` role (a system message) answer exactly
    as the plain forms; an image part is refused with a 400 that names it."""
    import openai

    def ask(messages):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                              temperature=0).choices[0].message.content

    plain = ask([{"role": "system", "content": "Answer briefly.\nUse one word."},
                 {"role": "user", "content": "Name a color."}])
    parts = ask([{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."},
                                                    {"type": "text", "text": "Use one word."}]},
                 {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}])
    assert parts == plain
    with pytest.raises(openai.BadRequestError) as refused:
        ask([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    assert "image_url" in refused.value.message and refused.value.body["param"] == "messages.0.content"


def test_streamed_chat_matches_unstreamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=16,
                  temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completion_with_n_seed_stop_and_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0.9,
                                      seed=5, n=2, stop=["9"], logprobs=2)
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert "9" not in choice.text
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) > 0
    again = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0.9,
                                       seed=5, n=2, stop=["9"])
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]


def test_streamed_completion(client):
    stream = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=10, temperature=0,
                                       stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces)


def test_running_usage_counts_each_prompt_once_whichever_choice_speaks_first():
    from deployments.api.formatting import RunningUsage
    from engine.outputs import RequestMetrics, RequestOutput

    def out(tokens: list[int]) -> RequestOutput:
        metrics = RequestMetrics(arrival_time=0.0)
        metrics.num_prompt_tokens = 7
        return RequestOutput("r", None, [], "", [], False, None, delta_token_ids=tokens, metrics=metrics)

    running = RunningUsage(choices=2, n=2)
    running.add(1, out([5, 6]))  # the second choice's tokens come first
    assert running.usage() == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    running.add(0, out([4]))
    assert running.usage() == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_continuous_usage_stats_count_every_chunk(client):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries the usage so far, which
    grows with the tokens streamed and ends at the final usage (n=2: both choices' tokens)."""
    chunks = list(client.completions.create(
        model=MODEL, prompt="The sea is", max_tokens=12, temperature=0.8, seed=3, n=2, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    running = [c.usage for c in chunks if c.choices]
    assert running and all(u is not None for u in running)
    completion = [u.completion_tokens for u in running]
    assert completion == sorted(completion) and completion[0] >= 1 and completion[-1] == 24
    final = chunks[-1].usage
    assert not chunks[-1].choices and final.completion_tokens == 24
    assert {u.prompt_tokens for u in running} == {final.prompt_tokens} and final.prompt_tokens > 0


@pytest.mark.parametrize("kwargs, status, param", [
    ({"model": "no-such-model"}, 404, "model"),
    ({"temperature": 5}, 400, "temperature"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 1000}, 400, "n"),
])
def test_errors_use_openai_body(client, kwargs, status, param):
    args = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code == status
    error = info.value.response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_prompt_longer_than_allowed_is_400(client):
    """Over the configured max_prompt_tokens (and the context): 400 saying so."""
    with pytest.raises(openai.BadRequestError, match=f"accepts at most {MAX_PROMPT_TOKENS}") as info:
        client.completions.create(model=MODEL, prompt=[5] * 9000, max_tokens=5)
    message = info.value.response.json()["error"]["message"]
    assert message.startswith("the prompt has 9000 tokens") and "Traceback" not in message


def test_malformed_json_too_large_and_auth(serve_app):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad = httpx.post(f"{serve_app}/v1/chat/completions", content=b"{not json", headers=headers)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    big = httpx.post(f"{serve_app}/v1/completions", content=b"x" * (128 * 1024), headers=headers)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        denied = httpx.get(f"{serve_app}/v1/models", headers=auth)
        assert denied.status_code == 401 and MODEL not in denied.text
    assert httpx.get(f"{serve_app}/health").json() == {"status": "ok"}


def test_client_disconnect_frees_kv_blocks(serve_app):
    import time

    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name="semline")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{serve_app}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as resp:
        assert resp.status_code == 200
        lines = []
        for line in resp.iter_lines():
            lines.append(line)
            if len(lines) >= 7:
                break
        # The request is in the engine while its stream is open. (Seen twice in full runs: a
        # snapshot of 0 running right after the first lines; the gauges are refreshed when a
        # step lands, so look again for a moment, and say what came if it stays 0.)
        deadline = time.time() + 5
        while (stats := handle.stats.remote().result())["num_running"] != 1 and time.time() < deadline:
            time.sleep(0.1)
        assert stats["num_running"] == 1, (stats, lines)
    # The connection is closed: the request must leave the engine and free its blocks.
    _assert_engine_empties(handle)


def _assert_engine_empties(handle, timeout_s: float = 20) -> None:
    """The LLM server's engine runs nothing and holds no KV block, within `timeout_s`."""
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        stats = handle.stats.remote().result()
        if stats["num_running"] == 0 and stats["kv_cache_usage"] == 0:
            break
        time.sleep(0.2)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0, stats


def test_overload_gets_429_with_retry_after_and_the_rest_complete(serve_app):
    """4 admitted + 4 queued fit; the router refuses the excess at once."""
    import asyncio

    async def one(client):
        return await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "Tell me about rivers.", "max_tokens": 40, "ignore_eos": True,
            "temperature": 0})

    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=serve_app, headers=headers, timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(24)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 8 and codes.count(200) >= 8
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.json()["usage"]["completion_tokens"] == 40

    from ray import serve  # every ticket went back: nothing is left in flight
    import ray

    router = ray.get_actor("semline-router")
    deadline = time.time() + 10  # releases are fire-and-forget messages: allow them to land
    while ray.get(router.stats.remote())["inflight"] and time.time() < deadline:
        time.sleep(0.1)
    assert ray.get(router.stats.remote())["inflight"] == 0
    assert serve.get_deployment_handle("LLMServer", app_name="semline").stats.remote().result()[
        "num_running"] == 0


def test_a_request_past_its_time_limit_is_stopped_and_frees_its_blocks(serve_app):
    """A request that cannot finish within its time limit (here its own x-semline-timeout-ms,
    below the server's http.request_timeout_s) is answered 504 request_timeout, or, streamed,
    ends with that error event instead of [DONE]; either way it leaves the engine."""
    import time

    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name="semline")
    headers = {"Authorization": f"Bearer {API_KEY}", "x-semline-timeout-ms": "1500"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 3000, "ignore_eos": True}
    start = time.monotonic()
    reply = httpx.post(f"{serve_app}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "request_timeout", reply.text
    assert time.monotonic() - start < 10
    with httpx.stream("POST", f"{serve_app}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2 and '"request_timeout"' in events[-1], events[-3:]
    _assert_engine_empties(handle)
    bad = httpx.post(f"{serve_app}/v1/chat/completions", json=body, timeout=60,
                     headers={**headers, "x-semline-timeout-ms": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-semline-timeout-ms"


def test_streamed_completions_with_n_and_logprobs_match_unstreamed(client):
    """n = 2 sampled choices with a seed and logprobs: each streamed choice's chunks join up to
    the unstreamed choice, token for token (the logprobs' tokens) and logprob for logprob."""
    kwargs = dict(model=MODEL, prompt="List some rivers:", max_tokens=24, temperature=0.8, seed=11, n=2,
                  logprobs=1)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        tokens = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
        logprobs = [lp for c in mine if c.logprobs for lp in c.logprobs.token_logprobs]
        assert tokens == choice.logprobs.tokens and len(tokens) == 24
        assert logprobs == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
        assert mine[-1].finish_reason == choice.finish_reason == "length"


def test_echo_with_logprobs_gives_the_prompts_logprobs(client, llm, tokenizer):
    """What evaluation harnesses send (lm-eval's local-completions: token ids, echo, logprobs 1,
    max_tokens 1 or 0): every prompt token's logprob (the first null), then the output's; the
    same as the engine's own prompt logprobs, streamed or not; vLLM's prompt_logprobs too."""
    from engine import SamplingParams

    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    [ref] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, logprobs=1))
    expected = [e.logprob for e in ref.prompt_logprobs]
    text = tokenizer.decode(prompt)
    one = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = one.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(abs(a - b) < 1e-4 for a, b in zip(lp.token_logprobs[1:len(prompt)], expected[1:]))
    assert lp.tokens[:len(prompt)] == [e.token for e in ref.prompt_logprobs]
    assert all(len(top) >= 1 and max(top.values()) >= value - 1e-6
               for top, value in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert one.choices[0].text == text + tokenizer.decode(ref.token_ids)
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    zero = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0)
    assert zero.choices[0].text == text and zero.choices[0].finish_reason == "length"
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(prompt)]
    assert zero.usage.completion_tokens == 0 and zero.usage.prompt_tokens == len(prompt)
    chunks = [c.choices[0] for c in client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == one.choices[0].text
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == lp.text_offset
    vllm = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                     extra_body={"prompt_logprobs": 2}).choices[0].model_extra["prompt_logprobs"]
    assert vllm[0] is None and len(vllm) == len(prompt)
    for position, token_id, value in zip(vllm[1:], prompt[1:], expected[1:]):
        assert abs(position[str(token_id)]["logprob"] - value) < 1e-4 and len(position) in (2, 3)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 3


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),  # only with echo
    ({"stream": True, "extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs"),
])
def test_prompt_logprob_errors_name_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", **kwargs)
    assert info.value.body["param"] == param

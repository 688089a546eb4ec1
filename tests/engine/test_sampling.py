"""Sampling parameters behave as documented; invalid ones are rejected by name."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from engine import RequestError, SamplingParams


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    [alone] = llm.generate("Once upon a time", params)
    [again] = llm.generate("Once upon a time", params)
    assert alone.token_ids == again.token_ids
    others = [
        SamplingParams(temperature=0.8, max_tokens=30, seed=7, ignore_eos=True),
        SamplingParams(temperature=1.3, max_tokens=10, ignore_eos=True),  # unseeded neighbour
        params,
        SamplingParams(temperature=0.0, max_tokens=5),
    ]
    prompts = ["The weather today", "Numbers: 1, 2,", "Once upon a time", "Hello"]
    batch = llm.generate(prompts, others)
    assert batch[2].token_ids == alone.token_ids
    # A different seed gives a different continuation (24 tokens at T=1 never collide by chance).
    [other_seed] = llm.generate("Once upon a time", params.model_copy(update={"seed": 4321}))
    assert other_seed.token_ids != alone.token_ids


def test_max_tokens_and_length_finish(llm):
    [out] = llm.generate("The alphabet:", SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert out.metrics.num_generated_tokens == 7


def test_stop_string_is_removed_and_ends_generation(llm):
    prompt = "Count: 1, 2, 3, 4, 5, 6,"
    [free] = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert " 9" in free.text
    [out] = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[" 9", "never"]))
    assert out.finish_reason == "stop" and out.stop_reason == " 9"
    assert out.text == free.text[: free.text.index(" 9")]
    assert len(out.token_ids) < len(free.token_ids)


def test_stop_token_ids(llm, tokenizer):
    prompt = "Count: 1, 2, 3, 4, 5, 6,"
    [free] = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    # The first token (after the first) that did not occur before it.
    at = next(i for i in range(1, 10) if free.token_ids[i] not in free.token_ids[:i])
    stop_id = free.token_ids[at]
    [out] = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == free.token_ids[: at + 1]
    assert out.text == tokenizer.decode(free.token_ids[:at])


def test_eos_ends_generation_unless_ignored(llm):
    chat = [{"role": "user", "content": "Say hi."}]
    [out] = llm.chat(chat, SamplingParams(temperature=0, max_tokens=200))
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_token_ids
    assert "<|im_end|>" not in out.text
    [ignored] = llm.chat(chat, SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 3, ignore_eos=True))
    assert ignored.finish_reason == "length" and ignored.token_ids[: len(out.token_ids)] == out.token_ids


def test_logprobs_shape_and_values(llm):
    [out] = llm.generate("Paris is the capital of", SamplingParams(temperature=0.7, seed=3, max_tokens=6,
                                                                    logprobs=4, ignore_eos=True))
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry.token_id == token and entry.logprob <= 0
        assert len(entry.top_logprobs) == 4
        values = [lp for _, _, lp in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
        assert entry.logprob <= values[0] + 1e-6
    [none] = llm.generate("Paris", SamplingParams(max_tokens=2))
    assert none.logprobs is None


def test_top_k_one_is_greedy(llm):
    [greedy] = llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    [top1] = llm.generate("The sky is", SamplingParams(temperature=1.5, top_k=1, seed=9, max_tokens=12,
                                                        ignore_eos=True))
    assert top1.token_ids == greedy.token_ids
    # A temperature so small that logits / temperature overflow (found by fuzzing the HTTP API:
    # it used to fail the request with NaN probabilities) decodes greedily.
    [tiny] = llm.generate("The sky is", SamplingParams(temperature=1.175494351e-38, max_tokens=12,
                                                        ignore_eos=True))
    assert tiny.token_ids == greedy.token_ids
    # A top_p that float32 rounds to 0 keeps the top token (it used to keep none).
    [nucleus] = llm.generate("The sky is", SamplingParams(top_p=3.5e-260, seed=1, max_tokens=12, ignore_eos=True))
    assert nucleus.token_ids == greedy.token_ids
    # A top_k past any integer type (fuzzing again: it overflowed) keeps the whole vocabulary,
    # as top_k 0 does.
    params = dict(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    [huge] = llm.generate("The sky is", SamplingParams(top_k=2803019320307692863488, **params))
    [every] = llm.generate("The sky is", SamplingParams(top_k=0, **params))
    assert huge.finish_reason == "length" and huge.token_ids == every.token_ids


def test_penalties_change_repetitive_output(llm):
    prompt = "Repeat after me: apple apple apple apple apple"
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    [plain] = llm.generate(prompt, base)
    [penalised] = llm.generate(prompt, base.model_copy(update={"frequency_penalty": 2.0,
                                                               "repetition_penalty": 1.5}))
    assert plain.token_ids != penalised.token_ids
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


def test_multibyte_text_is_never_split(llm, tokenizer):
    """Streaming deltas concatenate to the full decode and never end in half a character."""
    engine = llm.engine
    engine.add_request("日本の首都は東京です。大阪は", SamplingParams(temperature=0, max_tokens=40,
                                                               ignore_eos=True), request_id="jp")
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.delta_text)
            final = out
    assert "".join(deltas) == final.text == tokenizer.decode(final.token_ids)
    # Only the last output may hold a partial character (max_tokens can cut one in half).
    assert not any("\ufffd" in d for d in deltas[:-1])
    assert any(ord(ch) > 0x3000 for ch in final.text)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("logprobs", 50),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("no_such_field", 1),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)


def test_prompt_too_long_or_empty_is_rejected(llm):
    engine = llm.engine
    with pytest.raises(RequestError, match="context"):
        engine.add_request([1] * engine.max_model_len, SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([10**9], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_output_stops_at_context_limit_and_prompts_at_their_limit(make_llm):
    short = make_llm(max_model_len=32, max_prompt_tokens=20)
    [out] = short.generate([5] * 20, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    with pytest.raises(RequestError, match="at most 20"):
        short.engine.add_request([5] * 21, SamplingParams())


def test_a_row_with_nothing_to_sample_takes_its_top_token_instead_of_failing_the_batch():
    """A request whose distribution is unusable (here NaN logits outside its top token) must not
    raise: a failed step fails every request in the batch."""
    import torch

    from engine.request import Request
    from engine.sampler import Sampler

    sampler = Sampler(seed=0, device=torch.device("cpu"))
    requests = [Request(rid, None, [1, 2, 3], SamplingParams(temperature=1.0, seed=5)) for rid in "ab"]
    logits = torch.randn(2, 10)
    logits[0] = float("nan")
    logits[0, 7] = 5.0
    out = sampler(logits, requests)
    assert out.token_ids[0] == 7
    assert 0 <= out.token_ids[1] < 10


def test_batched_sampling_draws_from_the_distribution():
    """The sampler draws every random row at once (the exponential race, no per-row sync):
    over many rows its frequencies match the softmax, with top-k applied, seeded rows among
    them (each from its own generator) as well as unseeded ones."""
    import torch

    from engine.request import Request
    from engine.sampler import Sampler

    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 12000
    requests = [Request(str(i), None, [1], SamplingParams(temperature=1.0, top_k=4, seed=i if i % 2 else None))
                for i in range(rows)]
    for request in requests:
        if request.sampling_params.seed is not None:
            request.generator = sampler.make_generator(request.sampling_params.seed)
    tokens = torch.tensor(sampler(logits.repeat(rows, 1), requests).token_ids)
    expected = torch.softmax(logits[:4], dim=0)
    observed = torch.bincount(tokens, minlength=6).float() / rows
    assert observed[4:].sum() == 0  # cut by top_k
    assert torch.allclose(observed[:4], expected, atol=0.015), (observed, expected)


def test_text_worked_out_after_the_next_launch_changes_nothing_but_when(llm, make_llm):
    """async_detokenize (on by default on CUDA): the next step is launched before a step's
    tokens become text. Outputs are the same as detokenizing first, stop strings included
    (the request that hits one had a step more in flight, whose token is dropped), streamed
    deltas add up to the text, and every KV block comes back."""
    params = [
        SamplingParams(temperature=0, max_tokens=20, stop=[" 9"]),  # ends on a stop string
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),  # ends on its length
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, stop=["zzz"]),
        SamplingParams(temperature=0.9, max_tokens=16, seed=11, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=200),  # ends on EOS
    ]
    prompts = ["Count: 1, 2, 3, 4, 5, 6,", "The alphabet:", "Once upon a time", "Numbers: 1, 2,",
               "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"]
    expected = llm.generate(prompts, params)
    assert [o.finish_reason for o in expected] == ["stop", "length", "length", "length", "stop"]
    deferred = make_llm(async_detokenize=True)
    engine = deferred.engine
    assert engine._defer_text
    ids = [engine.add_request(p, sp).request_id for p, sp in zip(prompts, params)]
    deltas, final = {i: "" for i in ids}, {}
    launched_early = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas[out.request_id] += out.delta_text
            if out.finished:
                final[out.request_id] = out
        launched_early += len(engine._inflight)  # a batch already on its way after landing one
    assert launched_early > 0
    for request_id, want in zip(ids, expected):
        got = final[request_id]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
            (want.text, want.token_ids, want.finish_reason, want.stop_reason)
        assert [lp.token_id for lp in got.logprobs or []] == [lp.token_id for lp in want.logprobs or []]
        assert deltas[request_id] == got.text
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_a_thinking_budget_forces_the_closing_tokens(llm, tokenizer):
    """thinking_budget: after that many tokens of thinking the closing tokens are forced (one a
    step), then the model goes on freely; an opening sequence the output begins with starts the
    count, and an output that does not begin with it is left alone."""
    end = tokenizer.encode("</think>", add_special_tokens=False)
    prompt = tokenizer.encode("Count: one, two, three,", add_special_tokens=False)
    base = dict(temperature=0, max_tokens=20, ignore_eos=True)
    [free] = llm.generate([prompt], SamplingParams(**base), use_tqdm=False)
    [cut] = llm.generate([prompt], SamplingParams(**base, thinking_budget=5, thinking_end=end), use_tqdm=False)
    assert cut.token_ids[:5] == free.token_ids[:5] and cut.token_ids[5:5 + len(end)] == end
    assert len(cut.token_ids) == 20 and cut.text.count("</think>") == 1
    [none] = llm.generate([prompt], SamplingParams(**base, thinking_budget=0, thinking_end=end), use_tqdm=False)
    assert none.token_ids[:len(end)] == end
    opening = free.token_ids[:2]  # the output opens its "thinking" with the free run's first two tokens
    [opened] = llm.generate([prompt], SamplingParams(**base, thinking_budget=3, thinking_start=opening,
                                                     thinking_end=end), use_tqdm=False)
    assert opened.token_ids[:5] == free.token_ids[:5] and opened.token_ids[5:5 + len(end)] == end
    never = [t for t in range(200, 400) if t != free.token_ids[0]][:1]  # an opening it does not begin with
    [answered] = llm.generate([prompt], SamplingParams(**base, thinking_budget=1, thinking_start=never,
                                                       thinking_end=end), use_tqdm=False)
    assert answered.token_ids == free.token_ids

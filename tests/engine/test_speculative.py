"""Speculative decoding (prompt lookup, self-speculative, draft model): same greedy tokens, same
sampling distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import SamplingParams
from engine.config import ConfigError
from engine.llm import apply_chat_template
from engine.speculative import accept_greedy, accept_sampled, propose_prompt_lookup

TEXT = (Path(__file__).parents[1] / "data" / "public_domain.txt").read_text()


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose_prompt_lookup(tokens, 3, n_max=3, n_min=1) == [7, 8, 5]  # latest [1, 2, 3]
    assert propose_prompt_lookup(tokens, 1, n_max=3, n_min=1) == [7]
    assert propose_prompt_lookup([4, 5, 6, 4], 2, n_max=3, n_min=1) == [5, 6]  # falls back to n = 1
    assert propose_prompt_lookup([4, 5, 6, 7], 2, n_max=3, n_min=1) == []  # nothing repeats
    assert propose_prompt_lookup([4, 5, 4, 5], 4, n_max=2, n_min=2) == [4, 5]  # stops at the end


def test_greedy_acceptance_stops_at_the_first_disagreement():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([5, 6, 0, 2]):
        logits[row, best] = 1.0
    assert accept_greedy(logits, [5, 6, 7]) == [5, 6, 0]  # third proposal replaced by the argmax
    assert accept_greedy(logits, [5, 6, 0]) == [5, 6, 0, 2]  # all accepted + one more
    assert accept_greedy(logits, [1, 6, 0]) == [5]


def test_rejection_sampling_keeps_the_target_distribution():
    """Small vocabulary: whatever the (deterministic) proposals, the first output token is
    distributed as p0, and the second, given the first was the proposal, as p1."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.50, 0.20, 0.15, 0.10, 0.05],
                          [0.05, 0.60, 0.05, 0.25, 0.05],
                          [0.20, 0.20, 0.20, 0.20, 0.20]])
    trials = 12000
    for draft in ([3, 1], [0, 4]):
        first = torch.zeros(5)
        second = torch.zeros(5)
        for _ in range(trials):
            out = accept_sampled(probs, draft, gen)
            first[out[0]] += 1
            if out[0] == draft[0]:
                second[out[1]] += 1
        # ~4 standard errors at these counts: a wrong rule (e.g. always accepting) is far off.
        assert (first / trials - probs[0]).abs().max() < 0.02, (draft, first / trials)
        assert (second / second.sum() - probs[1]).abs().max() < 0.03, (draft, second / second.sum())


def test_greedy_output_identical_with_and_without_speculation(llm, make_llm, tokenizer):
    """A mixed batch: an input-grounded prompt (long enough to be chunked), a chat prompt,
    code, and requests that decode without proposals (penalties, logprobs)."""
    spec = make_llm(speculative_method="prompt_lookup", num_speculative_tokens=4, max_num_batched_tokens=128)
    grounded = apply_chat_template(tokenizer, [{"role": "user", "content": "Repeat this text exactly:\n\n"
                                                + TEXT[:900]}])
    chat = apply_chat_template(tokenizer, [{"role": "user", "content": "What is a KV cache?"}])
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):"
    greedy = SamplingParams(max_tokens=40, temperature=0)
    prompts = [grounded, chat, code, chat, code]
    params = [greedy, greedy, greedy, SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3),
              SamplingParams(max_tokens=20, temperature=0, logprobs=2)]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == expected
    assert got[4].logprobs is not None and len(got[4].logprobs) == len(got[4].token_ids)
    stats = spec.engine.stats
    assert stats.spec_num_verify_steps > 0 and stats.spec_num_accepted_tokens > 0
    assert stats.spec_tokens_per_verify_step > 1.5  # the grounded prompt repeats its input
    assert spec.engine.block_manager.num_used_blocks == 0  # every block handed back


def test_seeded_sampling_with_speculation_is_reproducible(make_llm, tokenizer):
    spec = make_llm(speculative_method="prompt_lookup")
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Repeat: " + TEXT[:300]}])
    seeded = SamplingParams(max_tokens=24, temperature=0.7, seed=11)
    alone = spec.generate([prompt], seeded)[0].token_ids
    other = SamplingParams(max_tokens=24, temperature=1.0)
    together = spec.generate([prompt, "Once upon a time"], [seeded, other])[0].token_ids
    assert alone == together


def test_model_drafts_keep_the_greedy_output(llm, make_llm, tokenizer):
    """The two model-based proposers in a mixed batch with chunked prefill: the self-speculative
    draft (first 8 of the model's 30 layers + its head, sharing its KV cache) and a draft model
    with its own KV cache (here the embedded model itself, so nearly all proposals are right),
    the latter in a cache small enough to preempt, which resets the draft's KV."""
    chat = apply_chat_template(tokenizer, [{"role": "user", "content": "What is a KV cache?"}])
    grounded = apply_chat_template(tokenizer, [{"role": "user", "content": "Repeat: " + TEXT[:500]}])
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):"
    greedy = SamplingParams(max_tokens=32, temperature=0)
    prompts = [grounded, chat, code, chat]
    params = [greedy, greedy, greedy, SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3)]
    expected = [o.token_ids for o in llm.generate(prompts, params)]

    self_spec = make_llm(speculative_method="self_speculative", speculative_draft_layers=8,
                         max_num_batched_tokens=96)
    assert [o.token_ids for o in self_spec.generate(prompts, params)] == expected
    stats = self_spec.engine.stats
    assert stats.spec_num_verify_steps > 0 and 0 < stats.spec_num_draft_tokens
    assert self_spec.engine.block_manager.num_used_blocks == 0

    draft = make_llm(speculative_method="draft_model", num_kv_blocks=14, max_num_batched_tokens=96)
    assert [o.token_ids for o in draft.generate(prompts, params)] == expected
    stats = draft.engine.stats
    assert stats.num_preemptions > 0  # the draft's KV was rebuilt after new block ids
    assert stats.spec_acceptance_rate > 0.9, stats.spec_acceptance_rate  # same model drafting
    assert draft.engine.block_manager.num_used_blocks == 0


def test_draft_settings_are_checked(make_llm):
    with pytest.raises(ConfigError, match="speculative_draft_layers"):
        make_llm(speculative_method="self_speculative", speculative_draft_layers=30)
    with pytest.raises(ConfigError, match="speculative_method"):
        make_llm(speculative_method="medusa")

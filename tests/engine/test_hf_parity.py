"""Greedy output of the engine (float32) is token-identical to Hugging Face `generate`.

A divergence is accepted only at a genuine near-tie: the two candidate tokens
within 1e-4 in log-probability under both implementations (as vLLM's own HF
comparison allows). Anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from engine import SamplingParams
from engine.llm import apply_chat_template

NUM_NEW_TOKENS = 48
NEAR_TIE = 1e-4
DATA = Path(__file__).parent.parent / "data"


def _prompts(tokenizer) -> dict[str, list[int]]:
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    chat = [{"role": "user", "content": "Give me three tips for writing clear documentation."}]
    return {
        "short": encode("The capital of France is"),
        "long": encode((DATA / "long_prompt.txt").read_text()),
        "chat": apply_chat_template(tokenizer, chat),
        "french": encode("La tour Eiffel a été construite pour l'Exposition universelle de"),
        "chinese": encode("中国的首都是北京。北京是一座历史悠久的城市，"),
        "code": encode("def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"),
    }


@pytest.fixture(scope="module")
def prompts(tokenizer):
    prompts = _prompts(tokenizer)
    assert len(prompts["long"]) > 512
    return prompts


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts):
    """HF generate's greedy tokens for each prompt, EOS disabled so all run 48 tokens."""
    hf_model.generation_config.eos_token_id = None
    config = GenerationConfig(max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0)
    results = {}
    with torch.inference_mode():
        for name, ids in prompts.items():
            out = hf_model.generate(torch.tensor([ids], device=hf_model.device), generation_config=config)
            results[name] = out[0, len(ids):].tolist()
    return results


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=5)


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids], device=hf_model.device)).logits[0, -1].float().cpu()
    return torch.log_softmax(logits, dim=-1)


def assert_same_or_near_tie(hf_model, prompt: list[int], ours, expected: list[int], name: str) -> None:
    got = ours.token_ids
    assert len(got) == len(expected), name
    diverge = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if diverge is None:
        return
    a, b = got[diverge], expected[diverge]
    ours_top = {tid: lp for tid, _, lp in ours.logprobs[diverge].top_logprobs}
    hf_lp = _hf_logprobs(hf_model, prompt + expected[:diverge])
    hf_gap = abs(float(hf_lp[a] - hf_lp[b]))
    our_gap = abs(ours_top[a] - ours_top[b]) if a in ours_top and b in ours_top else float("inf")
    assert hf_gap < NEAR_TIE and our_gap < NEAR_TIE, (
        f"{name}: diverged from HF at token {diverge} (ours {a}, HF {b}); "
        f"logprob gap HF {hf_gap:.2e}, ours {our_gap:.2e}: not a near-tie"
    )


def test_each_prompt_alone_matches_hf(llm, hf_model, prompts, hf_greedy):
    for name, ids in prompts.items():
        [out] = llm.generate([ids], _params())
        assert_same_or_near_tie(hf_model, ids, out, hf_greedy[name], name)


def test_all_prompts_in_one_batch_match_hf(llm, hf_model, prompts, hf_greedy):
    names = list(prompts)
    outs = llm.generate([prompts[n] for n in names], _params())
    for name, out in zip(names, outs):
        assert_same_or_near_tie(hf_model, prompts[name], out, hf_greedy[name], name)


def test_logprobs_match_hf(llm, hf_model, prompts):
    """The reported logprobs are the model's: they agree with HF's to float32 noise."""
    ids = prompts["short"]
    [out] = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True))
    context = list(ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        hf_lp = _hf_logprobs(hf_model, context)
        assert entry.token_id == token
        assert abs(entry.logprob - float(hf_lp[token])) < 1e-3
        assert [t for t, _, _ in entry.top_logprobs] == hf_lp.topk(3).indices.tolist()
        context.append(token)


def _hf_prompt_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V]: HF's log-distribution over each prompt token after the first."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids], device=hf_model.device)).logits[0, :-1].float().cpu()
    return torch.log_softmax(logits, dim=-1)


def test_prompt_logprobs_match_hf_across_chunks_and_after_a_cache_hit(llm, hf_model, prompts):
    """Every prompt token's logprob (the first has none) and top alternatives agree with HF's
    forward over the whole prompt: a long prompt computed in several chunks, batched with a
    plain request, and again once its blocks sit in the prefix cache (which it must not use,
    and must leave intact for the plain requests after it)."""
    long, short = prompts["long"], prompts["short"]
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    asking = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=3, logprobs=1)
    [before] = llm.generate([long], plain)  # the long prompt's blocks are now cached
    outs = llm.generate([long, short, long], [asking, plain, asking])
    [after] = llm.generate([long], plain)
    assert after.metrics.num_cached_tokens > 0 and after.token_ids == before.token_ids
    assert outs[1].prompt_logprobs is None
    expected = _hf_prompt_logprobs(hf_model, long)
    for out in (outs[0], outs[2]):
        assert out.metrics.num_cached_tokens == 0
        got = out.prompt_logprobs
        assert len(got) == len(long) and got[0].logprob is None and got[0].token_id == long[0]
        values = torch.tensor([entry.logprob for entry in got[1:]])
        want = expected.gather(1, torch.tensor(long[1:])[:, None]).squeeze(1)
        assert (values - want).abs().max() < 1e-4
        top = expected.topk(3, dim=-1)
        for i, entry in enumerate(got[1:]):
            assert entry.token_id == long[i + 1]
            # Its rank: one more than the tokens HF puts above it, give or take those within
            # float32 noise of it (a rank among ~49k logits moves with the last bit of each).
            mine = expected[i, long[i + 1]]
            assert int((expected[i] > mine + 1e-5).sum()) + 1 <= entry.rank <= int((expected[i] > mine - 1e-5).sum()) + 1
            ours = [t for t, _, _ in entry.top_logprobs]
            # Order may differ only where HF's alternatives tie within float32 noise.
            if ours != top.indices[i].tolist():
                assert torch.allclose(expected[i, ours], top.values[i], atol=1e-4), i
        # The sampled tokens are those of a request without prompt logprobs.
        assert out.token_ids == before.token_ids[:2]

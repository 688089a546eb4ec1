"""Continuous batching, chunked prefill and preemption never change greedy output."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import SamplingParams

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def mixed_prompts(tokenizer):
    """Prompts of very different lengths, 3 to ~740 tokens, no two sharing a prefix (a request
    would wait for another's prompt blocks, and the tests here want them computed side by side)."""
    long_ids = tokenizer.encode((DATA / "long_prompt.txt").read_text(), add_special_tokens=False)
    texts = ["Hi", "Write a haiku about the sea.", "List the planets of the solar system in order:"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts] + [
        long_ids[500:600], long_ids[200:500], long_ids,
    ]


def _greedy(max_tokens=24):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(llm, mixed_prompts):
    """Each prompt run on its own: the reference."""
    return [llm.generate([p], _greedy())[0].token_ids for p in mixed_prompts]


@pytest.mark.parametrize("chunked", [True, False])
def test_mixed_batch_matches_each_alone(make_llm, mixed_prompts, alone, chunked):
    engine_llm = make_llm(enable_chunked_prefill=chunked, max_num_batched_tokens=128)
    outs = engine_llm.generate(mixed_prompts, _greedy())
    assert [o.token_ids for o in outs] == alone
    assert engine_llm.engine.block_manager.num_free_blocks == engine_llm.engine.block_manager.num_blocks


def test_chunked_prefill_shares_steps_with_decodes(make_llm, mixed_prompts):
    """A long prompt is split into chunks and decodes of others run in the same steps."""
    engine_llm = make_llm(max_num_batched_tokens=64)
    engine = engine_llm.engine
    engine.add_request(mixed_prompts[0], _greedy(40), request_id="short")
    engine.step()  # the short prompt's prefill
    engine.add_request(mixed_prompts[-1], _greedy(4), request_id="long")
    steps = []
    schedule = engine.scheduler.schedule

    def recording_schedule(*args, **kwargs):
        scheduled = schedule(*args, **kwargs)
        steps.append({c.request.request_id: c.num_new_tokens for c in scheduled.chunks})
        return scheduled

    engine.scheduler.schedule = recording_schedule
    while engine.has_unfinished_requests():
        engine.step()
    assert all(sum(sizes.values()) <= 64 for sizes in steps)
    mixed_steps = sum(1 for sizes in steps if sizes.get("short") == 1 and sizes.get("long", 0) > 1)
    # ~740 prompt tokens in chunks of <= 63 beside the decode: many shared steps.
    assert mixed_steps >= 10


def test_preemption_under_small_cache_gives_same_tokens(make_llm, mixed_prompts, alone):
    # 64 blocks x 16 = 1024 tokens: the long prompt alone needs ~48 blocks.
    small = make_llm(num_kv_blocks=64, max_num_batched_tokens=256)
    outs = small.generate(mixed_prompts, _greedy())
    assert [o.token_ids for o in outs] == alone
    engine = small.engine
    assert engine.stats.num_preemptions > 0, "the cache was meant to be too small"
    assert sum(o.metrics.num_preemptions for o in outs) == engine.stats.num_preemptions
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preempted_prompts_report_each_prompt_logprob_once(llm, make_llm, mixed_prompts):
    """A request preempted while (or after) computing its prompt computes it again: the prompt
    logprobs it already has are not reported twice, and they are those of an unpreempted run."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    small = make_llm(num_kv_blocks=64, max_num_batched_tokens=256)
    outs = small.generate(mixed_prompts, params)
    assert small.engine.stats.num_preemptions > 0, "the cache was meant to be too small"
    for out, ref in zip(outs, llm.generate(mixed_prompts, params)):
        assert [e.token_id for e in out.prompt_logprobs] == list(out.prompt_token_ids)
        assert [e.token_id for e in ref.prompt_logprobs] == list(ref.prompt_token_ids)
        for a, b in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert abs(a.logprob - b.logprob) < 1e-4


def test_lower_priority_is_preempted_first(make_llm, tokenizer):
    small = make_llm(num_kv_blocks=12, max_num_batched_tokens=256)
    engine = small.engine
    prompt = tokenizer.encode("Count slowly from one to one hundred: one, two,", add_special_tokens=False)
    # Each needs ~8 of the 12 blocks: both cannot run to the end together.
    engine.add_request(prompt, _greedy(110), request_id="batch", priority=1)
    engine.add_request(prompt, _greedy(110), request_id="realtime", priority=0)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["realtime"].metrics.num_preemptions == 0
    assert finished["batch"].metrics.num_preemptions > 0
    assert finished["realtime"].token_ids == finished["batch"].token_ids


def test_higher_priority_request_runs_first(make_llm, tokenizer):
    engine_llm = make_llm(max_num_seqs=1)
    engine = engine_llm.engine
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    engine.add_request(prompt, _greedy(3), request_id="late-batch", priority=5)
    engine.add_request(prompt, _greedy(3), request_id="realtime", priority=0)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["realtime", "late-batch"]


def test_abort_frees_blocks_at_once(make_llm, tokenizer):
    engine = make_llm().engine
    prompt = tokenizer.encode("Tell me a very long story about dragons.", add_special_tokens=False)
    engine.add_request(prompt, _greedy(200), request_id="a")
    engine.add_request(prompt, _greedy(200), request_id="b")
    for _ in range(5):
        engine.step()
    used = engine.block_manager.num_used_blocks
    assert used > 0
    out = engine.abort_request("a")
    assert out.finished and out.finish_reason == "abort" and len(out.token_ids) == 5  # prefill step samples too
    assert engine.block_manager.num_used_blocks < used
    engine.abort_request("b")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()
    assert engine.abort_request("unknown") is None


def test_pytorch_fallback_paths_give_same_tokens(make_llm, mixed_prompts, alone):
    """Gather+SDPA attention and PyTorch's GEMM (the paths used where the kernel or
    oneDNN are unavailable, e.g. CUDA) agree with the default CPU path."""
    fallback = make_llm(attention_backend="torch", onednn_linear=False, max_num_batched_tokens=128)
    assert fallback.engine.runner.decode_kernel is None
    outs = fallback.generate(mixed_prompts, _greedy())
    assert [o.token_ids for o in outs] == alone

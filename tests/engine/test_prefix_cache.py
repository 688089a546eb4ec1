"""Prefix caching: shared prompt prefixes are prefilled once, and greedy output never changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import SamplingParams
from engine.block_manager import BlockManager
from engine.request import Request

DATA = Path(__file__).parent.parent / "data"


def _greedy(max_tokens=16):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def prefixes(tokenizer):
    text = tokenizer.encode((DATA / "long_prompt.txt").read_text(), add_special_tokens=False)
    return text[:300], text[300:600]  # two different ~300-token "system prompts"


@pytest.fixture(scope="module")
def questions(tokenizer):
    texts = ["What is this about?", "Summarise it in one line.", "Who would like it?", "Name one detail."]
    return [tokenizer.encode(" " + t, add_special_tokens=False) for t in texts]


@pytest.fixture(scope="module")
def prompts(prefixes, questions):
    """Each question after each prefix, the prefixes alternating."""
    return [prefix + q for q in questions for prefix in prefixes]


@pytest.fixture(scope="module")
def reference(make_llm, prompts):
    """Greedy tokens with prefix caching off."""
    return [o.token_ids for o in make_llm(enable_prefix_caching=False).generate(prompts, _greedy())]


def test_block_manager_matches_registers_and_evicts_lru():
    manager = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    first = Request("a", None, list(range(1, 11)), SamplingParams())  # 10 tokens: 2 full blocks
    assert manager.match_prefix(first) == 0
    manager.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    manager.register_full_blocks(first)
    full_blocks = first.block_table[:2]
    manager.free(first)
    assert manager.num_free_blocks == 6 and len(manager.evictable) == 2  # cached, reusable
    second = Request("b", None, list(range(1, 9)) + [99, 98, 97], SamplingParams())
    assert manager.match_prefix(second) == 8 and second.block_table == full_blocks
    manager.free(second)
    exact = Request("c", None, list(range(1, 9)), SamplingParams())  # all 8 tokens cached:
    assert manager.match_prefix(exact) == 4  # the last block is left to compute
    manager.free(exact)
    hog = Request("d", None, [7] * 24, SamplingParams())
    assert manager.allocate_slots(hog, 24)  # takes the 4 free blocks, then evicts the 2 cached
    assert manager.num_evictions == 2 and not manager.cached_blocks


def test_shared_prefixes_give_the_same_tokens_and_are_reused(make_llm, prompts, reference):
    cached = make_llm(enable_prefix_caching=True)
    outputs = [cached.generate([p], _greedy())[0] for p in prompts]  # one after another
    assert [o.token_ids for o in outputs] == reference
    stats = cached.engine.stats
    # Every prompt after the first of each prefix finds ~18 of its ~19 full blocks cached.
    assert stats.prefix_cache_hits >= (len(prompts) - 2) * 288
    assert 0.6 < stats.prefix_cache_hit_rate < 1
    assert cached.engine.block_manager.num_used_blocks == 0


def test_eviction_mid_workload_keeps_tokens_identical(make_llm, prompts, reference):
    # 40 blocks x 16 tokens: one prefix's request (~20 blocks + output) fits beside the
    # other's cached blocks only partly, so alternating prefixes evict each other.
    small = make_llm(enable_prefix_caching=True, num_kv_blocks=40, max_num_batched_tokens=256)
    outputs = [small.generate([p], _greedy())[0] for p in prompts]
    assert [o.token_ids for o in outputs] == reference
    assert small.engine.block_manager.num_evictions > 0
    assert small.engine.stats.prefix_cache_hits > 0


def test_batched_requests_sharing_a_prefix(make_llm, prompts, reference):
    """Requests submitted together: the later ones reuse what the first one registered."""
    first_prefix = prompts[0::2]  # the questions after the first prefix
    cached = make_llm(enable_prefix_caching=True, max_num_seqs=1)  # strictly one after another
    assert [o.token_ids for o in cached.generate(first_prefix, _greedy())] == reference[0::2]
    assert cached.engine.stats.prefix_cache_hits >= 3 * 288


def test_concurrent_requests_wait_for_a_shared_prefix_being_computed(make_llm, prompts, reference):
    """Eight requests over two ~300-token prefixes arrive at once, prefilled 128 tokens a step:
    one request per prefix computes it, the others wait for its blocks instead of computing
    the same K/V beside it, then find them cached."""
    llm = make_llm(enable_prefix_caching=True, max_num_batched_tokens=128)
    assert [o.token_ids for o in llm.generate(prompts, _greedy())] == reference
    assert llm.engine.scheduler.num_prefix_waits > 0
    assert llm.engine.stats.prefix_cache_hits >= (len(prompts) - 2) * 288
    assert not llm.engine.block_manager.in_progress  # nothing left claimed

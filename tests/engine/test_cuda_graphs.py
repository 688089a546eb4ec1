"""Decode steps through DecodeGraphs' static buffers (engine/cuda_graphs.py).

On a GPU (SEMLINE_TEST_DEVICE=cuda) the steps replay captured CUDA graphs; on a CPU the
same static-buffer path runs eagerly with the Triton kernel under its interpreter: the
padding rows, the scratch block and the staging are checked here either way, against
the eager engine and Hugging Face.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.cuda_graphs import graph_sizes
from tests.conftest import DEVICE
from tests.engine.test_families import build_tiny_model

NUM_NEW_TOKENS = 10


def test_graph_sizes_cover_every_batch_with_little_padding():
    assert graph_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert graph_sizes(40) == [1, 2, 4, 8, 16, 32, 48]
    assert graph_sizes(5) == [1, 2, 4, 8]
    assert graph_sizes(1) == [1]
    for max_batch in (1, 3, 8, 17, 100):
        sizes = graph_sizes(max_batch)
        assert sizes == sorted(sizes) and sizes[-1] >= max_batch
        assert all(next(s for s in sizes if s >= n) - n < 16 for n in range(1, max_batch + 1))


@pytest.fixture(scope="module")
def tiny_llama(llm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", folder, llm.engine.model_dir)
    return folder


def _engine(folder, **overrides) -> LLM:
    return LLM(model=str(folder), device=DEVICE, dtype="float32", num_kv_blocks=64, attention_backend="triton",
               **overrides)


def test_decode_steps_through_static_buffers_match_eager(tiny_llama, tokenizer):
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in
               ("The capital of France is", "def add(a, b):", "Once upon a time", "Hi", "A paged KV cache")]
    params = [SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS - i, ignore_eos=True)
              for i in range(len(prompts))]
    eager = _engine(tiny_llama, enforce_eager=True)
    assert eager.engine.runner.decode_graphs is None
    expected = [o.token_ids for o in eager.generate(prompts, params)]

    graphs = _engine(tiny_llama)
    runner = graphs.engine.runner
    assert runner.decode_graphs is not None
    # Five sequences finishing one after another: decode batches of 5, 4, 3, 2, 1 padded to
    # 8, 4, 4, 2, 1 (padding rows write to the scratch block, past the block manager's).
    assert [o.token_ids for o in graphs.generate(prompts, params)] == expected
    assert runner.decode_graphs.num_staged >= NUM_NEW_TOKENS - len(prompts)
    assert {8, 4, 2, 1} <= runner.decode_graphs.padded_sizes_used
    assert runner.kv_caches[0][0].shape[0] == runner.num_blocks + 1
    # The scratch block never reaches the block manager; every block is free again.
    assert graphs.engine.block_manager.num_free_blocks == runner.num_blocks

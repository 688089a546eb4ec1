"""Int8 weights: a quarter of the memory, perplexity within 3 % of float32, fluent output."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from engine import SamplingParams
from engine.config import ConfigError, EngineConfig
from engine.quantization import CpuInt8Linear, quantize_model, weight_bytes

TEXT = Path(__file__).parents[1] / "data" / "public_domain.txt"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The three primary colors are",
           "A haiku about the sea:", "def fibonacci(n):", "The largest planet in the solar system is"]


def _perplexity(model, ids: torch.Tensor, window: int = 1024) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window + 1]
            logits = model(chunk[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def test_int8_perplexity_within_3_percent_of_float32(hf_model, tokenizer):
    """The same int8 modules the engine uses, swapped into the HF reference model; forced onto
    the decode path (bf16 activations, PyTorch's int8 kernel), the less precise of the two."""
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    assert ids.shape[1] > 2000  # "a few thousand tokens"
    fp32 = _perplexity(hf_model, ids)
    model = copy.deepcopy(hf_model)
    assert quantize_model(model, torch.device("cpu"), torch.float32) > 200
    for module in model.modules():
        if isinstance(module, CpuInt8Linear):
            module.max_packed_rows = 1 << 30
    int8 = _perplexity(model, ids)
    assert fp32 < 30  # the model reads this text well in float32
    assert abs(int8 - fp32) / fp32 < 0.03, (fp32, int8)


def test_int8_engine_weighs_a_quarter_and_stays_fluent(llm, make_llm):
    int8 = make_llm(quantization="int8")
    params = llm.engine.runner.args.num_parameters  # the matmuls' weights (tied head = embedding)
    fp32_bytes = params * 4
    assert weight_bytes(int8.engine.runner.model) < 0.28 * fp32_bytes
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
    got = [o.token_ids for o in int8.generate(PROMPTS, greedy)]
    # Greedy outputs may drift apart, but they start the same way on most prompts.
    same_start = sum(r[:4] == g[:4] for r, g in zip(ref, got))
    assert same_start >= len(PROMPTS) // 2, (ref, got)


def test_unknown_quantization_is_refused():
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="int4")

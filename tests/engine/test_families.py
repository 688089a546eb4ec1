"""Every supported model family, token-identical to Hugging Face `generate` (greedy, float32).

Each family is a tiny random-weight model built here from a transformers config (a few
layers, a small hidden size), saved as a local folder with a real tokenizer (the
embedded SmolLM2's) beside it: nothing is downloaded. Prompts include one longer than
any sliding window, prefilled in chunks, and the batch mixes lengths.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from transformers import GenerationConfig

from engine import LLM, SamplingParams
from engine.loader import load_hf_config
from engine.models import model_args
from tests.conftest import DEVICE
from tests.engine.test_hf_parity import assert_same_or_near_tie

NUM_NEW_TOKENS = 12
WINDOW = 12  # sliding window of the windowed families: shorter than most prompts

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic": ("LlamaConfig", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama3": ("LlamaConfig", {"rope_theta": 500000.0, "tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "llama-yarn": ("LlamaConfig", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                "pad_token_id": 0}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW,
                                    "sliding_window_pattern": 2, "pad_token_id": 0,
                                    "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                     "head_dim": 16, "decoder_sparse_step": 1, "mlp_only_layers": [1],
                                     "norm_topk_prob": True}),
}

# Families whose decode steps run as one compiled stack of layers on the CPU
# (engine/kernels/decode_stack.py): pre-norm, SiLU-gated, fully rotary, dense.
STACKED_FAMILIES = ("llama", "llama-linear", "llama-dynamic", "llama3", "llama-yarn", "mistral", "qwen2", "phi3")

# Families run through the Triton attention kernel as well (slow under the interpreter):
# grouped-query heads, and windowed layers alternating with global ones, soft-capped.
TRITON_FAMILIES = ("llama", "gemma2")


def build_tiny_model(name: str, folder, tokenizer_dir) -> None:
    """A random-weight model of family `name` saved as a HF folder with SmolLM2's tokenizer."""
    config_class, overrides = FAMILIES[name]
    config = getattr(transformers, config_class)(**{**_COMMON, "vocab_size": 49152, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return [
        encode("The capital of France is"),
        encode("def add(a, b):\n    return"),
        # Longer than any window, prefilled in several chunks (max_num_batched_tokens below).
        encode("A paged KV cache stores the keys and values of every token in fixed-size blocks, so "
               "that sequences of many lengths share one pool of memory without fragmentation, and "
               "a block table maps each sequence's positions to the blocks that hold them."),
        encode("Hi"),
    ]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, llm, tmp_path_factory, prompts):
    """(name, folder, HF model, HF greedy tokens per prompt)."""
    folder = tmp_path_factory.mktemp(request.param)
    build_tiny_model(request.param, folder, llm.engine.model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              generation_config=config)
            expected.append(out[0, len(ids):].tolist())
    return request.param, folder, hf, expected


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=3)


def _engine(folder, **overrides) -> LLM:
    # The engine on the test device (SEMLINE_TEST_DEVICE=cuda: the CUDA path), HF's reference on the CPU.
    config = dict(model=str(folder), device=DEVICE, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=24)
    return LLM(**{**config, **overrides})


def test_family_matches_hf_alone_and_batched(family, prompts):
    name, folder, hf, expected = family
    llm = _engine(folder)
    if DEVICE == "cpu" and llm.engine.runner.decode_kernel is not None:
        assert (llm.engine.runner.decode_stack is not None) == (name in STACKED_FAMILIES)
    for ids, want in zip(prompts, expected):
        [out] = llm.generate([ids], _params())
        assert_same_or_near_tie(hf, ids, out, want, f"{name} alone")
    # Mixed lengths in one batch; the prompts' prefixes are now in the prefix cache too.
    for ids, want, out in zip(prompts, expected, llm.generate(prompts, _params())):
        assert_same_or_near_tie(hf, ids, out, want, f"{name} batched")
    # The gathered PyTorch attention path (GPUs, no compiler) as well as the CPU kernel.
    torch_path = _engine(folder, attention_backend="torch")
    for ids, want, out in zip(prompts, expected, torch_path.generate(prompts, _params())):
        assert_same_or_near_tie(hf, ids, out, want, f"{name} batched, torch attention")
    if name in TRITON_FAMILIES:  # the Triton kernel (on a CPU under its interpreter: slow, so a few)
        triton_path = _engine(folder, attention_backend="triton")
        for ids, want, out in zip(prompts, expected, triton_path.generate(prompts, _params())):
            assert_same_or_near_tie(hf, ids, out, want, f"{name} batched, triton attention")


@pytest.mark.skipif(DEVICE != "cpu", reason="the decode stack is the CPU extension's")
@pytest.mark.parametrize("name, overrides, copies", [
    ("mistral", {"dtype": "bfloat16"}, 1),  # sliding window, oneDNN bf16 (or dense) matmuls
    # Biases, 4-bit weights: steps of <= 8 tokens in one parallel region, then of 12 as calls.
    ("qwen2", {"dtype": "bfloat16", "quantization": "int4"}, 1),
    ("qwen2", {"dtype": "bfloat16", "quantization": "int4"}, 3),
    ("llama3", {"quantization": "int4"}, 1),  # float32 activations into the 4-bit kernel
    ("llama3", {"onednn_linear": False}, 1),  # float32 through PyTorch's own matmul; tied head
    ("qwen2", {"quantization": "int8"}, 1),  # weight-only int8 (PyTorch's packed kernel), biases
    ("mistral", {"dtype": "bfloat16", "quantization": "w8a8"}, 1),  # semline's W8A8 kernel, a window
])
def test_decode_stack_computes_what_the_layers_compute(name, overrides, copies, llm, tmp_path, prompts):
    """The compiled stack's decode steps give the Python modules' logits bit for bit, in every
    dtype and weight kind it takes (float32 parity with HF is the test above)."""
    prompts = prompts * copies
    from safetensors.torch import load_file, save_file

    build_tiny_model(name, tmp_path, llm.engine.model_dir)
    weights = load_file(str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    for key in [k for k in weights if k.endswith(".bias")]:  # HF initialises biases to zero
        weights[key] = torch.randn_like(weights[key]) * 0.5
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    stacked = _engine(tmp_path, **overrides)
    if stacked.engine.runner.decode_stack is None:
        pytest.skip("the CPU extension is not available here")
    python = _engine(tmp_path, **overrides)
    python.engine.runner.decode_stack = None
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=5)
    for a, b in zip(stacked.generate(prompts, params), python.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        assert [[(t, lp) for t, _, lp in step.top_logprobs] for step in a.logprobs] == \
            [[(t, lp) for t, _, lp in step.top_logprobs] for step in b.logprobs]


def test_windowed_families_read_only_the_window(family):
    """The sliding-window families really have windows shorter than the long prompt (else the
    parity test above would not exercise them)."""
    name, folder, _, _ = family
    args = model_args(load_hf_config(folder))
    windowed = name in ("mistral", "qwen2", "phi3", "gemma2", "gemma3", "mixtral")
    assert (WINDOW in args.layer_windows) == windowed, args.layer_windows
    if name.startswith("gemma"):  # local and global layers alternate
        assert None in args.layer_windows


@pytest.mark.parametrize("name", ["gemma3", "qwen3_moe"])
def test_family_with_preemption_speculation_and_int8(name, llm, tmp_path, prompts):
    """Preemption (a cache too small for the batch) and prompt-lookup speculation leave greedy
    output unchanged; int8 weights run and stay close."""
    build_tiny_model(name, tmp_path, llm.engine.model_dir)
    reference = [o.token_ids for o in _engine(tmp_path).generate(prompts, _params())]
    small = _engine(tmp_path, num_kv_blocks=8, block_size=8)
    outs = small.generate(prompts, _params())
    assert [o.token_ids for o in outs] == reference
    assert small.engine.stats.num_preemptions > 0
    spec = _engine(tmp_path, speculative_method="prompt_lookup", num_speculative_tokens=3)
    assert [o.token_ids for o in spec.generate(prompts, _params())] == reference
    int8 = _engine(tmp_path, quantization="int8")
    agree = sum(a == b for o, ref in zip(int8.generate(prompts, _params()), reference)
                for a, b in zip(o.token_ids, ref))
    assert agree >= 0.5 * NUM_NEW_TOKENS * len(prompts)

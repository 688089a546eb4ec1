"""A GGUF file's 4-bit weights, kept 4-bit (`quantization: auto` on a .gguf model).

The loader turns a GGUF file into a float HF folder once (engine/loader.py), which is
what every family and the HF parity tests read. With `quantization: auto`, the linear
layers whose GGUF tensors are Q4_1 are then rebuilt from the file's own blocks as
`CpuInt4Linear`s: a Q4_1 block is 32 weights q (0..15) with a float16 scale d and
minimum m, w = q * d + m, which is exactly the int4 kernel's group form, so the served
weights equal the file's to the bit and nothing is re-quantized. Other types (F32, F16,
Q8_0, K-quants) stay as the float folder has them; a Q8_0 embedding and tied head are
stored int8 (8-bit, as the file holds them).

Llama-architecture files store q and k with their rows permuted for llama.cpp's rotary
layout; the same permutation transformers undoes is undone here, row by row.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.quantization import CpuInt4Linear, Int8Embedding, int8_linear, quantize_rows, tie_int8_embedding

logger = logging.getLogger(__name__)

Q4_1_BLOCK = 32
_Q4_1_BYTES = 20  # float16 d, float16 m, 16 bytes of nibbles


def read_q4_1(data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 blocks of a [rows, cols] tensor -> (q int32 [rows, cols], scales, minimums
    [rows, cols / 32]). In a block, byte j holds weight j (low nibble) and j + 16 (high)."""
    blocks = np.ascontiguousarray(data).reshape(rows, cols // Q4_1_BLOCK, _Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols).astype(np.int32)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m)


def _unpermute_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (per head, the two rotary halves interleaved)."""
    dim = t.shape[0] // num_heads // 2
    return t.reshape(num_heads, dim, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def keep_gguf_precision(model: nn.Module, gguf_path: Path, hf_config) -> int:
    """Rebuild `model`'s linear layers whose every checkpoint part is a Q4_1 tensor of
    `gguf_path` as exact int4 layers, and a Q8_0 embedding (and the head tied to it) as
    int8; returns how many modules were replaced. The model must hold whole layers (no
    tensor-parallel slices) and be on the CPU."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = str(reader.fields["general.architecture"].contents())
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf_config.num_hidden_layers)
    heads, kv_heads = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None) or \
        hf_config.num_attention_heads

    def part(hf_name: str):
        """(q, scales, minimums) of one checkpoint tensor if the file holds it as Q4_1."""
        tensor = tensors.get(names.get_name(hf_name, try_suffixes=(".weight", ".bias")) or "")
        if tensor is None or tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            return None
        cols, rows = (int(n) for n in tensor.shape[:2])
        q, d, m = read_q4_1(tensor.data, rows, cols)
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = heads if ".q_proj." in hf_name else kv_heads
            q, d, m = (_unpermute_rows(t, n) for t in (q, d, m))
        return q, d, m

    replaced = 0
    modules = dict(model.named_modules())
    for ours, parts in model.weight_map().items():
        module_name, _, kind = ours.rpartition(".")
        module = modules.get(module_name)
        if kind != "weight" or not isinstance(module, nn.Linear) or isinstance(parts[0], list):
            continue
        if any(not isinstance(p, str) for p in parts):  # a tensor-parallel slice: not handled here
            continue
        found = [part(p) for p in parts]
        if any(f is None for f in found):
            continue
        q, d, m = (torch.cat([f[i] for f in found]) for i in range(3))
        parent, _, child = module_name.rpartition(".")
        setattr(modules[parent] if parent else model, child, CpuInt4Linear(q, d, m, module.bias))
        replaced += 1
    replaced += _int8_embedding(model, tensors, gguf)
    logger.info("kept %d GGUF 4-bit/8-bit layers of %s at the file's precision", replaced, gguf_path.name)
    return replaced


def _int8_embedding(model: nn.Module, tensors: dict, gguf) -> int:
    """A Q8_0 token embedding stays 8-bit: int8 rows with per-row scales (and an untouched
    float head tied to it becomes int8 the same way)."""
    embedding = getattr(model, "embed_tokens", None)
    token_embd = tensors.get("token_embd.weight")
    if not isinstance(embedding, nn.Embedding) or token_embd is None or \
            token_embd.tensor_type != gguf.GGMLQuantizationType.Q8_0:
        return 0
    weight = embedding.weight
    q, scales = quantize_rows(weight)
    model.embed_tokens = Int8Embedding(q, scales, weight.dtype)
    replaced = 1
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight is weight:
        # The head through the W8A8 kernel: perplexity unchanged within 0.01 % here.
        model.lm_head = int8_linear(q, scales, None, weight.device, weight.dtype, int8_activations=True)
        tie_int8_embedding(model.embed_tokens, model.lm_head)
        replaced += 1
    return replaced

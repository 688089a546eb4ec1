"""semline's CPU kernels against plain PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import load_paged_attention
from engine.models.linear import OneDNNLinear, onednn_available


def _reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """Gather each sequence's K/V and run SDPA on it: [B, H, D]."""
    block_size, num_kv, dim = k_cache.shape[1], k_cache.shape[2], q.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lens[b])
        blocks = tables[b, : (n + block_size - 1) // block_size]
        keys = k_cache[blocks].reshape(-1, num_kv, dim)[:n].transpose(0, 1)  # [KVH, n, D]
        values = v_cache[blocks].reshape(-1, num_kv, dim)[:n].transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b].unsqueeze(1), keys, values, scale=scale,
                                                enable_gqa=True).squeeze(1)
    return out


@pytest.mark.parametrize("batch, num_heads, num_kv_heads", [(1, 9, 3), (7, 9, 3), (4, 8, 8), (3, 4, 1)])
def test_paged_decode_kernel_matches_sdpa(batch, num_heads, num_kv_heads):
    kernel = load_paged_attention()
    assert kernel is not None, "the kernel must build on the CI machine (gcc + ninja)"
    torch.manual_seed(batch)
    block_size, dim, num_blocks = 16, 64, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    lens = torch.randint(1, 200, (batch,))
    tables = torch.stack([torch.randperm(num_blocks)[:13] for _ in range(batch)])
    q = torch.randn(batch, num_heads, dim)
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5)
    expected = _reference_decode(q, k_cache, v_cache, tables, lens, dim**-0.5)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


def test_paged_decode_kernel_rejects_bad_input():
    kernel = load_paged_attention()
    q = torch.randn(2, 9, 64)
    cache = torch.randn(4, 16, 3, 64)
    with pytest.raises(RuntimeError, match="int64"):
        kernel.paged_decode_attention(q, cache, cache, torch.zeros(2, 1, dtype=torch.int32),
                                      torch.ones(2, dtype=torch.long), 0.125)
    with pytest.raises(RuntimeError, match="one table"):
        kernel.paged_decode_attention(q, cache, cache, torch.zeros(3, 1, dtype=torch.long),
                                      torch.ones(3, dtype=torch.long), 0.125)


@pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("rows", [1, 5, 33, 300])
def test_onednn_linear_matches_torch(rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 160, bias=True)
    packed = OneDNNLinear(linear)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        assert torch.allclose(packed(x), linear(x), atol=1e-5, rtol=1e-5)

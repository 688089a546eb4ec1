"""semline's CPU kernels against plain PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import load_paged_attention
from engine.models.linear import BLOCK_ROWS, OneDNNLinear, onednn_available, onednn_dtypes, padded_rows
from tests.conftest import DEVICE


def _reference_decode(q, k_cache, v_cache, tables, lens, scale, starts=None, softcap=None):
    """Gather each sequence's K/V (keys [start, len)) and attend in plain PyTorch: [B, H, D]."""
    block_size, num_kv, dim = k_cache.shape[1], k_cache.shape[2], q.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n, first = int(lens[b]), 0 if starts is None else int(starts[b])
        blocks = tables[b, : (n + block_size - 1) // block_size]
        keys = k_cache[blocks].reshape(-1, num_kv, dim)[first:n].transpose(0, 1)  # [KVH, n, D]
        values = v_cache[blocks].reshape(-1, num_kv, dim)[first:n].transpose(0, 1)
        if softcap is None:
            out[b] = F.scaled_dot_product_attention(q[b].unsqueeze(1), keys, values, scale=scale,
                                                    enable_gqa=True).squeeze(1)
            continue
        group = q.shape[1] // num_kv
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[b], keys) * scale
        probs = torch.softmax(torch.tanh(scores / softcap) * softcap, dim=-1)
        out[b] = torch.einsum("hn,hnd->hd", probs, values)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
# The vector tiles (64, 128: AVX512-BF16 for bf16), a tail of lanes, past the register tile.
@pytest.mark.parametrize("dim", [64, 128, 24, 256])
def test_paged_decode_kernel_dtypes_and_head_sizes(dtype, dim):
    kernel = load_paged_attention()
    torch.manual_seed(dim)
    batch, num_heads, num_kv_heads, block_size, num_blocks = 6, 6, 2, 16, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([1, 9, 16, 33, 120, 200])
    tables = torch.stack([torch.randperm(num_blocks)[:13] for _ in range(batch)])
    q = torch.randn(batch, num_heads, dim).to(dtype)
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5)
    expected = _reference_decode(q.float(), k_cache.float(), v_cache.float(), tables, lens, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 32), (torch.bfloat16, 64)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_paged_decode_kernel_sliding_window_and_softcap(softcap, dtype, dim):
    """Keys before each sequence's start (a sliding window) are never read; soft-capped scores."""
    kernel = load_paged_attention()
    torch.manual_seed(3)
    batch, num_heads, num_kv_heads, block_size, num_blocks = 5, 8, 2, 16, 64
    k_cache = (torch.randn(num_blocks, block_size, num_kv_heads, dim) * 3).to(dtype)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([1, 7, 40, 150, 200])
    starts = (lens - 20).clamp(min=0)
    tables = torch.stack([torch.randperm(num_blocks)[:13] for _ in range(batch)])
    q = torch.randn(batch, num_heads, dim).to(dtype)
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5, starts, softcap or 0.0)
    expected = _reference_decode(q.float(), k_cache.float(), v_cache.float(), tables, lens, dim**-0.5, starts,
                                 softcap).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    # Control: without the starts the answer differs (the window matters for these lengths).
    full = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5, None, softcap or 0.0)
    assert not torch.allclose(full, expected, atol=1e-3)
    with pytest.raises(RuntimeError, match="start"):
        kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5, lens.clone())


@pytest.mark.parametrize("dtype, num_kv_heads", [(torch.float32, 1), (torch.bfloat16, 3)])
def test_paged_decode_kernel_splits_long_contexts_over_threads(dtype, num_kv_heads):
    """One or two long sequences (too few items for the threads): each one's keys are
    attended in parts (at least 64 keys each) whose softmax states merge into the same
    answer; with a sliding window and soft-capping too."""
    kernel = load_paged_attention()
    torch.manual_seed(5)
    num_heads, block_size, dim, num_blocks = 3 * num_kv_heads, 16, 64, 300
    k_cache = (torch.randn(num_blocks, block_size, num_kv_heads, dim) * 2).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.stack([torch.randperm(num_blocks)[:140] for _ in range(2)])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for lens, starts, softcap in ((torch.tensor([2200]), None, None), (torch.tensor([300]), None, None),
                                  (torch.tensor([1900, 700]), None, 5.0),
                                  (torch.tensor([2000, 1200]), torch.tensor([300, 0]), None)):
        batch = len(lens)
        q = torch.randn(batch, num_heads, dim).to(dtype)
        out = kernel.paged_decode_attention(q, k_cache, v_cache, tables[:batch], lens, dim**-0.5, starts,
                                            softcap or 0.0)
        expected = _reference_decode(q.float(), k_cache.float(), v_cache.float(), tables[:batch], lens, dim**-0.5,
                                     starts, softcap)
        torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_kernel_items_too_long_to_prefetch_their_values_early(dtype):
    """Whole sequences per item (4 sequences on 2 threads) whose values exceed the kernel's
    budget for asking for them during the score pass (kValuesEarly, 512 KiB): the value pass
    asks for them itself. Same answer."""
    kernel = load_paged_attention()
    torch.manual_seed(7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch, num_heads, num_kv_heads, block_size, dim, num_blocks = 4, 9, 3, 16, 64, 600
        k_cache = torch.randn(num_blocks, block_size, num_kv_heads, dim).to(dtype)
        v_cache = torch.randn_like(k_cache)
        lens = torch.tensor([2000, 1500, 1800, 1400])  # 1400 x 3 KV heads x 64 x 2 bytes > 512 KiB
        tables = torch.stack([torch.randperm(num_blocks)[:125] for _ in range(batch)])
        q = torch.randn(batch, num_heads, dim).to(dtype)
        out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5)
    finally:
        torch.set_num_threads(threads)
    expected = _reference_decode(q.float(), k_cache.float(), v_cache.float(), tables, lens, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


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
@pytest.mark.parametrize("rows", [1, 5, 17, 33, 256, 300, 600])
def test_onednn_linear_matches_torch(rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 160, bias=True)
    packed = OneDNNLinear(linear)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        assert torch.allclose(packed(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_available() or torch.bfloat16 not in onednn_dtypes(),
                    reason="no bf16 instructions (AVX512-BF16/AMX): bf16 linears stay on PyTorch's path")
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_onednn_bf16_linear_matches_torch_within_bf16_rounding(rows):
    """oneDNN's bf16 kernel accumulates in fp32 and rounds once, as PyTorch's does: the two
    agree to the last bf16 bit or so, and both sit within bf16 rounding of the fp32 product."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(576, 1536, bias=True).to(torch.bfloat16)
    packed = OneDNNLinear(linear)
    x = torch.randn(rows, 576).to(torch.bfloat16)
    with torch.inference_mode():
        ours, theirs = packed(x), linear(x)
        exact = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, 1536)
    scale = exact.abs().max()
    assert (ours.float() - exact).abs().max() <= scale * 2**-7
    assert (ours.float() - theirs.float()).abs().max() <= scale * 2**-7


def test_gemm_row_counts_are_a_small_fixed_set_with_little_padding():
    counts = {padded_rows(rows) for rows in range(1, BLOCK_ROWS + 1)}
    assert len(counts) <= 34 and max(counts) == BLOCK_ROWS
    for rows in range(1, BLOCK_ROWS + 1):
        assert rows <= padded_rows(rows) <= rows + 15


@pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
def test_new_row_counts_build_no_new_onednn_kernels_after_warm_up(capfd):
    """oneDNN builds a kernel (~2 ms, ~0.5 MB kept in its caches) per input shape: once each
    padded row count has been seen, no batch size makes it build another."""
    linear = OneDNNLinear(torch.nn.Linear(64, 48))
    with torch.inference_mode():
        for rows in range(1, BLOCK_ROWS + 1):
            linear(torch.randn(rows, 64))
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
            for rows in (3, 57, 131, 250, 777, 1000):
                linear(torch.randn(rows, 64))
            # Control: the same layer at a row count it never ran at builds a kernel (and is seen).
            torch.ops.mkldnn._linear_pointwise(torch.randn(131, 64), linear.packed_weight, linear.bias,
                                               "none", [], "")
    built = [line for line in capfd.readouterr().out.splitlines() if "create:cache_miss" in line]
    assert len(built) == 1 and "mb131" in built[0], built  # only the unpadded control call


# --- the Triton kernel (CUDA; here under TRITON_INTERPRET=1) ---------------------------

def _reference_varlen(q, k_cache, v_cache, seqs, tables, starts, scale, window, softcap):
    """Each sequence's queries (the last q_len of its ctx_len positions) attend causally in
    plain PyTorch over its gathered keys: [T, H, D]."""
    num_kv, dim, group = k_cache.shape[2], q.shape[2], q.shape[1] // k_cache.shape[2]
    out = torch.zeros_like(q)
    for (q_len, ctx), table, first in zip(seqs, tables, starts):
        keys = k_cache[table].reshape(-1, num_kv, dim)[:ctx].float().repeat_interleave(group, 1)
        values = v_cache[table].reshape(-1, num_kv, dim)[:ctx].float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[first:first + q_len].float(), keys) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos, k_pos = torch.arange(ctx - q_len, ctx)[:, None], torch.arange(ctx)[None, :]
        visible = k_pos <= q_pos
        if window:
            visible &= k_pos > q_pos - window
        out[first:first + q_len] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf"))
                                                .softmax(-1), values).to(q.dtype)
    return out


# Every head layout with plain causal attention, every window/soft-cap mix on grouped heads,
# float16 once (the interpreter has no bfloat16: benchmarks/gpu_check.sh runs that on a GPU).
TRITON_CASES = [(torch.float32, heads, None, None) for heads in [(6, 2, 16), (4, 4, 24), (8, 1, 16)]] + [
    (torch.float32, (6, 2, 16), window, softcap) for window, softcap in [(5, None), (None, 4.0), (7, 3.0)]] + [
    (torch.float16, (8, 1, 16), 7, 3.0)]


@pytest.mark.parametrize("dtype, heads, window, softcap", TRITON_CASES)
def test_triton_paged_attention_decodes_and_prefills_in_one_launch(dtype, heads, window, softcap):
    from engine.kernels.triton_attention import build_triton_batch, paged_attention

    num_heads, num_kv_heads, head_dim = heads
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    block_size, num_blocks = 4, 48
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    # (new queries, context): decodes, a first prefill chunk, chunks after cached keys (one
    # longer than a tile and than the window), a one-token context; blocks scattered.
    seqs = [(1, 7), (5, 5), (3, 12), (1, 1), (23, 26), (1, 16)]
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range((ctx + block_size - 1) // block_size)] for _, ctx in seqs]
    starts = [sum(q_len for q_len, _ in seqs[:i]) for i in range(len(seqs))]
    q = torch.randn(sum(q_len for q_len, _ in seqs), num_heads, head_dim, dtype=dtype, device=device)
    batch = build_triton_batch(starts, [s[0] for s in seqs], [s[1] for s in seqs], tables,
                               num_heads // num_kv_heads, device)
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5
    paged_attention(q, k_cache, v_cache, out, batch, scale, softcap, window)
    expected = _reference_varlen(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqs, tables, starts, scale, window, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.cpu(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_and_rotary_round_as_pytorch_does(dtype):
    """The compiled RMSNorm and rotary (one call each per layer on the CPU) against the
    modules' PyTorch paths, in the model's dtype: equal to the last bit but for the sum of
    squares' order (fp32) — in bf16 the roundings of every product must be PyTorch's."""
    from engine.models.layers import RMSNorm, build_rotary
    from transformers import LlamaConfig

    kernel = load_paged_attention()
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(7, 96) * 3).to(dtype)[:, 16:80]  # a strided view, as a hidden state can be
    expected = norm(x)
    norm.kernel = kernel
    if dtype == torch.float32:
        torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(norm(x), expected)
    rotary = build_rotary(LlamaConfig(head_dim=32, num_attention_heads=4), 32, 64)
    qkv = torch.randn(5, (4 + 2 + 2) * 32).to(dtype)
    positions = torch.tensor([0, 3, 9, 17, 63])
    q, k = qkv[:, :128].view(5, 4, 32), qkv[:, 128:192].view(5, 2, 32)
    want_q, want_k = rotary(q, k, positions)
    rotary.kernel = kernel
    got_q, got_k = rotary(q.clone(), k.clone(), positions)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    q_view, k_view = rotary(q, k, positions)  # in place, through the views into qkv
    assert q_view.data_ptr() == q.data_ptr() and torch.equal(qkv[:, :128].view(5, 4, 32), want_q)
    # The gated MLP's SiLU product, its rows over the threads (a prefill chunk's 70 rows).
    from engine.models.layers import GatedMLP

    mlp = GatedMLP(64, 128, bias=False, activation="silu").to(dtype)
    x = torch.randn(70, 64).to(dtype)
    expected = mlp(x)
    mlp.kernel = kernel  # (ATen's own calls where this build cannot match its vector width)
    assert torch.equal(mlp(x), expected)
    assert " avx512f " not in open("/proc/cpuinfo").read() or kernel.silu_mul(mlp.gate_up_proj(x)) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a8_kernel_every_compiled_path_computes_the_reference(dtype):
    """semline's 4-bit kernel on every path this CPU compiled (scalar, AVX2, AVX512-VNNI):
    the reference product of its int8-quantized activations, rows past a 64-row pass and
    output rows past a 16-row block included, with a bias, as strided input."""
    from engine.quantization import quantize_groups_4bit
    from tests.engine.test_quantization import w4a8_reference

    kernel = load_paged_attention()
    if kernel is None:
        pytest.skip("the CPU extension is not available here")
    torch.manual_seed(1)
    n, k = 40, 96
    q, scales, offsets = quantize_groups_4bit(torch.randn(n, k))
    packed = kernel.q4_pack(q, scales, offsets)
    bias = torch.randn(n).to(dtype)
    paths = kernel.q4_paths()
    assert paths[0] == "scalar"
    if " avx2 " in open("/proc/cpuinfo").read():  # x86 with AVX2: the vector path is built
        assert "avx2" in paths
    for rows in (1, 6, 70):
        x = (torch.randn(rows, k + 32) * 2)[:, 16:16 + k].to(dtype)  # row stride k + 32
        want = (w4a8_reference(x, q, scales, offsets).to(dtype) + bias).float()  # rounded as the kernel
        for path, name in enumerate(paths):
            got = kernel.q4_linear(x, packed, n, bias, path)
            assert got.dtype == dtype and got.shape == (rows, n)
            tolerance = 1e-5 if dtype == torch.float32 else 2**-7
            assert (got.float() - want).abs().max() <= want.abs().max() * tolerance, (name, rows)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel.q4_pack(q[:, :40], scales[:, :1], offsets[:, :1])
    with pytest.raises(RuntimeError, match="disagree"):
        kernel.q4_linear(torch.randn(1, k + 32), packed, n)


GGUF_PACKED_TYPES = ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]


# Per type, its float16 fields (byte offset in a block, value): for random integers, weights
# of std ~0.1 and mean ~0, as a trained model's (d; Q4_1/Q5_1's m; K-quants' d and dmin).
_TYPICAL_FIELDS = {"Q4_0": [(0, 0.02)], "Q4_1": [(0, 0.02), (2, -0.15)], "Q5_0": [(0, 0.01)],
                   "Q5_1": [(0, 0.01), (2, -0.155)], "Q8_0": [(0, 0.0013)], "Q4_K": [(0, 0.0004), (2, 0.003)],
                   "Q5_K": [(0, 0.0002), (2, 0.0031)], "Q6_K": [(208, 0.00007)]}


def random_gguf_blocks(kind: str, rows: int, cols: int, seed: int = 0, typical: bool = False, gain: float = 1.0):
    """Random bytes as `kind`'s blocks of a [rows, cols] tensor (every bit pattern of the
    integer fields is used), with float16 scales in 0.002-0.05 or, `typical`, those of
    weights of std ~0.1 (each block's within +-50 % of _TYPICAL_FIELDS'), times `gain`."""
    import gguf
    import numpy as np

    from engine.gguf_weights import _BLOCK_BYTES

    qtype = gguf.GGMLQuantizationType[kind]
    per, size = _BLOCK_BYTES[int(qtype)]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for at, value in _TYPICAL_FIELDS[kind]:
        scale = gain * value * rng.uniform(0.5, 1.5, blocks.shape[:2]) if typical \
            else rng.uniform(0.002, 0.05, blocks.shape[:2])
        values = scale.astype(np.float16)
        blocks[..., at:at + 2] = values[..., None].view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1), qtype


def _packed_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None):
    """What the packed kernels compute, in float64: activations quantized to int8 per row and
    group of 32, times q * scale (scales per 32 or 16 weights), plus each group's minimum
    times the group's sum of the unquantized activations."""
    from engine.gguf_weights import blocks_to_float

    rows, k = x.shape
    xg = x.view(rows, k // 32, 32)
    amax = xg.abs().amax(dim=-1)
    xq = torch.round(xg * torch.where(amax > 0, 127.0 / amax, 0.0)[..., None]) * (amax / 127)[..., None]
    want = xq.reshape(rows, k).double() @ blocks_to_float(q, scales, None).double().t()
    return want if mins is None else want + xg.double().sum(-1) @ mins.double().t()


@pytest.mark.parametrize("kind", GGUF_PACKED_TYPES)
def test_gguf_blocks_kept_packed_compute_their_dequantized_product(kind):
    """Each GGUF block type kept packed (Q4_0/Q4_1/Q4_K in the 4-bit kernel's record, Q5_0,
    Q5_1 and Q5_K in the 8-bit kernel's 5-bit ones, Q6_K in its 6-bit one, Q8_0 in its group
    record), on
    random blocks: read in place it
    gives exactly gguf's own floats; the weights the packed layer holds equal them (Q4_0,
    Q4_1, Q5_0, Q8_0) or are within float16 rounding of a scale (K-quants) or of a centred
    minimum (Q5_1), and rows read back from the pack (a tied embedding's lookups) are those
    weights; on every compiled path the layer computes the product of its int8 activations
    with them, within 4 % of the float product (uniform random 4-bit weights with a minimum
    of -8 d are int8 activations' worst case: 2.5 % for Q4_0)."""
    import gguf

    from engine.gguf_weights import blocks_to_float, packed_form, packed_linear, read_blocks
    from engine.quantization import CpuInt4Linear, CpuW8A8Linear, packed_rows

    kernel = load_paged_attention()
    if kernel is None:
        pytest.skip("the CPU extension is not available here")
    n, k = 40, 512
    data, qtype = random_gguf_blocks(kind, n, k)
    found = read_blocks(data, n, k, int(qtype))
    weight = blocks_to_float(*found)
    assert torch.equal(weight, torch.from_numpy(gguf.dequantize(data, qtype).reshape(n, k).copy()))
    bits, q, scales, mins = packed_form([found])
    four_bit = bits == 4
    layer = packed_linear([found], None, torch.float32)
    assert four_bit == kind.startswith("Q4") and isinstance(layer, CpuInt4Linear if four_bit else CpuW8A8Linear)
    if not four_bit:  # the record: 5-bit (q in -16..15, group scales), 6-bit (-32..31, half-group scales), 8-bit
        assert layer.q8_packed.shape[2] == {"Q5_0": 352, "Q6_K": 420, "Q8_0": 544, "Q5_1": 384, "Q5_K": 384}[kind]
    held = blocks_to_float(q, scales, mins)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q6_K", "Q8_0"):
        assert torch.equal(held, weight)
    else:
        assert (held - weight).abs().max() <= 2**-10 * weight.abs().max()
    ids = torch.tensor([0, 39, 17, 16, 15, 3])
    assert torch.equal(packed_rows(layer, ids), held[ids])
    torch.manual_seed(3)
    for rows in (1, 6, 70):
        x = torch.randn(rows, k)
        want = _packed_reference(x, q, scales, mins)
        for path, name in enumerate(kernel.q4_paths()):
            if four_bit:
                got = kernel.q4_linear(x, layer.q4_packed, n, None, path)
            else:
                got = kernel.q8_linear(x, layer.q8_packed, layer.scales, None, path)
            assert (got.double() - want).abs().max() <= want.abs().max() * 1e-5, (name, rows)
        # A row's product does not depend on its neighbours (a 70-row pass unpacks 5- and 6-bit
        # records once for all its tiles; a lone row unpacks them itself): bit for bit.
        assert torch.equal(layer(x)[:3], torch.cat([layer(x[i:i + 1]) for i in range(min(rows, 3))]))
        exact = x.double() @ weight.double().t()
        assert (layer(x).double() - exact).norm() <= 0.04 * exact.norm()


def test_a_layer_of_mixed_gguf_types_packs_every_part_in_one_record():
    """Llama.cpp's Q4_K_M mixes types within what semline runs as one layer (q and k Q4_K, v
    Q6_K): the fused layer takes the record that holds them all (per-16 scales and minimums)."""
    from engine.gguf_weights import blocks_to_float, packed_form, packed_linear, read_blocks
    from engine.quantization import CpuW8A8Linear, packed_rows

    if load_paged_attention() is None:
        pytest.skip("the CPU extension is not available here")
    parts = []
    for seed, kind in enumerate(["Q4_K", "Q6_K", "Q8_0"]):
        data, qtype = random_gguf_blocks(kind, 16 * (seed + 1), 256, seed)
        parts.append(read_blocks(data, 16 * (seed + 1), 256, int(qtype)))
    layer = packed_linear(parts, None, torch.float32)
    assert isinstance(layer, CpuW8A8Linear) and layer.q8_packed.shape[2] == 512 + 3 * 32
    held = blocks_to_float(*packed_form(parts)[1:])
    weight = torch.cat([blocks_to_float(*part) for part in parts])
    assert (held - weight).abs().max() <= 2**-10 * weight.abs().max()
    assert torch.equal(packed_rows(layer, torch.arange(96)), held)
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x).double(), _packed_reference(x, *packed_form(parts)[1:]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kinds", [[kind] for kind in GGUF_PACKED_TYPES]
                         + [["Q4_K", "Q6_K", "Q8_0"], ["Q4_K", "Q4_K", "Q6_K"], ["Q5_K", "Q4_0"], ["Q4_1", "Q4_K"],
                            ["Q8_0", "Q6_K"], ["Q5_0", "Q6_K"], ["Q5_0", "Q5_1", "Q4_K"], ["Q6_K", "Q6_K"]])
def test_gguf_blocks_packed_in_place_are_the_records_of_their_integers(kinds):
    """The extension's gguf_pack, reading the file's bytes in place, writes byte for byte the
    records packed_linear makes of read_blocks' integers and scales, for every type and the
    mixes llama.cpp's presets put in one fused layer (parts of 16 n + 5 rows: records straddle
    parts); with the rows in any order (llama's q/k un-permuted, a rank's rows), and for a
    window of whole blocks of the columns (a tensor-parallel rank's columns: a slice of the
    whole tensor's bytes)."""
    from engine.gguf_weights import _BLOCK_BYTES, packed_linear, read_blocks, record_bytes

    kernel = load_paged_attention()
    if kernel is None:
        pytest.skip("the CPU extension is not available here")

    def record(layer):
        return layer.q4_packed if hasattr(layer, "q4_packed") else layer.q8_packed

    k, raws, types, found, orders = 768, [], [], [], []
    generator = torch.Generator().manual_seed(0)
    for seed, kind in enumerate(kinds):
        rows = 16 * (seed + 1) + 5
        data, qtype = random_gguf_blocks(kind, rows, k, seed)
        raws.append(torch.from_numpy(data))
        types.append(int(qtype))
        found.append(read_blocks(data, rows, k, int(qtype)))
        orders.append(torch.randperm(rows, generator=generator))
    size = record_bytes(types)
    row_part = torch.cat([torch.full((len(order),), i) for i, order in enumerate(orders)])
    packed = kernel.gguf_pack(raws, types, [0] * len(raws), row_part, torch.cat(orders), k, size)
    want = packed_linear([tuple(None if t is None else t[order] for t in f) for f, order in zip(found, orders)],
                         None, torch.float32)
    assert packed.shape[2] == size and torch.equal(packed, record(want))
    # Columns 256..511 of every part: its blocks there, read alone.
    windows = []
    for raw, kind in zip(raws, types):
        per, nbytes = _BLOCK_BYTES[kind]
        window = raw[:, 256 // per * nbytes: 512 // per * nbytes].contiguous().numpy()
        windows.append(read_blocks(window, raw.shape[0], 256, kind))
    first = [256 // _BLOCK_BYTES[kind][0] for kind in types]
    packed = kernel.gguf_pack(raws, types, first, row_part, torch.cat(orders), 256, size)
    want = packed_linear([tuple(None if t is None else t[order] for t in f) for f, order in zip(windows, orders)],
                         None, torch.float32)
    assert torch.equal(packed, record(want))
    with pytest.raises(RuntimeError, match="outside"):  # a window past the row's end
        kernel.gguf_pack(raws, types, first, row_part, torch.cat(orders), 768, size)


# Every record format: the 4-bit one (320), 5-bit (352, 384), 6-bit (420, 448, 480), 8-bit
# with group fields (544, 576, 608); the per-row 512 is the HF int8 layer's (below).
UNPACK_CASES = [["Q4_K"], ["Q5_0"], ["Q5_K"], ["Q6_K"], ["Q5_0", "Q6_K"], ["Q4_K", "Q6_K"], ["Q8_0"],
                ["Q8_0", "Q6_K"], ["Q4_K", "Q6_K", "Q8_0"]]


@pytest.mark.parametrize("kinds", UNPACK_CASES + [["int8 rows"]], ids=lambda kinds: "+".join(kinds))
def test_prefill_rows_multiply_the_records_unpacked_to_bfloat16(kinds):
    """A prefill chunk's product on AMX: each record format unpacks to exactly the layer's
    weights rounded to bfloat16 (rows read back in float32: the weights themselves); from
    set_unpack_rows' rows up, q4_linear and q8_linear on bfloat16 activations compute
    x @ unpacked^T (+ bias) through torch's matmul, and below it, on float32 activations or
    on a named path, the int8 kernels as before."""
    from engine.gguf_weights import blocks_to_float, packed_form, packed_linear, read_blocks
    from engine.quantization import CpuW8A8Linear, packed_rows, quantize_rows

    kernel = load_paged_attention()
    if kernel is None:
        pytest.skip("the CPU extension is not available here")
    k = 512
    if kinds == ["int8 rows"]:
        q, scales = quantize_rows(torch.randn(37, k))
        layer = CpuW8A8Linear(q, scales, torch.randn(37), torch.bfloat16)
        held = q.float() * scales[:, None]
    else:
        parts = []
        for seed, kind in enumerate(kinds):
            data, qtype = random_gguf_blocks(kind, 16 * (seed + 1) + 5, k, seed)
            parts.append(read_blocks(data, 16 * (seed + 1) + 5, k, int(qtype)))
        layer = packed_linear(parts, torch.randn(sum(len(part[0]) for part in parts)), torch.bfloat16)
        held = blocks_to_float(*packed_form(parts)[1:])
    four_bit = hasattr(layer, "q4_packed")
    packed, n = (layer.q4_packed, layer.out_features) if four_bit else (layer.q8_packed, layer.out_features)
    scales = None if four_bit else layer.scales
    unpacked = kernel.unpack_weights(packed, n, scales)
    assert unpacked.dtype == torch.bfloat16 and torch.equal(unpacked, held.bfloat16())
    ids = torch.tensor([n - 1, 0, 17, 16, 15, 3, 17])
    assert torch.equal(packed_rows(layer, ids), held[ids])
    torch.manual_seed(4)
    x = torch.randn(40, k).bfloat16()
    bias = layer.bias.bfloat16()

    def linear(x, path=-1):
        b = bias.to(x.dtype)
        return kernel.q4_linear(x, packed, n, b, path) if four_bit else kernel.q8_linear(x, packed, scales, b, path)

    before = kernel.unpack_rows()
    try:
        kernel.set_unpack_rows(0)
        int8 = linear(x)
        kernel.set_unpack_rows(40)
        assert torch.equal(linear(x), torch.addmm(bias, x, unpacked.t()))
        kernel.set_unpack_rows(40, 16 * k)  # a larger layer's slabs of rows (one block at a time)
        slabs = torch.addmm(bias, x, unpacked.t())
        assert (linear(x) - slabs).abs().max() <= 2**-7 * slabs.abs().max()  # matmul's own blocking aside
        kernel.set_unpack_rows(40)
        assert not torch.equal(int8, linear(x))  # two different computations...
        exact = x.double() @ held.double().t() + bias.double()
        for got in (int8, linear(x)):  # ... of the same product
            assert (got.double() - exact).norm() <= 0.04 * exact.norm()
        assert torch.equal(linear(x[:39]), int8[:39])  # fewer rows than set: the int8 kernel
        assert torch.equal(linear(x, len(kernel.q4_paths()) - 1), int8)  # a named path: that kernel
        assert torch.equal(linear(x.float()), linear(x.float(), len(kernel.q4_paths()) - 1))
    finally:
        kernel.set_unpack_rows(before)
    with pytest.raises(RuntimeError, match=f"not {n + 16} rows"):
        kernel.unpack_weights(packed, n + 16, None)
    with pytest.raises(RuntimeError, match="ids: rows"):
        kernel.packed_rows(packed, torch.tensor([n]), n, scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_kernel_every_compiled_path_and_the_tied_embedding(dtype):
    """semline's int8 kernel on every compiled path against the product of its int8 activations
    (per group of 32, as the 4-bit kernel's) with the int8 rows and their scales, with a bias
    and -128/127 weights; an embedding tied to the head reads its rows from the packed matrix."""
    from engine.quantization import CpuW8A8Linear, Int8Embedding, quantize_rows, tie_int8_embedding

    kernel = load_paged_attention()
    if kernel is None:
        pytest.skip("the CPU extension is not available here")
    torch.manual_seed(2)
    n, k = 40, 96
    q, scales = quantize_rows(torch.randn(n, k))
    q[0, :5] = torch.tensor([-128, 127, -128, 127, -127], dtype=torch.int8)  # the extremes
    bias = torch.randn(n).to(dtype)
    packed = kernel.q8_pack(q)
    for rows in (1, 6, 70):
        x = (torch.randn(rows, k + 32) * 2)[:, 16:16 + k].to(dtype)
        xg = x.float().view(rows, k // 32, 32)
        amax = xg.abs().amax(dim=-1)
        xq = torch.round(xg * torch.where(amax > 0, 127.0 / amax, 0.0)[..., None])
        dots = torch.einsum("rgi,ngi->rng", xq.double(), q.view(n, k // 32, 32).double())
        exact = (dots * (amax.double() / 127)[:, None]).sum(-1) * scales.double()
        want = (exact.to(dtype) + bias).float()
        for path, name in enumerate(kernel.q4_paths()):
            got = kernel.q8_linear(x, packed, scales, bias, path)
            tolerance = 1e-5 if dtype == torch.float32 else 2**-7
            assert (got.float() - want).abs().max() <= want.abs().max() * tolerance, (name, rows)
    embedding = Int8Embedding(q, scales, dtype)
    ids = torch.tensor([0, 39, 17, 16, 15, 39])
    expected = embedding(ids)
    head = CpuW8A8Linear(q, scales, None, dtype)
    tie_int8_embedding(embedding, head)
    assert embedding.qweight is None and embedding.packed is head.q8_packed
    assert torch.equal(embedding(ids), expected)


def test_the_build_folder_is_per_cpu(monkeypatch):
    """A cache shared by machines of different CPUs (an NFS home, a cluster's nodes) keeps one
    build per instruction-set mix: the extension is compiled with -march=native."""
    import builtins
    import io

    from engine.kernels import _build_key

    here = _build_key()
    assert here == _build_key() and len(here) == 12
    real_open = builtins.open

    def fake_cpuinfo(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_cpuinfo)
    assert _build_key() != here


def test_the_build_folder_is_per_source_version(monkeypatch, tmp_path):
    """Two versions of the kernels on one machine (two checkouts or venvs) build in two folders
    instead of rebuilding one in turn."""
    import engine.kernels as kernels

    here = kernels._build_key()
    changed = tmp_path / "paged_attention.cpp"
    changed.write_bytes(kernels._SOURCES[0].read_bytes() + b"\n// another version\n")
    monkeypatch.setattr(kernels, "_SOURCES", [changed, *kernels._SOURCES[1:]])
    assert kernels._build_key() != here


@pytest.mark.skipif(load_paged_attention() is None, reason="the CPU extension does not build here")
def test_processes_with_other_paths_load_the_build_without_rebuilding():
    """A process whose PATH lacks the venv (the system's ninja first) and Ray workers started
    with it (the venv's ninja first) load one build: two ninja versions taking turns on one
    folder rebuilt it each time (~45 s on 2 cores), as their logs hash commands differently."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from engine.kernels import _build_key

    cache = os.environ.get("SEMLINE_CACHE") or Path.home() / ".cache" / "semline"
    log = Path(cache) / "kernels" / _build_key() / ".ninja_log"
    before = log.read_text()
    venv_bin = os.path.dirname(sys.executable)
    system_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    for path in (system_path, venv_bin + os.pathsep + system_path):
        loaded = subprocess.run([sys.executable, "-c", "from engine.kernels import load_paged_attention as l; "
                                 "assert l() is not None"], env={**os.environ, "PATH": path},
                                cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert log.read_text() == before  # nothing compiled again


def test_argmax_rows_returns_what_torch_argmax_does():
    """The greedy sampler's argmax: the first of tied maxima, the first NaN of a row that has
    one, 0 for a row of -inf, any length (the 16-lane loop, its tail, rows shorter than 16)."""
    kernel = load_paged_attention()
    torch.manual_seed(11)
    for vocab in (1, 7, 16, 49, 49152):
        logits = torch.randn(12, vocab)
        logits[1] = float("-inf")
        if vocab > 3:
            logits[2, [1, vocab - 2]] = 50.0  # a tie: the first wins
            logits[3, vocab // 2] = float("nan")
            logits[4, [vocab - 1, 2]] = float("nan")
            logits[5] = torch.randint(0, 3, (vocab,)).float()  # many ties
            logits[6, -1] = float("inf")
        assert torch.equal(kernel.argmax_rows(logits), logits.argmax(dim=-1)), vocab
    strided = torch.randn(64, 40)[:, ::2]  # not contiguous
    assert torch.equal(kernel.argmax_rows(strided), strided.argmax(dim=-1))


def test_kernels_run_without_the_gil():
    """A kernel call lets the process's other threads run: a server's event loop (every
    stream's chunks) goes on while the model's matmuls of a long prefill do. Another thread
    counts while one q4_linear call (~0.1 s) runs on the main one, the scalar path on one
    thread so the two threads do not need the same core."""
    import threading
    import time

    from engine.quantization import quantize_groups_4bit

    kernel = load_paged_attention()
    if kernel is None:
        pytest.skip("the CPU extension is not available here")
    n, k = 1024, 1024
    packed = kernel.q4_pack(*quantize_groups_4bit(torch.randn(n, k)))
    x = torch.randn(256, k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        kernel.q4_linear(x, packed, n, None, 0)
        alone = time.perf_counter() - start
        counts, stop = [], threading.Event()

        def count() -> None:
            ticks = 0
            while not stop.is_set():
                ticks += 1
                time.sleep(0.001)
            counts.append(ticks)

        counter = threading.Thread(target=count)
        counter.start()
        time.sleep(0.01)
        start = time.perf_counter()
        for _ in range(3):
            kernel.q4_linear(x, packed, n, None, 0)
        during = time.perf_counter() - start
        stop.set()
        counter.join()
    finally:
        torch.set_num_threads(threads)
    assert alone > 0.02, alone  # long enough that a thread held off by the GIL would show
    # Held, the counter would get the GIL only at the 5 ms switch interval between calls (~3);
    # released, it ticks about once a millisecond through the calls.
    assert counts[0] >= 0.3 * during / 0.0011, (counts, during)

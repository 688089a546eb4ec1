"""Paged attention for every token of a step in one Triton launch per layer.

Decode tokens and prefill chunks alike: each sequence's new queries are a run of rows of
the flat batch (`q_start`, `q_len`), its context is `ctx_len` keys read in place from the
paged cache through its block table — no gather into padded buffers, no launch per chunk
or per decode group. Query rows are cut into tiles of BLOCK_Q tokens; a program takes one
tile and one KV head, with that KV head's query heads folded into the tile's rows (so
grouped-query attention reads each K/V block once for the whole group), and walks the
tile's keys one cache block at a time with an online softmax. Causal masking, sliding
windows (only the blocks a window reaches are read) and Gemma 2's soft-capping run inside.

The same kernel runs on a CPU under Triton's interpreter (TRITON_INTERPRET=1, set before
this module is imported): that is how `make test` checks it on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.attention import padded_block_tables

# Query rows a program holds (tokens x query heads of one KV head; tl.dot wants >= 16):
# few for decode-only steps (one token per sequence), more when prefill chunks are in.
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64


@dataclass
class TritonBatch:
    """A step's sequences for the kernel (int32, on the device): per sequence the first row
    of its queries in the flat batch, how many there are, its context length (cached keys
    plus these) and its block table; per tile the sequence and which tile of it."""

    q_start: torch.Tensor
    q_len: torch.Tensor
    ctx_len: torch.Tensor
    block_tables: torch.Tensor
    tile_seq: torch.Tensor
    tile_index: torch.Tensor
    block_m: int
    block_q: int


def tile_shape(group: int, decode_only: bool) -> tuple[int, int]:
    """(query rows per program, query tokens per tile) for `group` query heads per KV head."""
    block_m = max(DECODE_BLOCK_M if decode_only else PREFILL_BLOCK_M, triton.next_power_of_2(group))
    return block_m, block_m // group


def build_triton_batch(q_start: list[int], q_len: list[int], ctx_len: list[int], tables: list[list[int]],
                       group: int, device: torch.device) -> TritonBatch:
    """Everything as a few host tensors moved with one copy each; tiles by repeat_interleave.
    group: query heads per KV head."""
    block_m, tokens_per_tile = tile_shape(group, max(q_len) == 1)
    lens = torch.tensor(q_len, dtype=torch.int32)
    padded = padded_block_tables(tables, torch.int32)
    tiles = (lens + tokens_per_tile - 1) // tokens_per_tile
    tile_seq = torch.repeat_interleave(torch.arange(len(q_len), dtype=torch.int32), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_index = torch.arange(len(tile_seq), dtype=torch.int32) - first_tile[tile_seq.long()].to(torch.int32)
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return TritonBatch(move(torch.tensor(q_start, dtype=torch.int32)), move(lens),
                       move(torch.tensor(ctx_len, dtype=torch.int32)), move(padded), move(tile_seq),
                       move(tile_index), block_m, tokens_per_tile)


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
    q_start_ptr, q_len_ptr, ctx_len_ptr, tile_seq_ptr, tile_index_ptr,
    scale, softcap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q_tile = tl.load(tile_index_ptr + tile)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_len_ptr + seq)
    ctx = tl.load(ctx_len_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + rows // GROUP  # query index within the sequence's run
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = ctx - q_len + token  # the query's position in its sequence
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_pos = ctx - q_len + q_tile * BLOCK_Q
    end = tl.minimum(ctx, first_pos + BLOCK_Q)  # keys past the tile's last query are never seen
    begin = 0
    if WINDOW:
        begin = tl.maximum(first_pos - window + 1, 0) // BLOCK_SIZE * BLOCK_SIZE
    slots = tl.arange(0, BLOCK_SIZE)
    for key0 in range(begin, end, BLOCK_SIZE):
        block = tl.load(block_tables_ptr + seq * stride_bt + key0 // BLOCK_SIZE)
        kv_mask = dim_ok[None, :]
        k = tl.load(k_cache_ptr + block * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # softcap * tanh(s / softcap)
        keys = key0 + slots
        ok = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < ctx)
        if WINDOW:
            ok = ok & (keys[None, :] > q_pos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block * stride_vb + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    batch: TritonBatch, scale: float, softcap: float | None = None,
                    window: int | None = None) -> None:
    """Attention of every query row named in `batch` into `out` ([T, H, D], as q). Caches:
    [num_blocks, block_size, KVH, D], the step's K/V already written into them."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    num_tiles = batch.tile_seq.shape[0]
    if num_tiles == 0:
        return
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    _paged_attention_kernel[(num_tiles, num_kv_heads)](
        out, q, k_cache, v_cache, batch.block_tables,
        batch.q_start, batch.q_len, batch.ctx_len, batch.tile_seq, batch.tile_index,
        float(scale), float(softcap or 0.0), int(window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), batch.block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), GROUP=group,
        BLOCK_M=batch.block_m, BLOCK_Q=batch.block_q, BLOCK_SIZE=block_size,
        SOFTCAP=bool(softcap), WINDOW=bool(window), IEEE=q.dtype == torch.float32,
    )

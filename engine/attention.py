"""Paged attention over a flat batch of tokens from many sequences.

The K/V cache of one layer is a tensor [num_blocks, block_size, num_kv_heads, head_dim].
Each step first writes the new tokens' K/V into their slots, then reads every
sequence's context back through its block table:

- decode tokens (one query per sequence) run through semline's compiled CPU
  kernel (engine/kernels), which reads K/V in place through the block tables;
  where it is not available (CUDA, no compiler) they are grouped by context
  length, each group gathered into a padded [B, L] buffer with one index_select
  and run through one SDPA call, the query heads that share a KV head folded
  into the query axis so K/V are never repeated for grouped-query attention;
- prefill chunks (many queries of one sequence) run one SDPA call each, causal
  over the chunk and full over the cached context before it.

Sliding-window layers (Mistral, Gemma's local layers, ...) get metadata of their own,
built once per step per window size: a decode reads only the last `window` keys
(the kernel starts at the first key in the window; the gathered path masks the
rest), and a prefill chunk gathers only the blocks its window reaches. Gemma 2's
attention-logit soft-capping (`softcap`) runs in the kernel, or through a plain
softmax where SDPA cannot apply it.

No Python loop runs over tokens; all metadata is built once per step (not per layer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    """Decode sequences padded to one context length."""

    # [B] positions of these sequences' query tokens in the flat batch.
    token_indices: torch.Tensor
    # [B * num_blocks] block ids, row-major (sequence, block); padding rows use block 0.
    block_ids: torch.Tensor
    # Padded context length (num_blocks * block_size).
    padded_len: int
    # [B, 1, 1, padded_len] additive mask: 0 for real context, -inf for padding.
    mask: torch.Tensor


@dataclass
class PrefillChunk:
    """A run of query tokens of one sequence."""

    # Slice of the flat batch holding this chunk's tokens.
    start: int
    end: int
    # Tokens already in the cache before this chunk.
    num_cached: int
    # [num_blocks] the sequence's blocks from the one holding key `first_key` to the one
    # holding its last token.
    block_ids: torch.Tensor
    # [q, context - first_key] boolean mask (True = attend) over the keys read, or None when
    # the chunk attends causally to itself alone (nothing cached, no window cutting in).
    mask: torch.Tensor | None
    # Position of the first key read: 0, or for a sliding window the start of the block
    # holding the first query's first visible key.
    first_key: int = 0


@dataclass
class DecodeBatch:
    """All decode sequences, for the compiled kernel that reads K/V through block tables."""

    # [B] positions of the query tokens in the flat batch.
    token_indices: torch.Tensor
    # [B, max_blocks] int64 block tables, rows padded with block 0.
    block_tables: torch.Tensor
    # [B] int64 keys each query attends to.
    context_lens: torch.Tensor
    # The compiled module (engine.kernels) that runs it.
    kernel: object
    # [B] int64 first key each query attends to (sliding window), or None (from key 0).
    starts: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Per-step attention inputs shared by every layer."""

    # [T] flat slot (block_id * block_size + offset) where each new token's K/V go.
    slot_mapping: torch.Tensor
    # Decode tokens go either through the kernel (decode_batch) or gathered groups.
    decode_batch: DecodeBatch | None = None
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefill_chunks: list[PrefillChunk] = field(default_factory=list)
    block_size: int = 16
    # Every token through the Triton kernel instead (engine/kernels/triton_attention.py),
    # for layers with this sliding window (None: all keys).
    triton: object | None = None
    window: int | None = None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V. k, v: [T, num_kv_heads, head_dim]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's); caches: [N, block_size, KVH, D] -> [T, H, D].
    softcap: scores become softcap * tanh(score / softcap) before the softmax (Gemma 2)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    if meta.triton is not None:
        from engine.kernels import triton_attention

        triton_attention.paged_attention(q, k_cache, v_cache, out, meta.triton, scale, softcap, meta.window)
        return out
    batch = meta.decode_batch
    if batch is not None:
        out[batch.token_indices] = batch.kernel.paged_decode_attention(
            q[batch.token_indices], k_cache, v_cache, batch.block_tables, batch.context_lens, scale,
            batch.starts, softcap or 0.0)
    for group in meta.decode_groups:
        out[group.token_indices] = _decode_attention(q[group.token_indices], k_cache, v_cache, group, scale,
                                                     softcap)
    for chunk in meta.prefill_chunks:
        out[chunk.start : chunk.end] = _prefill_attention(q, k, v, k_cache, v_cache, chunk, scale, softcap)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[N, bs, KVH, D] gathered by block ids -> [len(block_ids), bs, KVH, D]."""
    return torch.index_select(cache, 0, block_ids)


def _attend(queries, keys, values, mask, scale: float, softcap: float | None, is_causal: bool = False):
    """SDPA over [B, H, q, D] queries and [B, KVH, k, D] keys/values (grouped-query heads
    broadcast); mask: boolean (True = attend) or additive, or None. SDPA cannot soft-cap,
    so a soft-capped layer takes the plain softmax path."""
    if softcap is None:
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=True)
    group = queries.shape[1] // keys.shape[1]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


def _decode_attention(q, k_cache, v_cache, group: DecodeGroup, scale: float, softcap: float | None):
    # q: [B, H, D]
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    length = group.padded_len
    keys = _gather(k_cache, group.block_ids).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    values = _gather(v_cache, group.block_ids).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    # Fold the query heads of each KV head into the query axis: [B, KVH, G, D].
    queries = q.view(batch, num_kv_heads, group_size, head_dim)
    out = _attend(queries, keys, values, group.mask, scale, softcap)
    return out.reshape(batch, num_heads, head_dim)


def _prefill_attention(q, k, v, k_cache, v_cache, chunk: PrefillChunk, scale: float, softcap: float | None):
    queries = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
    if chunk.num_cached == 0 and chunk.first_key == 0:
        keys = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, q, D]
        values = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        out = _attend(queries, keys, values, chunk.mask, scale, softcap, is_causal=chunk.mask is None)
    else:
        num_read = chunk.mask.shape[1]  # keys first_key .. context - 1
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        offset = chunk.first_key % k_cache.shape[1]
        keys = _gather(k_cache, chunk.block_ids).view(-1, num_kv_heads, head_dim)[offset:offset + num_read]
        values = _gather(v_cache, chunk.block_ids).view(-1, num_kv_heads, head_dim)[offset:offset + num_read]
        out = _attend(queries, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
                      chunk.mask, scale, softcap)
    return out.squeeze(0).transpose(0, 1)  # [q, H, D]


# Cost of one more decode group per layer (kernel launches), in padded tokens of
# gather + attention work; measured on a 2-core CPU, roughly right elsewhere.
GROUP_OVERHEAD_TOKENS = 256


def build_decode_groups(
    token_indices: list[int],
    block_tables: list[list[int]],
    context_lens: list[int],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    window: int | None = None,
) -> list[DecodeGroup]:
    """Group decode sequences of similar length so that padding stays small."""
    order = sorted(range(len(token_indices)), key=lambda i: context_lens[i])
    padded = [len(block_tables[i]) * block_size for i in order]
    groups = [order[start:end] for start, end in _partition(padded, GROUP_OVERHEAD_TOKENS)]
    return [
        _make_decode_group(g, token_indices, block_tables, context_lens, block_size, device, dtype, window)
        for g in groups
    ]


def _partition(sorted_lens: list[int], overhead: int) -> list[tuple[int, int]]:
    """Split ascending lengths into runs minimising sum(overhead + run_size * run_max).

    O(n^2) dynamic programme over at most max_num_seqs sequences.
    """
    n = len(sorted_lens)
    best = [0] + [float("inf")] * n  # best[j]: cost of the first j sequences
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + overhead + (end - start) * sorted_lens[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], n
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def padded_block_tables(tables: list[list[int]], dtype: torch.dtype = torch.long) -> torch.Tensor:
    """[len(tables), longest] block ids, short rows padded with block 0."""
    padded = torch.zeros(len(tables), max(len(t) for t in tables), dtype=dtype)
    for row, table in enumerate(tables):
        padded[row, : len(table)] = torch.tensor(table, dtype=dtype)
    return padded


def build_decode_batch(token_indices: list[int], block_tables: list[list[int]], context_lens: list[int],
                       device: torch.device, kernel) -> DecodeBatch:
    return DecodeBatch(
        token_indices=torch.tensor(token_indices, device=device),
        block_tables=padded_block_tables(block_tables).to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.long, device=device),
        kernel=kernel,
    )


def windowed(batch: DecodeBatch, window: int | None) -> DecodeBatch:
    """The same decodes for a layer that sees only the last `window` keys (shares the tables)."""
    if window is None:
        return batch
    return dataclasses.replace(batch, starts=(batch.context_lens - window).clamp(min=0))


def _make_decode_group(members, token_indices, block_tables, context_lens, block_size, device, dtype, window):
    block_ids = padded_block_tables([block_tables[i] for i in members])
    padded_len = block_ids.shape[1] * block_size
    lens = torch.tensor([context_lens[i] for i in members])
    positions = torch.arange(padded_len)[None, :]
    valid = positions < lens[:, None]
    if window is not None:
        valid &= positions >= lens[:, None] - window
    mask = torch.zeros(len(members), 1, 1, padded_len, dtype=dtype)
    mask.masked_fill_(~valid.view(len(members), 1, 1, padded_len), float("-inf"))
    return DecodeGroup(
        token_indices=torch.tensor([token_indices[i] for i in members], device=device),
        block_ids=block_ids.view(-1).to(device),
        padded_len=padded_len,
        mask=mask.to(device),
    )


def make_prefill_chunk(start: int, end: int, num_cached: int, block_table: list[int],
                       block_size: int, device: torch.device, window: int | None = None) -> PrefillChunk:
    """Query positions [num_cached, num_cached + end - start) of one sequence: each sees the keys
    at or before it, and with a window only the last `window` of them (itself included)."""
    num_q = end - start
    context = num_cached + num_q
    first_key = 0
    if window is not None:  # the first query's first visible key, rounded down to its block
        first_key = max(0, num_cached - window + 1) // block_size * block_size
    mask = None
    if num_cached > 0 or (window is not None and window < num_q):
        q_pos = torch.arange(num_cached, context)[:, None]
        k_pos = torch.arange(first_key, context)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        mask = mask.to(device)
    num_blocks = (context + block_size - 1) // block_size
    return PrefillChunk(
        start=start,
        end=end,
        num_cached=num_cached,
        block_ids=torch.tensor(block_table[first_key // block_size:num_blocks], dtype=torch.long, device=device),
        mask=mask,
        first_key=first_key,
    )

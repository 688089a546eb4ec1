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

No Python loop runs over tokens; all metadata is built once per step (not per layer).
"""

from __future__ import annotations

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
    # [num_blocks] the sequence's blocks covering num_cached + (end - start) tokens.
    block_ids: torch.Tensor
    # [q, num_cached + q] boolean mask (True = attend) when num_cached > 0, else None (pure causal).
    mask: torch.Tensor | None


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
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's); caches: [N, block_size, KVH, D] -> [T, H, D]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    batch = meta.decode_batch
    if batch is not None:
        out[batch.token_indices] = batch.kernel.paged_decode_attention(
            q[batch.token_indices], k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
    for group in meta.decode_groups:
        out[group.token_indices] = _decode_attention(q[group.token_indices], k_cache, v_cache, group, scale)
    for chunk in meta.prefill_chunks:
        out[chunk.start : chunk.end] = _prefill_attention(q, k, v, k_cache, v_cache, chunk, scale)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[N, bs, KVH, D] gathered by block ids -> [len(block_ids), bs, KVH, D]."""
    return torch.index_select(cache, 0, block_ids)


def _decode_attention(q, k_cache, v_cache, group: DecodeGroup, scale: float) -> torch.Tensor:
    # q: [B, H, D]
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    length = group.padded_len
    keys = _gather(k_cache, group.block_ids).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    values = _gather(v_cache, group.block_ids).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    # Fold the query heads of each KV head into the query axis: [B, KVH, G, D].
    queries = q.view(batch, num_kv_heads, group_size, head_dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def _prefill_attention(q, k, v, k_cache, v_cache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    num_q = chunk.end - chunk.start
    queries = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
    if chunk.num_cached == 0:
        keys = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, q, D]
        values = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        context = chunk.num_cached + num_q
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        keys = _gather(k_cache, chunk.block_ids).view(-1, num_kv_heads, head_dim)[:context]
        values = _gather(v_cache, chunk.block_ids).view(-1, num_kv_heads, head_dim)[:context]
        out = F.scaled_dot_product_attention(
            queries,
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask,
            scale=scale,
            enable_gqa=True,
        )
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
) -> list[DecodeGroup]:
    """Group decode sequences of similar length so that padding stays small."""
    order = sorted(range(len(token_indices)), key=lambda i: context_lens[i])
    padded = [len(block_tables[i]) * block_size for i in order]
    groups = [order[start:end] for start, end in _partition(padded, GROUP_OVERHEAD_TOKENS)]
    return [
        _make_decode_group(g, token_indices, block_tables, context_lens, block_size, device, dtype)
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


def _padded_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """[len(tables), longest] int64 block ids, short rows padded with block 0."""
    padded = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.long)
    for row, table in enumerate(tables):
        padded[row, : len(table)] = torch.tensor(table, dtype=torch.long)
    return padded


def build_decode_batch(token_indices: list[int], block_tables: list[list[int]], context_lens: list[int],
                       device: torch.device, kernel) -> DecodeBatch:
    return DecodeBatch(
        token_indices=torch.tensor(token_indices, device=device),
        block_tables=_padded_block_tables(block_tables).to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.long, device=device),
        kernel=kernel,
    )


def _make_decode_group(members, token_indices, block_tables, context_lens, block_size, device, dtype):
    block_ids = _padded_block_tables([block_tables[i] for i in members])
    padded_len = block_ids.shape[1] * block_size
    lens = torch.tensor([context_lens[i] for i in members])
    valid = torch.arange(padded_len)[None, :] < lens[:, None]
    mask = torch.zeros(len(members), 1, 1, padded_len, dtype=dtype)
    mask.masked_fill_(~valid.view(len(members), 1, 1, padded_len), float("-inf"))
    return DecodeGroup(
        token_indices=torch.tensor([token_indices[i] for i in members], device=device),
        block_ids=block_ids.view(-1).to(device),
        padded_len=padded_len,
        mask=mask.to(device),
    )


def make_prefill_chunk(start: int, end: int, num_cached: int, block_table: list[int],
                       block_size: int, device: torch.device) -> PrefillChunk:
    num_q = end - start
    context = num_cached + num_q
    num_blocks = (context + block_size - 1) // block_size
    mask = None
    if num_cached > 0:
        # Query i (position num_cached + i) sees keys 0..num_cached + i.
        q_pos = torch.arange(num_cached, context)[:, None]
        mask = (torch.arange(context)[None, :] <= q_pos).to(device)
    return PrefillChunk(
        start=start,
        end=end,
        num_cached=num_cached,
        block_ids=torch.tensor(block_table[:num_blocks], dtype=torch.long, device=device),
        mask=mask,
    )

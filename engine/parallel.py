"""Tensor parallelism inside the model: which share of each layer a rank holds, and the
collectives that join the shares.

Within a layer, attention heads and MLP columns are split over `size` ranks (Megatron
style): q/k/v and gate/up are column-parallel (each rank computes its heads or its
intermediate columns), o and down are row-parallel (each rank multiplies its slice of
the input features; one all-reduce sums the partial outputs). KV heads split with the
query heads; with fewer KV heads than ranks each rank keeps the one KV head its query
heads read (replicated). The embedding and the output head are split by vocabulary: a
rank looks up or scores only its rows, an all-reduce joins the embeddings and a gather
to rank 0 joins the logits (greedy rows gather only each rank's best score and id).

The engine only uses `torch.distributed` here (and, for CPU ranks on one host, shared
memory: `SharedMemoryAllReduce`); who starts the ranks and their process group (Ray
actors in cluster/parallel.py) is not its business. `size` 1 is the whole model in
one process and costs nothing.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.kernels import argmax


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    # The torch.distributed process group of this rank's peers (None: the default group).
    group: Any = None
    # All-reduces through shared memory (CPU ranks on one host), else torch.distributed.
    shm: "SharedMemoryAllReduce | None" = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in [0, {self.size})")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    # --- shares ---------------------------------------------------------------

    def split(self, total: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's share of `total` parts, as even as possible (earlier
        ranks take the remainder: 1536 MLP columns over 2 ranks, 9 heads' worth of work...)."""
        if total < self.size:
            raise ValueError(f"{what} ({total}) are fewer than tensor_parallel_size {self.size}")
        share, extra = divmod(total, self.size)
        start = self.rank * share + min(self.rank, extra)
        return start, start + share + (self.rank < extra)

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """([start, stop) of this rank's query heads, of its KV heads). KV heads split as evenly
        as possible and each rank takes the query heads that read them (SmolLM2's 3 KV heads
        over 2 ranks: 6 and 3 query heads). With fewer KV heads than ranks, the query heads
        split evenly and each rank keeps the one KV head its query heads read (replicated)."""
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.size:
            kv_start, kv_stop = self.split(num_kv_heads, "KV heads")
            return (kv_start * group, kv_stop * group), (kv_start, kv_stop)
        if self.size % num_kv_heads or num_heads % self.size:
            raise ValueError(f"{num_heads} attention heads with {num_kv_heads} KV heads cannot be split "
                             f"over tensor_parallel_size {self.size} (KV heads are replicated only when "
                             f"tensor_parallel_size is a multiple of their number)")
        q_start, q_stop = self.split(num_heads, "attention heads")
        return (q_start, q_stop), (q_start // group, q_start // group + 1)

    def vocab_share(self, vocab_size: int) -> int:
        """Vocabulary rows per rank: ceil(V / size) (the last ranks hold fewer)."""
        return -(-vocab_size // self.size)

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """[start, stop) of the vocabulary rows this rank holds: vocab_share each, the last
        rank fewer when V does not divide."""
        share = self.vocab_share(vocab_size)
        return min(vocab_size, self.rank * share), min(vocab_size, (self.rank + 1) * share)

    # --- collectives ------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (a no-op in one process)."""
        if self.size > 1:
            if self.shm is not None and self.shm.fits(x):
                return self.shm.all_reduce(x)
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def embed(self, embedding, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Look up `ids` in a vocabulary-split embedding: each rank fills the rows of the ids
        it holds, zeros elsewhere, and the all-reduce joins them."""
        if self.size == 1:
            return embedding(ids)
        start, stop = self.vocab(vocab_size)
        local = ids - start
        outside = (local < 0) | (local >= stop - start)
        out = embedding(local.masked_fill(outside, 0))
        out = out.masked_fill(outside[:, None], 0)
        return self.all_reduce(out)

    def gather_logits(self, local: torch.Tensor, argmax_rows: list[int],
                      vocab_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Join vocabulary-split logits [N, V/size] on rank 0: (the full rows of those not in
        argmax_rows [N - n, V], the argmax token id of each row in argmax_rows [n]); other
        ranks get None. A greedy row travels as its best (score, id) per rank, not as a
        vocabulary of floats; ties go to the lowest id, as argmax over the whole row does."""
        greedy = torch.zeros(local.shape[0], dtype=torch.bool, device=local.device)
        greedy[argmax_rows] = True
        full, best = local[~greedy], local[greedy]
        if self.size == 1:
            return full, argmax(best).to(torch.int32)
        import torch.distributed as dist

        start, _ = self.vocab(vocab_size)
        share = self.vocab_share(vocab_size)
        scores, ids = best.max(dim=-1)
        # One float32 message per rank: full rows padded to `share` columns, then the greedy
        # rows' best scores and ids (exact in float32 below 2**24 tokens).
        padded = torch.nn.functional.pad(full, (0, share - full.shape[1]))
        message = torch.cat([padded.flatten(), scores, (ids + start).float()]).contiguous()
        parts = [torch.empty_like(message) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(message, parts, dst=_global_rank(self.group, 0), group=self.group)
        if self.rank != 0:
            return None
        n_full, n_best = full.shape[0], best.shape[0]
        split = n_full * share
        full = torch.cat([p[:split].view(n_full, share) for p in parts], dim=1)[:, :vocab_size]
        scores = torch.stack([p[split:split + n_best] for p in parts])  # [size, n]
        ids = torch.stack([p[split + n_best:] for p in parts])
        winner = scores.argmax(dim=0)  # the first rank (lowest ids) among equal scores
        return full, ids.gather(0, winner[None]).squeeze(0).to(torch.int32)


def _global_rank(group, rank: int) -> int:
    if group is None:
        return rank
    import torch.distributed as dist

    return dist.get_global_rank(group, rank)


class SharedMemoryAllReduce:
    """Sum a tensor over the CPU ranks of one host through a shared-memory file: each rank
    copies its tensor into its slot, publishes a sequence number, waits for its peers',
    and adds every slot in rank order (so all ranks get bit-identical sums, as from an
    all-reduce). Two slot sets alternate by call parity: a rank can be at most one call
    ahead of the slowest (it waits for every peer's number first), so it never overwrites
    a slot that a peer is still reading.

    gloo over loopback TCP takes ~2 ms per all-reduce of a decode batch's hidden states
    (32 x 2048 bf16) on a 2-core machine; this takes a copy, a sum and the wait for the
    slowest rank. Waiting spins with sched_yield, which gives the core away when ranks
    share cores. Tensors above `max_bytes` go through torch.distributed instead.

    `path`: a file under /dev/shm that rank 0 creates before the others open it (the caller
    orders that, e.g. with a barrier) and that may be unlinked once all have it mapped."""

    _COUNTER_STRIDE = 8  # int64s per counter: one 64-byte cache line each

    def __init__(self, path: str | Path, rank: int, size: int, max_bytes: int, create: bool,
                 timeout_s: float = 60.0) -> None:
        self.rank, self.size, self.max_bytes, self.timeout_s = rank, size, max_bytes, timeout_s
        header = size * self._COUNTER_STRIDE * 8
        total = header + 2 * size * max_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, total)
            self._map = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self._counters = torch.frombuffer(self._map, dtype=torch.int64, count=header // 8)
        self._slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=header).view(2, size, max_bytes)
        self._seq = 0

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.max_bytes

    def _slot(self, parity: int, rank: int, x: torch.Tensor) -> torch.Tensor:
        return self._slots[parity, rank, :x.numel() * x.element_size()].view(x.dtype).view(x.shape)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._seq += 1
        seq, parity = self._seq, self._seq % 2
        self._slot(parity, self.rank, x).copy_(x)
        # x86 keeps stores in order: the number is seen only after the slot's data.
        self._counters[self.rank * self._COUNTER_STRIDE] = seq
        deadline = None
        for peer in range(self.size):
            counter = self._counters[peer * self._COUNTER_STRIDE]
            while int(counter) < seq:
                os.sched_yield()
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel rank {peer} did not join all-reduce {seq} "
                                       f"within {self.timeout_s} s")
        total = self._slot(parity, 0, x).clone()
        for peer in range(1, self.size):
            total += self._slot(parity, peer, x)
        return x.copy_(total)

    def close(self) -> None:
        del self._counters, self._slots
        self._map.close()

    @staticmethod
    def supported() -> bool:
        """Where a store of the slot's data is seen before the later store of the sequence
        number without a fence (x86's total store order) and /dev/shm exists."""
        return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")

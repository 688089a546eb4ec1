"""KV-cache block accounting: a free list, reference counts, block tables, and the prefix cache.

The K/V tensors themselves live in the model runner; this class only decides
which block ids each request owns. A slot is `block_id * block_size + offset`.

Prefix caching: a full block is identified by a hash of its tokens chained with
the hash of every block before it, so equal hashes mean equal prefixes. Once a
request has computed a full block it is registered under that hash. A new
request whose prompt starts with registered blocks takes them (reference
counted) and prefills only the rest. A block whose last holder lets go stays
registered, in least-recently-used order, until its space is needed. The prompt blocks
a running request is still computing are known by hash too (`in_progress`): a request
that needs one of them next waits for it rather than computing it a second time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from engine.request import Request


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: its tokens and (through `parent`) everything before them."""
    return hashlib.sha256(parent + np.asarray(token_ids, dtype=np.int64).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # How many block tables hold each block (>1 once blocks are shared).
        self.ref_counts = [0] * num_blocks
        # The prefix cache: hash -> block, block -> hash, and the registered blocks no
        # request holds (evicted oldest first when the free list runs dry).
        self.cached_blocks: dict[bytes, int] = {}
        self.hash_of_block: list[bytes | None] = [None] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0
        # Prompt blocks being computed, by hash: the running request computing each.
        self.in_progress: dict[bytes, Request] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can get now: free ones and cached ones nobody holds."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_needed(self, request: Request, num_total_tokens: int) -> int:
        """Blocks still to allocate so that `request` can hold `num_total_tokens` tokens."""
        return max(0, num_blocks_for(num_total_tokens, self.block_size) - len(request.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate_slots(self, request: Request, num_total_tokens: int) -> bool:
        """Grow the request's block table to hold `num_total_tokens`; False if out of blocks."""
        needed = self.num_blocks_needed(request, num_total_tokens)
        if not self.can_allocate(needed):
            return False
        for _ in range(needed):
            block_id = self._take_block()
            self.ref_counts[block_id] = 1
            request.block_table.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Release every block the request holds (blocks shared with others stay)."""
        for block_id in reversed(request.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.hash_of_block[block_id] is not None:
                    self.evictable[block_id] = None  # most recently used last
                else:
                    self.free_block_ids.append(block_id)
        request.block_table = []
        request.num_registered_blocks = 0
        if self.in_progress:
            for h in request.block_hashes:
                if self.in_progress.get(h) is request:
                    del self.in_progress[h]

    # --- prefix cache ---------------------------------------------------------------

    def match_prefix(self, request: Request) -> int:
        """Give a request with no blocks yet the cached blocks its tokens start with (a
        preempted request's outputs count too); returns how many tokens they hold. The
        last token is always left to compute: its logits give the next token. A request that
        wants its prompt's logprobs takes nothing: every position's logits must be computed."""
        if not self.enable_prefix_caching or request.block_table or request.needs_prompt_logprobs:
            return 0
        hashes = self._prompt_hashes(request)
        for h in hashes:
            block_id = self.cached_blocks.get(h)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]
            self.ref_counts[block_id] += 1
            request.block_table.append(block_id)
        request.num_registered_blocks = len(request.block_table)
        return len(request.block_table) * self.block_size

    def claim(self, request: Request) -> None:
        """Announce the prompt blocks an admitted request will compute (those the cache lacks)."""
        if not self.enable_prefix_caching:
            return
        hashes = self._prompt_hashes(request)
        for h in hashes[request.num_registered_blocks:]:
            if h not in self.cached_blocks:
                self.in_progress.setdefault(h, request)

    def computing_next(self, request: Request) -> Request | None:
        """The other request computing the first block of `request`'s prompt that the cache
        lacks, if one is; `request` would then compute the same K/V a second time."""
        if not self.in_progress:
            return None
        for h in self._prompt_hashes(request):
            if h not in self.cached_blocks:
                owner = self.in_progress.get(h)
                return owner if owner is not request else None
        return None

    def register_full_blocks(self, request: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        if num_full <= request.num_registered_blocks:
            return
        hashes = self._hashes(request, num_full)
        for index in range(request.num_registered_blocks, num_full):
            block_id, h = request.block_table[index], hashes[index]
            if h not in self.cached_blocks and self.hash_of_block[block_id] is None:
                self.cached_blocks[h] = block_id
                self.hash_of_block[block_id] = h
            if self.in_progress.get(h) is request:
                del self.in_progress[h]
        request.num_registered_blocks = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody holds (their K/V can no longer be trusted)."""
        for block_id in self.evictable:
            del self.cached_blocks[self.hash_of_block[block_id]]
            self.hash_of_block[block_id] = None
            self.free_block_ids.append(block_id)
        self.evictable.clear()

    def _take_block(self) -> int:
        if self.free_block_ids:
            return self.free_block_ids.popleft()
        block_id, _ = self.evictable.popitem(last=False)  # least recently used
        self.num_evictions += 1
        del self.cached_blocks[self.hash_of_block[block_id]]
        self.hash_of_block[block_id] = None
        return block_id

    def _prompt_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the full blocks a request may take from the cache: all but the one holding
        its last token, whose logits must be computed."""
        return self._hashes(request, (request.num_tokens - 1) // self.block_size)

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Chained hashes of the request's first `num_blocks` full blocks (memoized on it)."""
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            # The chain starts from the adapter's salt: KV computed under a LoRA adapter is its own.
            root = request.lora.cache_salt if request.lora is not None else b""
            hashes.append(block_hash(hashes[-1] if hashes else root, request.token_ids_slice(i * bs, (i + 1) * bs)))
        return hashes[:num_blocks]

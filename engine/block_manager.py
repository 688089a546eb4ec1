"""KV-cache block accounting: a free list, reference counts and block tables.

The K/V tensors themselves live in the model runner; this class only decides
which block ids each request owns. A slot is `block_id * block_size + offset`.
"""

from __future__ import annotations

from collections import deque

from engine.request import Request


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # How many block tables hold each block (>1 once blocks are shared).
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_needed(self, request: Request, num_total_tokens: int) -> int:
        """Blocks still to allocate so that `request` can hold `num_total_tokens` tokens."""
        return max(0, num_blocks_for(num_total_tokens, self.block_size) - len(request.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_block_ids)

    def allocate_slots(self, request: Request, num_total_tokens: int) -> bool:
        """Grow the request's block table to hold `num_total_tokens`; False if out of blocks."""
        needed = self.num_blocks_needed(request, num_total_tokens)
        if not self.can_allocate(needed):
            return False
        for _ in range(needed):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            request.block_table.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Release every block the request holds (blocks shared with others stay)."""
        for block_id in reversed(request.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        request.block_table = []

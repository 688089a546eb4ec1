"""oneDNN linear layers for the CPU: weights prepacked once into oneDNN's blocked layout.

PyTorch's default CPU GEMM picks slow paths for the skinny matrices of decoding
(a few to a few dozen rows against a large weight): prepacked oneDNN runs the
output head 2-3x faster at batch 5-32 on our 2-core machine. This is the same
prepack that torch.compile's CPU freezing uses. Float32 results equal the
default path's up to summation order. bfloat16 weights are prepacked too where
the CPU has bf16 instructions (AVX512-BF16, AMX; oneDNN picks the kernel at run
time): 1.7-2.5x PyTorch's bf16 matrix-vector product on an AVX512-BF16 EPYC,
single-stream decode of SmolLM2 59 -> 81 tok/s.

oneDNN builds (JIT-compiles) a kernel for every input shape it sees, about 2 ms
each, and keeps it in two caches of up to 1024 entries (ideep's and oneDNN's
own), about 0.5 MB each: with continuous batching nearly every step has a new
row count, so a server paid the build again and again and its memory grew by
hundreds of MB over hours. The layer therefore runs the GEMM only at a bounded
set of row counts (`padded_rows`: pad with zero rows, slice the result; inputs
longer than BLOCK_ROWS go in blocks), so the caches fill during warm-up and stay.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Batch-size hint for choosing the packed layout (decode batches are small).
_PACK_BATCH_HINT = 32
# Longer inputs run in blocks of this many rows (the GEMM is compute-bound well before).
BLOCK_ROWS = 256


def padded_rows(rows: int) -> int:
    """The row count the GEMM runs at for `rows` (<= BLOCK_ROWS) rows: exact up to 16, then
    the next multiple of 8 up to 64 and of 16 beyond: 34 shapes per weight, at most 7
    padding rows up to 64 and 15 beyond (small row counts are bound by reading the weight,
    so a few more rows cost little)."""
    if rows <= 16:
        return rows
    step = 8 if rows <= 64 else 16
    return -(-rows // step) * step


def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes prepacked for oneDNN: float32 everywhere; bfloat16 where the CPU has bf16
    instructions (AVX512-BF16, AMX), which oneDNN picks at run time (2x PyTorch's bf16
    matrix-vector product on an AVX512-BF16 EPYC; without them it would emulate)."""
    from engine.config import cpu_has_native_bf16

    return (torch.float32, torch.bfloat16) if cpu_has_native_bf16() else (torch.float32,)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()
        # Kept for parameter counting and for stages that report what they hold.
        self.num_parameters = weight.numel() + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if x.shape[0] > BLOCK_ROWS:
            return torch.cat([self._gemm(block) for block in x.split(BLOCK_ROWS)])
        return self._gemm(x)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            x = nn.functional.pad(x, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return out if padded == rows else out[:rows]


def prepack_linears(model: nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> int:
    """Swap every nn.Linear of a CPU model whose weight is of one of `dtypes` for a
    OneDNNLinear; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype in dtypes:
                setattr(parent, name, OneDNNLinear(child))
                swapped += 1
    return swapped

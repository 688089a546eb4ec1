"""A CPU model's weights and KV cache on 2 MiB pages (Linux transparent huge pages).

A decode step streams every weight once and, at long contexts or large batches, reads its
sequences' K/V blocks scattered over the cache: on 4 KiB pages that is a TLB miss every
4 KiB, and under a virtual machine each miss walks two page tables. Measured on a 2-core
AMD EPYC VM: random 6 KiB blocks read at 22 GB/s on 4 KiB pages and 38-41 on 2 MiB pages;
the embedded 4-bit model, by turns with and without (benchmarks/decode.py --pages-sweep and
alternating runs): one stream +2 % over 128 tokens, +7-15 % over 300, batch 32 +2-7 %.

malloc gives such pages only to allocations it maps itself and only where the kernel is
asked (madvise MADV_HUGEPAGE, which is what `transparent_hugepage/enabled = madvise`, the
common default, waits for); PyTorch asks only under THP_MEM_ALLOC_ENABLE and only for
allocations of 2 MiB and more, which most of a small model's packed layers are not. So the
runner packs its weights, in the order a step reads them, into arenas mapped here (a few
hundred MiB each, so loading never holds two copies of a large model), and maps the KV cache
the same way. Where the kernel has huge pages off (or this is not Linux) nothing changes.
"""

from __future__ import annotations

import functools
import logging
import mmap
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
# Largest arena the weights are copied into at once: the most memory placing them adds.
ARENA_BYTES = 256 << 20
# Each tensor starts on a cache line (as PyTorch's own allocations).
ALIGN = 64

_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """True where anonymous memory can be asked for huge pages (Linux, THP not `never`)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeroed CPU memory (uint8), 2 MiB-aligned, the kernel asked to back it by
    huge pages. The memory lives as long as any view of the tensor (torch.frombuffer keeps
    the mapping). Anonymous memory reads as zeros and takes memory only where it is first
    written (a 2 MiB page at a time): a KV cache is resident as far as its blocks have been
    used, as with torch.zeros."""
    size = _round_up(max(nbytes, 1), HUGE_PAGE)
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE  # to the first 2 MiB boundary (a multiple of 4 KiB)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, size)
    except OSError as exc:  # e.g. a kernel without THP: small pages, same memory
        logger.debug("madvise(MADV_HUGEPAGE) refused (%s)", exc)
    return whole[offset:offset + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """`count` zeroed CPU tensors of `shape` and `dtype`, one after another in one buffer (or
    `count` torch.zeros where huge pages cannot be asked for)."""
    if not available():
        return [torch.zeros(shape, dtype=dtype) for _ in range(count)]
    numel = torch.Size(shape).numel()
    nbytes = _round_up(numel * torch.empty((), dtype=dtype).element_size(), ALIGN)
    arena = buffer(nbytes * count)
    return [arena[i * nbytes:(i + 1) * nbytes].view(dtype)[:numel].view(shape) for i in range(count)]


class Arenas:
    """Tensors handed out one after another from huge-page arenas of ARENA_BYTES (a larger
    tensor gets one of its own): what a load writes straight where it stays (a GGUF file's
    packed layers), so place_model need not copy it, and the load never holds it twice.
    Where huge pages cannot be asked for, plain torch.empty."""

    def __init__(self) -> None:
        self.handed: dict[int, torch.Tensor] = {}  # id -> tensor, for place_model to leave alone
        self._arena: torch.Tensor | None = None
        self._used = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not available():
            return torch.empty(shape, dtype=dtype)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        size = _round_up(max(nbytes, 1), ALIGN)
        if self._arena is None or self._used + size > self._arena.numel():
            # Untouched, the rest of the last arena takes no memory (anonymous pages).
            self._arena, self._used = buffer(max(size, ARENA_BYTES)), 0
        tensor = self._arena[self._used:self._used + nbytes].view(dtype).view(shape)
        self._used += size
        self.handed[id(tensor)] = tensor
        return tensor


def _movable(tensor: torch.Tensor | None) -> bool:
    # oneDNN's prepacked weights (layout torch._mkldnn) keep their own memory; views into
    # another tensor (not contiguous) are left with it.
    return (tensor is not None and tensor.device.type == "cpu" and tensor.layout == torch.strided
            and tensor.is_contiguous() and tensor.numel() > 0)


def place_model(model: nn.Module, arenas: Arenas | None = None) -> int:
    """Copy the model's CPU parameters, buffers and other tensor attributes into huge-page
    arenas, in module order (the order a step reads them), and point the modules at the
    copies; returns the bytes placed (those `arenas` handed out, there already, included).
    A tensor held in several places (a tied embedding and head) stays one tensor. Call it
    before anything else keeps references to the tensors (the decode stack, LoRA)."""
    if not available():
        return 0
    order: list[torch.Tensor] = []  # each distinct tensor once, first seen first
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}  # id -> (module, name, kind)
    there = {} if arenas is None else arenas.handed
    for tensor in there.values():
        holders[id(tensor)] = []  # noted already: left where it is
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            _note(param, (module, name, "parameter"), order, holders)
        for name, buf in module.named_buffers(recurse=False):
            _note(buf, (module, name, "buffer"), order, holders)
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                _note(value, (module, name, "attribute"), order, holders)
    # Group by group, dropping each original as its copy takes its place (`order` would keep
    # them all alive until the end otherwise).
    placed, group, used = 0, [], 0
    order.reverse()
    while order:
        tensor = order.pop()
        size = _round_up(tensor.nbytes, ALIGN)
        if group and used + size > ARENA_BYTES:
            placed += _place_group(group, holders)
            group, used = [], 0
            return_freed_memory()  # the originals just dropped
        group.append(tensor)
        used += size
        del tensor
    if group:
        placed += _place_group(group, holders)
        del group
        return_freed_memory()
    return placed + sum(_round_up(t.nbytes, ALIGN) for t in there.values())


def return_freed_memory() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim). malloc keeps
    freed buffers below its mmap threshold, which rises with every large free (to 32 MiB):
    loading a model frees many such buffers (a GGUF layer's decoding, each weight replaced
    by its copy here), ~0.6 GiB kept over a 1B model's load without this. Elsewhere: nothing."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _note(tensor: torch.Tensor | None, holder, order: list, holders: dict) -> None:
    if not _movable(tensor):
        return
    if id(tensor) not in holders:
        holders[id(tensor)] = []
        order.append(tensor)
    holders[id(tensor)].append(holder)


def _place_group(group: list[torch.Tensor], holders: dict) -> int:
    total = sum(_round_up(t.nbytes, ALIGN) for t in group)
    arena = buffer(total)
    at = 0
    with torch.no_grad():
        for tensor in group:
            copy = arena[at:at + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor)
            at += _round_up(tensor.nbytes, ALIGN)
            for module, name, kind in holders[id(tensor)]:
                if kind == "parameter":
                    module._parameters[name].data = copy  # the same Parameter object: ties hold
                elif kind == "buffer":
                    module._buffers[name] = copy
                else:
                    module.__dict__[name] = copy
    return total

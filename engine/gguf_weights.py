"""Weights read straight from a GGUF file, and its 4-bit layers kept 4-bit.

The engine never writes a GGUF model out as float weights. The loader caches, once per
file, a small folder with the model's config, tokenizer and an index of the file's tensors
(offset, type, shape, and the Hugging Face checkpoint name transformers maps each to);
every load then memory-maps the file and dequantizes only the tensors (or tensor-parallel
slices) a runner needs, one at a time, into the runner's dtype.

With `quantization: auto` on the CPU, the linear layers and the token embedding whose
tensors are of the block types people download (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
K-quants Q4_K, Q5_K, Q6_K) are never dequantized: every such block is integers q times a
scale per 16 or 32 weights plus a minimum per 32 (`read_blocks`), the 4-bit ones exactly the
int4 kernel's group form (`CpuInt4Linear`), the others the int8 kernel's group records
(`CpuW8A8Linear`); the embedding reads its rows from its packed blocks (`PackedEmbedding`),
which a tied output head multiplies with. The extension packs those records straight from
the mapped file into the huge-page arenas the weights stay in (`file_linear`; a
tensor-parallel rank reads its rows, and its columns where they are whole blocks), without
the integer and scale tensors `read_blocks` makes (kept as the reference the tests hold it
to, and for the PyTorch int4 fallback).

Llama-architecture files store q and k with their rows permuted for llama.cpp's rotary
layout; transformers' tensor processors undo that (and the other families' quirks) for
dequantized tensors, and `_unpermute_rows` does it for the kept 4-bit blocks.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from engine.huge_pages import Arenas, return_freed_memory
from engine.quantization import CpuInt4Linear, CpuW8A8Linear, PackedEmbedding, _cpu_kernel, six_k_record

logger = logging.getLogger(__name__)

INDEX_FILE = "gguf_tensors.json"
# GGMLQuantizationType values of the block types kept packed.
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q4_K, _Q5_K, _Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
_Q4 = (_Q4_0, _Q4_1, _Q4_K)  # 4-bit weights: the int4 kernel's record
_PACKED = (*_Q4, _Q5_0, _Q5_1, _Q8_0, _Q5_K, _Q6_K)  # all kept packed: the others in the int8 kernel's records
_UNSIGNED = (*_Q4, _Q5_1, _Q5_K)  # q unsigned with a minimum: centred where the record is 6- or 8-bit
_BLOCK_BYTES = {_Q4_0: (32, 18), _Q4_1: (32, 20), _Q5_0: (32, 22), _Q5_1: (32, 24), _Q8_0: (32, 34),
                _Q4_K: (256, 144), _Q5_K: (256, 176), _Q6_K: (256, 210)}


def index_gguf(gguf_path: Path, hf_config) -> dict:
    """What loading needs of a GGUF file, without parsing it again (gguf's reader spends
    ~2 s on the embedded file's 49k-token vocabulary): the architecture, and per tensor
    its Hugging Face checkpoint name (transformers' mapping, over a model built on the
    meta device), type, shape (GGUF order: columns first) and byte range."""
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = gguf.GGUFReader(str(gguf_path))
    arch = str(reader.fields["general.architecture"].contents())
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    names = get_gguf_hf_weights_map(hf_model, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config.to_dict()))
    return {
        "arch": arch,
        "tensors": {t.name: {"hf_name": names.get(t.name), "type": int(t.tensor_type),
                             "shape": [int(n) for n in t.shape], "offset": int(t.data_offset),
                             "bytes": int(t.n_bytes)} for t in reader.tensors},
    }


def _f16(raw: np.ndarray) -> np.ndarray:
    """Float16 fields (2 bytes each, the last axis) as float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes [..., chunks, width] -> [..., chunks, 2, width]: each chunk's low nibbles, then its high."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit sub-block scales and minimums -> two [..., 8] arrays."""
    d, m, m_d = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


class Blocks(NamedTuple):
    """A tensor's blocks as integers and scales, w = q * scale + min (read_blocks)."""
    q: torch.Tensor  # int8 [rows, cols]
    scales: torch.Tensor  # float32 [rows, cols / 32] (Q6_K: [rows, cols / 16], one per 16 weights)
    mins: torch.Tensor | None = None  # float32 [rows, cols / 32]
    # Q6_K: its scales' factors as the file holds them, scale = super_scales * sub_scales (float32):
    super_scales: torch.Tensor | None = None  # float32 [rows, cols / 256], the float16 d
    sub_scales: torch.Tensor | None = None  # int8 [rows, cols / 16]


def read_blocks(data: np.ndarray, rows: int, cols: int, kind: int) -> Blocks:
    """The blocks of a [rows, cols] tensor of a type in `_PACKED` as integers and their scales
    (`Blocks`), with weight = q * scale + min exactly as gguf's dequantizer computes it
    (K-quants: scale = d * sub-scale and min = -(dmin * sub-min), in float32). Q4 types give q
    in 0..15, Q5 types 0..31 (Q5_0 as q - 16), Q6_K q - 32 (and d and its sub-scales), Q8_0
    its int8."""
    per, size = _BLOCK_BYTES[kind]
    b = np.ascontiguousarray(data).reshape(rows, cols // per, size)
    mins = factors = None
    if kind in (_Q4_0, _Q4_1):
        d = _f16(b[..., 0:2])
        mins = _f16(b[..., 2:4]) if kind == _Q4_1 else -8 * d  # exact: a power of two times a float16
        q = _nibbles(b[..., size - 16:], 16)  # byte j: weight j (low nibble) and j + 16 (high)
    elif kind in (_Q5_0, _Q5_1):
        d = _f16(b[..., 0:2])
        at = 2 if kind == _Q5_0 else 4
        high = (b[..., at:at + 4].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1
        q = _nibbles(b[..., at + 4:], 16).reshape(rows, -1, 32) | (high.astype(np.uint8) << 4)
        if kind == _Q5_0:
            q = q.astype(np.int8) - 16
        else:
            mins = _f16(b[..., 2:4])
    elif kind == _Q8_0:
        d, q = _f16(b[..., 0:2]), b[..., 2:].view(np.int8)
    elif kind in (_Q4_K, _Q5_K):
        sc, mn = _k_scales(b[..., 4:16])
        d, mins = _f16(b[..., 0:2])[..., None] * sc, -(_f16(b[..., 2:4])[..., None] * mn)
        if kind == _Q4_K:
            q = _nibbles(b[..., 16:].reshape(rows, -1, 4, 32), 32)  # 4 chunks of 32 bytes: sub-blocks 2c, 2c+1
        else:
            high = (b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [.., 8, 32]
            q = _nibbles(b[..., 48:].reshape(rows, -1, 4, 32), 32).reshape(rows, -1, 8, 32) | (high << 4)
    elif kind == _Q6_K:
        low = _nibbles(b[..., :128].reshape(rows, -1, 2, 64), 64)  # [.., 2 halves, 2, 64]
        high = (b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
        q = (low.reshape(rows, -1, 2, 4, 32) | (high << 4)).astype(np.int8) - 32
        factors = _f16(b[..., 208:210]), b[..., 192:208].view(np.int8)
        d = factors[0][..., None] * factors[1].astype(np.float32)
    else:
        raise ValueError(f"GGUF type {kind} is not kept packed")
    q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.int8).reshape(rows, cols))
    scales = torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32).reshape(rows, -1))
    if mins is not None:
        mins = torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32).reshape(rows, -1))
    if factors is None:
        return Blocks(q, scales, mins)
    return Blocks(q, scales, mins, torch.from_numpy(np.ascontiguousarray(factors[0]).reshape(rows, -1)),
                  torch.from_numpy(np.ascontiguousarray(factors[1]).reshape(rows, -1)))


def blocks_to_float(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                    *factors: torch.Tensor | None) -> torch.Tensor:
    """read_blocks' integers and scales back to float32 weights (gguf's floats, exactly);
    `factors` (a Blocks' Q6_K super- and sub-scales) are in `scales` already."""
    rows, cols = q.shape
    w = q.view(rows, scales.shape[1], -1).float() * scales[..., None]
    if mins is not None:
        w = w.view(rows, mins.shape[1], -1) + mins[..., None]
    return w.reshape(rows, cols)


def _unpermute_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (per head, the two rotary halves interleaved)."""
    dim = t.shape[0] // num_heads // 2
    return t.reshape(num_heads, dim, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class GGUFCheckpoint:
    """A GGUF file's tensors under Hugging Face checkpoint names, read from the
    memory-mapped file on demand (the index written by `index_gguf` says where)."""

    def __init__(self, gguf_path: Path, index: dict, hf_config) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = gguf_path
        self.arch = index["arch"]
        self.hf_config = hf_config
        self.config = hf_config.to_dict()
        self.processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=self.config)
        self.tensors = index["tensors"]
        self.by_hf_name = {t["hf_name"]: name for name, t in self.tensors.items() if t["hf_name"]}
        self.file = np.memmap(gguf_path, dtype=np.uint8, mode="r")

    @classmethod
    def open(cls, gguf_path: Path, folder: Path, hf_config) -> "GGUFCheckpoint":
        return cls(gguf_path, json.loads((folder / INDEX_FILE).read_text()), hf_config)

    def _raw(self, name: str) -> tuple[dict, np.ndarray]:
        entry = self.tensors[name]
        data = self.file[entry["offset"]: entry["offset"] + entry["bytes"]]
        rows = math.prod(entry["shape"][1:])
        return entry, data.reshape(rows, -1)

    def release(self, name: str) -> None:
        """Drop a tensor's pages of the file from this process (they stay in the page cache):
        read once into packed layers, they would otherwise count in the process's memory
        beside the packed copy for as long as the file stays mapped."""
        entry = self.tensors[name]
        self._drop(entry["offset"], entry["offset"] + entry["bytes"])

    def release_rows(self, name: str, start: int, stop: int) -> None:
        """release() for rows [start, stop) of a tensor (a large one packed a chunk at a time)."""
        entry = self.tensors[name]
        row_bytes = entry["bytes"] // math.prod(entry["shape"][1:])
        self._drop(entry["offset"] + start * row_bytes, entry["offset"] + stop * row_bytes)

    def _drop(self, begin: int, end: int) -> None:
        mapping = getattr(self.file, "_mmap", None)
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _permuted_heads(self, hf_name: str) -> int | None:
        """The heads whose rows the file permutes in this tensor (llama's q and k), else None."""
        if self.arch != "llama" or not (".q_proj." in hf_name or ".k_proj." in hf_name):
            return None
        heads = self.config["num_attention_heads"]
        return self.config.get("num_key_value_heads") or heads if ".k_proj." in hf_name else heads

    def rows_in_order(self, hf_name: str, rows: int) -> torch.Tensor:
        """Each Hugging Face row's row in the file (llama's q and k are permuted there)."""
        heads = self._permuted_heads(hf_name)
        order = torch.arange(rows)
        return order if heads is None else _unpermute_rows(order, heads)

    def window(self, part) -> tuple[str, int, torch.Tensor, int, int, torch.Tensor]:
        """Where a part (a tensor, or a tensor-parallel slice of it) lies in the file: (its GGUF
        name, type, its rows' bytes as a uint8 [rows, bytes] view of the mapped file, the first
        block of its columns, its number of columns, the file's row of each of its rows)."""
        hf_name = part if isinstance(part, str) else part.name
        name = self.by_hf_name[hf_name]
        entry, data = self._raw(name)
        cols, rows = entry["shape"][:2]
        order = self.rows_in_order(hf_name, rows)
        first = 0
        if not isinstance(part, str) and part.dim == 0:
            order = order[part.start:part.stop]
        elif not isinstance(part, str):
            first, cols = part.start // _BLOCK_BYTES[entry["type"]][0], part.stop - part.start
        with warnings.catch_warnings():  # read-only: the file's pages, read in place, never written
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data)
        return name, entry["type"], raw, first, cols, order

    def aligned(self, part) -> bool:
        """Whether a tensor-parallel column slice is made of whole blocks (rows always are)."""
        if isinstance(part, str) or part.dim == 0:
            return True
        per = _BLOCK_BYTES[self.tensors[self.by_hf_name[part.name]]["type"]][0]
        return part.start % per == 0 and part.stop % per == 0

    def blocks(self, hf_name: str) -> Blocks | None:
        """read_blocks of a checkpoint tensor the file holds in a type kept packed, else None
        (rows in Hugging Face's order: llama's q and k un-permuted)."""
        name = self.by_hf_name.get(hf_name)
        if name is None or self.tensors[name]["type"] not in _PACKED:
            return None
        entry, data = self._raw(name)
        cols, rows = entry["shape"][:2]
        found = read_blocks(data, rows, cols, entry["type"])
        self.release(name)
        heads = self._permuted_heads(hf_name)
        return found if heads is None else Blocks(*(None if t is None else _unpermute_rows(t, heads) for t in found))

    def tensor_type(self, hf_name: str) -> int | None:
        name = self.by_hf_name.get(hf_name)
        return None if name is None else self.tensors[name]["type"]

    def dequantize(self, hf_name: str) -> torch.Tensor:
        """One checkpoint tensor in float32, as transformers reads it from the file."""
        import gguf

        name = self.by_hf_name[hf_name]
        entry, data = self._raw(name)
        shape = entry["shape"][::-1]
        if entry["type"] in _PACKED:  # several times gguf's numpy dequantizer, and the same floats
            rows, cols = math.prod(shape[:-1]), shape[-1]
            weights = blocks_to_float(*read_blocks(data, rows, cols, entry["type"])).view(shape).numpy()
        else:
            weights = gguf.dequantize(np.asarray(data), gguf.GGMLQuantizationType(entry["type"])).reshape(shape)
        parsed = {"config": self.config, "tensors": {}}
        result = self.processor.process(weights=weights, name=name, tensor_key_mapping={name: hf_name},
                                        parsed_parameters=parsed)
        return torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))

    def read(self, parts: list, dtype: torch.dtype) -> dict:
        """Like loader.load_weights: the named tensors, or the rows or columns a
        `TensorSlice` names, in `dtype`, keyed by the part asked for."""
        from engine.loader import ModelLoadError

        missing = sorted({p if isinstance(p, str) else p.name for p in parts} - set(self.by_hf_name))
        if missing:
            raise ModelLoadError(f"tensors missing from {self.path.name} (or not mapped for its architecture "
                                 f"{self.arch!r}): {', '.join(missing[:5])}"
                                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        by_name: dict[str, list] = {}
        for part in parts:
            by_name.setdefault(part if isinstance(part, str) else part.name, []).append(part)
        tensors = {}
        for name, wanted in by_name.items():
            whole = self.dequantize(name)
            for part in wanted:
                if isinstance(part, str):
                    tensors[part] = whole.to(dtype)
                else:
                    window = whole[part.start:part.stop] if part.dim == 0 else whole[:, part.start:part.stop]
                    tensors[part] = window.to(dtype).contiguous()
        return tensors


def packed_weights(model: nn.Module, checkpoint: GGUFCheckpoint) -> set[str]:
    """Our parameter names of the linear layers whose every checkpoint part the file holds in
    a type kept packed (whole, or a tensor-parallel rank's rows or whole blocks of its
    columns), and of the token embedding where the file holds it so (whole, or a rank's
    vocabulary rows; its float weights are never made)."""
    # Without semline's CPU extension only the 4-bit types (PyTorch's int4 kernel) stay
    # packed, whole tensors only.
    kernel = _cpu_kernel()
    types = _PACKED if kernel is not None else _Q4
    slices = kernel is not None

    def kept_part(part) -> bool:
        name = part if isinstance(part, str) else part.name
        return (isinstance(part, str) or slices) and checkpoint.tensor_type(name) in types and checkpoint.aligned(part)
    modules = dict(model.named_modules())
    kept = set()
    for ours, parts in model.weight_map().items():
        module_name, _, kind = ours.rpartition(".")
        module = modules.get(module_name)
        if kind != "weight" or not isinstance(module, (nn.Linear, nn.Embedding)) or isinstance(parts[0], list):
            continue
        if isinstance(module, nn.Embedding) and (module_name != "embed_tokens" or types is _Q4):
            continue
        if all(kept_part(p) for p in parts):
            kept.add(ours)
    return kept


def packed_form(found: list[tuple]) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What a packed layer holds for its parts' read_blocks (its rows, in order): (bits of its
    record's weights: 4, 5, 6 or 8; q, scales, minimums or None), w = q * scale + min, scales and
    minimums rounded to float16 as the kernels hold them. 4-bit (the int4 kernel's record)
    where every part is (Q4_0, Q4_1, Q4_K: per group of 32); else the int8 kernel's records
    with the parts' scales (per 16 weights where a part has them, Q6_K) and minimums (where a
    part has them; 0 for the others), unsigned parts (Q5_1, Q5_K: q in 0..31; 4-bit ones mixed
    in) centred on zero with their minimum taking the offset: the int8 activations' rounding
    errors then meet weights half as large (a Q5_K_M file's perplexity 1.05 % above
    llama.cpp's -> 0.2 % below). Where every q is in -16..15 with a scale per group (Q4 and Q5
    types) the record is 5-bit; else where every q is in -32..31 (all but Q8_0) the scales are
    per half group and the record 6-bit: with the file's own scales where every part is Q6_K
    (their float16 d and int8 sub-scales: six_k_record). Exact for Q4_0, Q4_1, Q5_0, Q6_K alone
    and Q8_0 (float16 d and m in the file); a K-quant's d * sub-scale, and a centred minimum,
    round to float16 (at most 2^-11 of it)."""
    if _six_k(found):
        return 6, torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found]), None
    found = [tuple(f[:3]) for f in found]
    cols = found[0][0].shape[1]
    if all(int(q.min()) >= 0 and int(q.max()) <= 15 and m is not None and s.shape[1] * 32 == cols
           for q, s, m in found):
        q, d, m = (torch.cat([f[i] for f in found]) for i in range(3))
        return 4, q, d.half().float(), m.half().float()
    found = [(q, s, m) if m is None else _centred(q, s, m) for q, s, m in found]
    mins = None
    if any(m is not None for _, _, m in found):
        mins = torch.cat([m if m is not None else torch.zeros(q.shape[0], cols // 32) for q, _, m in found])
        mins = mins.half().float()
    if all(int(q.min()) >= -16 and int(q.max()) <= 15 and s.shape[1] * 32 == cols for q, s, _ in found):
        return 5, torch.cat([q for q, _, _ in found]), torch.cat([s for _, s, _ in found]).half().float(), mins
    six_bit = all(int(q.min()) >= -32 and int(q.max()) <= 31 for q, _, _ in found)
    halves = six_bit or any(s.shape[1] * 16 == cols for _, s, _ in found)
    scales = torch.cat([s.repeat_interleave(2, dim=1) if halves and s.shape[1] * 32 == cols else s
                        for _, s, _ in found]).half().float()
    return 6 if six_bit else 8, torch.cat([q for q, _, _ in found]), scales, mins


def packed_linear(found: list[tuple], bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """One linear layer of semline's CPU kernels on its parts' read_blocks (packed_form):
    4-bit; 5-bit where every weight is in -16..15 with a scale per group (Q5_0, the centred
    Q5_1 and Q5_K, Q4 types mixed in); 6-bit where every weight is in -32..31 (Q6_K, alone or
    with those); else 8-bit (Q8_0, and a layer with Q8_0 parts)."""
    if _six_k(found):
        q, d, sub = (torch.cat([f[i] for f in found]) for i in (0, 3, 4))
        return CpuW8A8Linear.from_record(six_k_record(q, d, sub), q.shape[0], q.shape[1], bias, dtype)
    bits, q, scales, mins = packed_form(found)
    if bits == 4:
        return CpuInt4Linear(q.to(torch.int32), scales, mins, bias)
    return CpuW8A8Linear(q, None, bias, dtype, group_scales=scales, mins=mins, bits=bits)


def _six_k(found: list[tuple]) -> bool:
    """Whether every part's blocks are Q6_K's (read_blocks gave their scales' factors)."""
    return all(len(f) > 4 and f[4] is not None for f in found)


def record_bytes(kinds: list[int]) -> int:
    """The kernel record packed_form chooses for parts of these GGUF types: 320 (4-bit), 352 or
    384 (5-bit, without or with minimums), 420 (6-bit with Q6_K's own scales: every part Q6_K),
    448 or 480 (6-bit), 544, 576 or 608 (8-bit: group scales, half-group scales, halves and
    minimums)."""
    if all(k in _Q4 for k in kinds):
        return 320
    if all(k == _Q6_K for k in kinds):
        return 420
    mins = any(k in _UNSIGNED for k in kinds)
    if _Q8_0 not in kinds and _Q6_K not in kinds:
        return 384 if mins else 352
    if _Q8_0 not in kinds:
        return 480 if mins else 448
    return 608 if mins else 576 if _Q6_K in kinds else 544


# A one-part layer of more rows than this (an embedding, an output head) is packed so many rows
# at a time, the file's pages of each chunk dropped once it is packed: the whole tensor's pages
# and its pack never count together (1B Q4_K_M: peak RSS growth over a load 825 -> 761 MiB, the
# file 638 MiB).
CHUNK_ROWS = 8192


def file_linear(checkpoint: GGUFCheckpoint, parts: list, bias: torch.Tensor | None, dtype: torch.dtype,
                arenas: Arenas | None = None) -> nn.Module:
    """One linear layer of semline's CPU kernels over its parts' blocks, packed by the extension
    straight from the mapped file (the same records packed_linear makes of read_blocks, without
    any copy of the tensors between), into `arenas` where given (huge pages, where it stays);
    each part's file pages are dropped after (a large one-part layer's chunk by chunk)."""
    kernel = _cpu_kernel()
    windows = [checkpoint.window(p) for p in parts]
    cols = {w[4] for w in windows}
    if len(cols) != 1:
        raise ValueError(f"the parts of one layer have different widths: {sorted(cols)}")
    kinds = [w[1] for w in windows]
    record = record_bytes(kinds)
    row_part = torch.cat([torch.full((len(w[5]),), i, dtype=torch.int64) for i, w in enumerate(windows)])
    row_src = torch.cat([w[5] for w in windows])
    k = cols.pop()
    shape = (-(-len(row_src) // 16), k // 32, record)
    out_dtype = torch.uint8 if record == 320 else torch.int8
    packed = torch.empty(shape, dtype=out_dtype) if arenas is None else arenas.empty(shape, out_dtype)
    raws, firsts = [w[2] for w in windows], [w[3] for w in windows]
    step = CHUNK_ROWS if len(windows) == 1 else max(1, len(row_src))  # CHUNK_ROWS: whole 16-row blocks
    for start in range(0, len(row_src), step):
        stop = min(start + step, len(row_src))
        kernel.gguf_pack(raws, kinds, firsts, row_part[start:stop], row_src[start:stop], k, record,
                         packed[start // 16: -(-stop // 16)])
        if stop < len(row_src):
            rows = row_src[start:stop]
            checkpoint.release_rows(windows[0][0], int(rows.min()), int(rows.max()) + 1)
    for name in {w[0] for w in windows}:
        checkpoint.release(name)
    if record == 320:
        return CpuInt4Linear.from_record(packed, len(row_src), k, bias)
    return CpuW8A8Linear.from_record(packed, len(row_src), k, bias, dtype)


def _centred(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> tuple:
    """w = q * s + m with q in 0..2c-1, as (q - c) * s + (m + c * s) (per group of 32)."""
    centre = 16 if int(q.max()) > 15 else 8
    return (q - centre).to(torch.int8), scales, mins + centre * scales


def keep_gguf_precision(model: nn.Module, checkpoint: GGUFCheckpoint, kept: set[str],
                        arenas: Arenas | None = None) -> int:
    """Make the layers `packed_weights` chose layers of semline's int4/int8 kernels on the
    file's blocks (their float weights were never loaded; biases were): linear layers, and the
    token embedding as rows read from its packed blocks (the output head tied to it runs on
    the same pack), packed into `arenas` where given; returns how many modules were replaced.
    CPU only."""
    weight_map = model.weight_map()
    modules = dict(model.named_modules())
    in_place = _cpu_kernel() is not None

    def layer(parts: list, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
        if in_place:
            return file_linear(checkpoint, parts, bias, dtype, arenas)
        return packed_linear([checkpoint.blocks(p) for p in parts], bias, dtype)

    replaced = 0
    for ours in [name for name in weight_map if name in kept and name != "embed_tokens.weight"]:  # step order
        module_name = ours.rpartition(".")[0]
        module = modules[module_name]
        linear = layer(weight_map[ours], module.bias, module.weight.dtype)
        parent, _, child = module_name.rpartition(".")
        setattr(modules[parent] if parent else model, child, linear)
        replaced += 1
        return_freed_memory()  # a layer's decoding buffers
    if "embed_tokens.weight" in kept:
        embedding = model.embed_tokens
        table = layer(weight_map["embed_tokens.weight"][:1], None, embedding.weight.dtype)
        head = getattr(model, "lm_head", None)
        tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
        if tied:
            model.lm_head = table
        model.embed_tokens = PackedEmbedding(table, embedding.weight.dtype, owner=not tied)
        replaced += 1 + tied
    logger.info("kept %d GGUF layers of %s packed at the file's precision", replaced, checkpoint.path.name)
    return replaced

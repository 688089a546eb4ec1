"""Weights read straight from a GGUF file, and its 4-bit layers kept 4-bit.

The engine never writes a GGUF model out as float weights. The loader caches, once per
file, a small folder with the model's config, tokenizer and an index of the file's tensors
(offset, type, shape, and the Hugging Face checkpoint name transformers maps each to);
every load then memory-maps the file and dequantizes only the tensors (or tensor-parallel
slices) a runner needs, one at a time, into the runner's dtype.

With `quantization: auto` on the CPU, the linear layers whose tensors are Q4_1 or Q4_0 are
never dequantized: a Q4_1 block is 32 weights q (0..15) with a float16 scale d and minimum
m, w = q * d + m, which is exactly the int4 kernel's group form (a Q4_0 block has no m:
w = (q - 8) * d, the same form with m = -8 d), so they become `CpuInt4Linear`s. A Q8_0 embedding (and the head
tied to it) is stored int8, 8-bit as the file holds it.

Llama-architecture files store q and k with their rows permuted for llama.cpp's rotary
layout; transformers' tensor processors undo that (and the other families' quirks) for
dequantized tensors, and `_unpermute_rows` does it for the kept 4-bit blocks.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.quantization import CpuInt4Linear, Int8Embedding, int8_linear, quantize_rows, tie_int8_embedding

logger = logging.getLogger(__name__)

INDEX_FILE = "gguf_tensors.json"
Q4_1_BLOCK = 32
_Q4_1_BYTES = 20  # float16 d, float16 m, 16 bytes of nibbles
_Q4_0_BYTES = 18  # float16 d, 16 bytes of nibbles
_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8  # GGMLQuantizationType values
_Q4 = (_Q4_0, _Q4_1)  # the types kept 4-bit


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


def read_q4(data: np.ndarray, rows: int, cols: int, kind: int = _Q4_1) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Q4_1 (or Q4_0) blocks of a [rows, cols] tensor -> (q int32 [rows, cols], scales,
    minimums [rows, cols / 32]); a Q4_0 block's minimum is -8 d. In a block, byte j holds
    weight j (low nibble) and j + 16 (high)."""
    size = _Q4_1_BYTES if kind == _Q4_1 else _Q4_0_BYTES
    blocks = np.ascontiguousarray(data).reshape(rows, cols // Q4_1_BLOCK, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == _Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        m = -8 * d  # exact: a power of two times a float16
    nibbles = blocks[..., size - 16:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols).astype(np.int32)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m)


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

    def q4(self, hf_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(q, scales, minimums) of a checkpoint tensor the file holds as Q4_1 or Q4_0, else None."""
        name = self.by_hf_name.get(hf_name)
        if name is None or self.tensors[name]["type"] not in _Q4:
            return None
        entry, data = self._raw(name)
        cols, rows = entry["shape"][:2]
        q, d, m = read_q4(data, rows, cols, entry["type"])
        if self.arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = self.config["num_attention_heads"]
            if ".k_proj." in hf_name:
                heads = self.config.get("num_key_value_heads") or heads
            q, d, m = (_unpermute_rows(t, heads) for t in (q, d, m))
        return q, d, m

    def tensor_type(self, hf_name: str) -> int | None:
        name = self.by_hf_name.get(hf_name)
        return None if name is None else self.tensors[name]["type"]

    def dequantize(self, hf_name: str) -> torch.Tensor:
        """One checkpoint tensor in float32, as transformers reads it from the file."""
        import gguf

        name = self.by_hf_name[hf_name]
        entry, data = self._raw(name)
        shape = entry["shape"][::-1]
        if entry["type"] in _Q4:  # ~10x gguf's numpy dequantizer, and the same floats
            rows, cols = math.prod(shape[:-1]), shape[-1]
            q, d, m = read_q4(data, rows, cols, entry["type"])
            weights = (q.view(rows, -1, Q4_1_BLOCK) * d[..., None] + m[..., None]).view(shape).numpy()
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


def int4_weights(model: nn.Module, checkpoint: GGUFCheckpoint) -> set[str]:
    """Our parameter names of the linear layers whose every checkpoint part the file holds as
    Q4_1 or Q4_0 (whole tensors: tensor-parallel slices stay on the float path)."""
    modules = dict(model.named_modules())
    kept = set()
    for ours, parts in model.weight_map().items():
        module_name, _, kind = ours.rpartition(".")
        if kind != "weight" or not isinstance(modules.get(module_name), nn.Linear) or isinstance(parts[0], list):
            continue
        if all(isinstance(p, str) and checkpoint.tensor_type(p) in _Q4 for p in parts):
            kept.add(ours)
    return kept


def keep_gguf_precision(model: nn.Module, checkpoint: GGUFCheckpoint, kept: set[str]) -> int:
    """Make the linear layers `int4_weights` chose exact int4 layers from the file's blocks
    (their float weights were never loaded; biases were), and a Q8_0 embedding (with the
    head tied to it) int8; returns how many modules were replaced. CPU only."""
    weight_map = model.weight_map()
    modules = dict(model.named_modules())
    for ours in sorted(kept):
        module_name = ours.rpartition(".")[0]
        found = [checkpoint.q4(p) for p in weight_map[ours]]
        q, d, m = (torch.cat([f[i] for f in found]) for i in range(3))
        parent, _, child = module_name.rpartition(".")
        setattr(modules[parent] if parent else model, child, CpuInt4Linear(q, d, m, modules[module_name].bias))
    replaced = len(kept) + _int8_embedding(model, checkpoint)
    logger.info("kept %d GGUF 4-bit/8-bit layers of %s at the file's precision", replaced, checkpoint.path.name)
    return replaced


def _int8_embedding(model: nn.Module, checkpoint: GGUFCheckpoint) -> int:
    """A Q8_0 token embedding stays 8-bit: int8 rows with per-row scales (and an untouched
    float head tied to it becomes int8 the same way)."""
    embedding = getattr(model, "embed_tokens", None)
    if not isinstance(embedding, nn.Embedding) or checkpoint.tensor_type("model.embed_tokens.weight") != _Q8_0:
        return 0
    weight = embedding.weight
    q, scales = quantize_rows(weight)
    model.embed_tokens = Int8Embedding(q, scales, weight.dtype)
    replaced = 1
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight is weight:
        # The head through the W8A8 kernel: perplexity unchanged within 0.01 % here.
        model.lm_head = int8_linear(q, scales, None, weight.device, weight.dtype, int8_activations=True)
        tie_int8_embedding(model.embed_tokens, model.lm_head)
        replaced += 1
    return replaced

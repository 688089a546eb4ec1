"""GGUF files of the types people download, at the sizes they run, for the benchmarks.

- `quantized(source, kind)`: the file llama.cpp's own quantizer (`llama-quantize`, built by
  benchmarks/build_llama_cpp.sh) writes from `source` in `kind` (Q4_K_M, Q5_K_M, Q6_K, Q8_0...),
  with llama.cpp's own mix of tensor types; kept under $SEMLINE_CACHE/gguf.
- `random_llama(shape)`: a Llama model of a real model's shape (`1b`: Llama-3.2-1B, `8b`:
  Llama-3.1-8B) with random weights, written in llama.cpp's layout as Q8_0 (random int8 blocks
  with one float16 scale: written at disk speed, no quantizer run) with the embedded
  SmolLM2's tokenizer (so its vocabulary: 49,152 tokens, where Llama 3 has 128,256: the
  1B's head reads 100M weights a step instead of 263M). `quantized` turns it into the other
  types (llama-quantize --allow-requantize).

    .venv/bin/python benchmarks/gguf_models.py 1b Q4_K_M     # prints the file's path
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.loader import embedded_gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name: (hidden, layers, intermediate, heads, kv heads, tied embedding)
SHAPES = {"1b": (2048, 16, 8192, 32, 8, True), "8b": (4096, 32, 14336, 32, 8, False)}


def cache_dir() -> Path:
    folder = Path(os.environ.get("SEMLINE_CACHE") or Path.home() / ".cache" / "semline") / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def llama_cpp_bin(kind: str | None = None) -> Path:
    """llama.cpp's binaries folder (built once by build_llama_cpp.sh, with llama-quantize):
    the `kind` of build asked for (native, noamx), else the script's own choice (noamx on a
    CPU that lists AMX, or SEMLINE_LLAMA_BUILD)."""
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_llama_cpp.sh"), *([kind] if kind else [])],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return Path(out)


def llama_cpp_build(folder: Path) -> str:
    """The build a binaries folder holds (native, noamx): what every result records."""
    return folder.parent.name.removeprefix("build-")


def run_llama_cpp(binary: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    folder = llama_cpp_bin()
    env = dict(os.environ, LD_LIBRARY_PATH=str(folder))
    return subprocess.run([str(folder / binary), *args], env=env, check=True, capture_output=True, text=True,
                          **kwargs)


def quantized(source: Path, kind: str) -> Path:
    """`source` as llama-quantize writes it in `kind` (once; cached by name)."""
    base = re.sub(r"[-.]Q[0-9].*$", "", source.stem)  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
    target = cache_dir() / f"{base}-{kind}.gguf"
    if not target.exists():
        partial = target.with_suffix(".partial")
        run_llama_cpp("llama-quantize", "--allow-requantize", str(source), str(partial), kind, "2")
        partial.rename(target)
    return target


def _tokenizer_fields(writer, reader) -> None:
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)


def write_llama_gguf(path: Path, shape: tuple, blocks, name: str = "random llama") -> None:
    """A Llama model of `shape` (hidden, layers, intermediate, heads, kv heads, tied) written
    as llama.cpp lays one out, with the embedded SmolLM2's tokenizer; `blocks(name, rows,
    cols)` gives each matrix as (GGMLQuantizationType, its bytes [rows, bytes per row]), one
    tensor at a time (bounded memory at 8B); norms are ones."""
    import gguf

    hidden, layers, inter, heads, kv_heads, tied = shape
    head_dim = hidden // heads
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    vocab = int(reader.fields["llama.vocab_size"].contents())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(head_dim)
    _tokenizer_fields(writer, reader)
    # (name, rows, columns); None columns: a float32 norm of `rows` values.
    tensors = [("token_embd.weight", vocab, hidden), ("output_norm.weight", hidden, None)]
    if not tied:
        tensors.append(("output.weight", vocab, hidden))
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", hidden, None), (f"blk.{i}.ffn_norm.weight", hidden, None),
                    (f"blk.{i}.attn_q.weight", hidden, hidden), (f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden),
                    (f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden),
                    (f"blk.{i}.attn_output.weight", hidden, hidden), (f"blk.{i}.ffn_gate.weight", inter, hidden),
                    (f"blk.{i}.ffn_up.weight", inter, hidden), (f"blk.{i}.ffn_down.weight", hidden, inter)]
    kinds = {}
    for tensor, rows, cols in tensors:
        if cols is None:
            writer.add_tensor_info(tensor, [rows], np.dtype(np.float32), rows * 4)
        else:
            kinds[tensor] = gguf.GGMLQuantizationType(blocks(tensor, 1, cols)[0])
            per, size = gguf.GGML_QUANT_SIZES[kinds[tensor]]
            writer.add_tensor_info(tensor, [rows, cols // per * size], np.dtype(np.uint8), rows * cols // per * size,
                                   raw_dtype=kinds[tensor])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, rows, cols in tensors:
        writer.write_tensor_data(np.ones(rows, dtype=np.float32) if cols is None else blocks(tensor, rows, cols)[1])
    writer.close()


def random_llama(shape: str, seed: int = 0) -> Path:
    """A random-weight Llama of `shape` as a Q8_0 GGUF (once; cached by name): random int8
    weights in +-127 d with d = 0.02 / 73 (std ~0.02, as trained Llamas' are)."""
    import gguf

    target = cache_dir() / f"random-llama-{shape}-Q8_0.gguf"
    if target.exists():
        return target
    rng = np.random.default_rng(seed)
    scale = np.frombuffer(np.float16(0.02 / 73).tobytes(), dtype=np.uint8)

    def q8_0(name: str, rows: int, cols: int):
        blocks = np.empty((rows, cols // 32, 34), dtype=np.uint8)
        blocks[..., :2] = scale
        blocks[..., 2:] = rng.integers(-127, 128, size=(rows, cols // 32, 32), dtype=np.int8).view(np.uint8)
        return gguf.GGMLQuantizationType.Q8_0, blocks.reshape(rows, -1)

    partial = target.with_suffix(".partial")
    write_llama_gguf(partial, SHAPES[shape], q8_0, f"random llama {shape}")
    partial.rename(target)
    return target


def model_file(shape: str, kind: str) -> Path:
    """The file of `shape` ("135m": the embedded SmolLM2, or a SHAPES key) in `kind`."""
    source = embedded_gguf_path() if shape == "135m" else random_llama(shape)
    return source if kind in ("Q4_1" if shape == "135m" else "Q8_0",) else quantized(source, kind)


if __name__ == "__main__":
    print(model_file(sys.argv[1], sys.argv[2]))

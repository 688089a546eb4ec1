"""LoRA adapters served beside the base model: token-identical to PEFT on Hugging Face, mixed
with each other and the base in one step, evicted and reloaded as slots run out."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.lora import LoRAError, LoRAStep
from tests.conftest import DEVICE

NUM_NEW_TOKENS = 20
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (seed, targets, rank, rslora); "qv" is the issue's: q and v projections only.
ADAPTERS = {"qv": (1, ["q_proj", "v_proj"], 8, False), "all": (2, ALL_PROJECTIONS, 8, False),
            "r16": (3, ["q_proj", "v_proj", "down_proj"], 16, True), "mlp": (4, ["gate_proj", "up_proj"], 4, False)}


def build_adapter(model_dir, folder, seed: int, targets: list[str], rank: int, rslora: bool = False):
    """A PEFT LoRA adapter with random A and B (B is zero at PEFT's init: it would change
    nothing) on a fresh copy of the base model, saved to `folder`; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                            use_rslora=rslora, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model.to(DEVICE).eval()


def hf_greedy(model, ids: list[int], num_tokens: int = NUM_NEW_TOKENS) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=DEVICE), max_new_tokens=num_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return [encode("The capital of France is"),
            # Over two KV blocks: the prefix cache must keep the base's blocks from the adapters'.
            encode("Once upon a time, in a kingdom by the sea, there lived an old fisherman and his wife. "
                   "Every morning he rowed out before dawn and every evening he came home with his nets.")]


@pytest.fixture(scope="module")
def adapters(llm, hf_dir, hf_model, prompts, tmp_path_factory):
    """name -> (folder, {prompt index: PEFT's greedy tokens}); "base" -> HF's own."""
    built = {"base": (None, {i: hf_greedy(hf_model, p) for i, p in enumerate(prompts)})}
    for name, (seed, targets, rank, rslora) in ADAPTERS.items():
        folder = tmp_path_factory.mktemp(f"lora-{name}")
        model = build_adapter(hf_dir, folder, seed, targets, rank, rslora)
        built[name] = folder, {i: hf_greedy(model, p) for i, p in enumerate(prompts)}
        del model
    for name in ADAPTERS:  # every adapter changes the output, or the test would prove nothing
        assert built[name][1] != built["base"][1], name
    return built


@pytest.fixture(scope="module")
def lora_llm(make_llm, adapters):
    """Three slots, three adapters kept parsed: a fourth adapter must wait, evict, reload."""
    return make_llm(lora_modules={n: str(adapters[n][0]) for n in ("qv", "all", "r16")},
                    max_loras=3, max_cpu_loras=3, max_lora_rank=16)


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def _run(engine, jobs: list[tuple[int, str | None]], prompts) -> list[list[int]]:
    """Submit every (prompt index, adapter) before the first step; tokens in job order."""
    ids = [engine.add_request(prompts[i], _params(), lora=name).request_id for i, name in jobs]
    done = {}
    first_step_adapters = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.token_ids
        if first_step_adapters is None:
            first_step_adapters = sorted(engine.loras.resident)
    return [done[i] for i in ids], first_step_adapters


def test_adapters_and_base_share_a_step_token_identical_to_peft(lora_llm, adapters, prompts):
    jobs = [(i, name) for i in range(len(prompts)) for name in (None, "qv", "all", "r16")]
    tokens, first_step = _run(lora_llm.engine, jobs, prompts)
    assert first_step == ["all", "qv", "r16"]  # the first step ran all three beside the base
    for (i, name), got in zip(jobs, tokens):
        assert got == adapters[name or "base"][1][i], (name, i)
    # The base's prompt blocks were cached first; an adapter's run of the same prompt did
    # not reuse them (its hashes are salted), or its tokens would be wrong above.
    assert lora_llm.engine.block_manager.num_used_blocks == 0


def test_more_adapters_than_slots_wait_evict_and_reload(lora_llm, adapters, prompts):
    engine = lora_llm.engine
    lora_llm.add_lora("mlp", str(adapters["mlp"][0]))
    loads, disk_loads = engine.loras.num_loads, engine.loras.num_disk_loads
    jobs = [(0, name) for name in ("qv", "all", "r16", "mlp", None)] + [(1, "mlp"), (1, "qv")]
    tokens, _ = _run(engine, jobs, prompts)
    assert engine.loras.num_loads > loads  # "mlp" waited, then took a slot another adapter had
    # Then one at a time round the four: with three slots and three kept parsed, least
    # recently used first, each needs a slot and some are read again from their folders.
    cycle = [(1, name) for name in ("qv", "all", "r16", "mlp", "qv", "all")]
    for job in cycle:
        tokens += _run(engine, [job], prompts)[0]
    for (i, name), got in zip(jobs + cycle, tokens):
        assert got == adapters[name or "base"][1][i], (name, i)
    assert engine.loras.num_disk_loads > disk_loads
    assert len(engine.loras.resident) == 3


def test_unload_and_reload_by_name(lora_llm, adapters, prompts):
    engine = lora_llm.engine
    lora_llm.remove_lora("qv")
    assert "qv" not in engine.lora_names()
    with pytest.raises(LoRAError, match="no LoRA adapter named 'qv'"):
        engine.add_request(prompts[0], _params(), lora="qv")
    with pytest.raises(LoRAError, match="already loaded"):
        lora_llm.add_lora("all", str(adapters["all"][0]))
    # The name now serves another folder: nothing of the old adapter (slot, cached blocks) leaks.
    lora_llm.add_lora("qv", str(adapters["mlp"][0]))
    [out] = lora_llm.generate([prompts[1]], _params(), lora="qv")
    assert out.token_ids == adapters["mlp"][1][1]


def test_bad_adapters_are_refused_with_the_reason(lora_llm, adapters, tmp_path, llm):
    import json
    import shutil

    with pytest.raises(LoRAError, match="has no adapter_config.json"):
        lora_llm.add_lora("missing", str(tmp_path))
    big = tmp_path / "big"
    shutil.copytree(adapters["r16"][0], big)
    with pytest.raises(LoRAError, match="rank 16; this server takes at most max_lora_rank=8"):
        from engine.lora import load_adapter
        load_adapter("big", big, max_rank=8)
    dora = tmp_path / "dora"
    shutil.copytree(adapters["qv"][0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora=True is not supported"):
        lora_llm.add_lora("dora", str(dora))
    from engine.llm_engine import RequestError

    with pytest.raises(RequestError, match="started without LoRA"):  # the shared engine has none
        llm.engine.add_request([1, 2, 3], _params(), lora="qv")


def test_step_segments_long_runs_own_pairs_short_runs_stacked():
    # Two decode rows of slots 0 and 1, a base row, a 20-token prefill of slot 2, a lone
    # decode row of slot 1 and a base-only prefill.
    ranges = [(0, 1, 0), (1, 2, 1), (3, 23, 2), (23, 24, 1)]
    step = LoRAStep(ranges, torch.device("cpu"))
    kinds = [(s[0], s[1], s[2]) if s[0] == "own" else (s[0], s[1], s[2].tolist()) for s in step.segments]
    assert kinds == [("mixed", slice(0, 2), [0, 1]), ("own", 2, slice(3, 23)), ("own", 1, slice(23, 24))]
    columns = torch.tensor([0, 0, 1, 2])
    assert step.mask(0, ((0, 2), (1, 1), (2, 1)), columns, torch.float32).tolist() == [[1, 1, 0, 0], [0, 0, 1, 0]]

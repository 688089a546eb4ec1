"""Tensor parallelism on a local Ray cluster (CPU, gloo): each layer split over worker actors,
outputs token-identical to one process, each worker holding only its share."""

from __future__ import annotations

import pytest

from cluster.executors import ParallelConfig, RayExecutor, ray_executor
from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.models.layers import MoE, RMSNorm
from engine.models.linear import OneDNNLinear
from tests.cluster.conftest import step
from tests.engine.test_families import build_tiny_model

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a kingdom by the sea, there lived an old fisherman and his wife, who " * 2,
           "List the planets of the solar system in order from the sun:"]
# Greedy rows travel from rank 0 as token ids; one with penalties and one with logprobs need
# whole (gathered) logits rows, so steps mix both kinds.
PARAMS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **extra) for n, extra in
          ((16, {"repetition_penalty": 1.3}), (24, {}), (12, {"logprobs": 2}), (28, {}))]
# Few KV blocks and a small step budget: prompts are chunked, requests preempted.
CONFIG = dict(device="cpu", dtype="float32", num_kv_blocks=6, max_num_batched_tokens=24, num_threads=1)


@pytest.fixture(scope="module")
def models(llm, tmp_path_factory):
    """Tiny random-weight folders, built once: (folder, the single-process engine's tokens)."""
    built = {}

    def get(family: str):
        if family not in built:
            folder = tmp_path_factory.mktemp(family)
            build_tiny_model(family, folder, llm.engine.model_dir)
            single = LLM(model=str(folder), **CONFIG)
            built[family] = folder, [o.token_ids for o in single.generate(PROMPTS, PARAMS)], single
        return built[family]

    return get


def _replicated(model) -> int:
    """Parameters every rank holds whole: norms and MoE routers."""
    total = 0
    for module in model.modules():
        if isinstance(module, RMSNorm):
            total += module.weight.numel()
        elif isinstance(module, MoE):
            gate = module.gate
            total += gate.num_parameters if isinstance(gate, OneDNNLinear) else gate.weight.numel()
    return total


@pytest.mark.parametrize("family,tp", [("phi3", 2), ("qwen3_moe", 2), ("gemma3", 4)])
def test_tensor_parallel_matches_one_process(ray_cluster, models, family, tp):
    """Phi-3 (fused qkv/gate_up checkpoint tensors sliced per rank, sliding window), Qwen3-MoE
    (every expert's columns split, routers replicated) and Gemma 3 over 4 ranks (2 KV heads:
    each rank keeps the one its heads read; tied head split by vocabulary)."""
    folder, want, single = models(family)
    parallel = LLM(model=str(folder), **CONFIG, executor=ray_executor, tensor_parallel_size=tp)
    runner = parallel.engine.runner
    try:
        assert [o.token_ids for o in parallel.generate(PROMPTS, PARAMS)] == want
        assert parallel.engine.stats.num_preemptions > 0
        workers = runner.worker_info()
        assert [w["rank"] for w in workers] == list(range(tp)) and len({w["pid"] for w in workers}) == tp
        assert {w["all_reduce"] for w in workers} == {"shared_memory"}  # CPU ranks on one host
        # Each rank holds 1/tp of everything but the norms and routers (whole) and the k/v
        # projections (the share of its KV heads, which may be more than 1/tp).
        args = runner.args
        kv_heads = max(1, args.num_kv_heads // tp)
        assert all(w["num_kv_heads"] == kv_heads for w in workers)
        whole = single.engine.runner.num_parameters
        replicated = _replicated(single.engine.runner.model)
        kv = args.num_layers * 2 * args.num_kv_heads * args.head_dim * args.hidden_size
        share = (whole - replicated - kv) // tp + replicated + kv * kv_heads // args.num_kv_heads
        assert [w["num_parameters"] for w in workers] == [share] * tp, (whole, replicated, kv)
        # Two all-reduces per layer (attention, MLP) and one for the embedding, every step.
        assert all(w["num_collectives"] == (2 * args.num_layers + 1) * w["num_runs"] for w in workers)
    finally:
        runner.shutdown()


def test_tensor_and_pipeline_parallel_compose(ray_cluster, models):
    """2 stages of 2 ranks (4 workers): the tied head of Llama 3 in the last stage reads its
    vocabulary rows of the embedding tensor, which the first stage also splits. All-reduces
    over gloo here (the default for ranks on different hosts)."""
    folder, want, _ = models("llama3")
    parallel = LLM(model=str(folder), **CONFIG, executor=RayExecutor(ParallelConfig(tp_backend="gloo")),
                   tensor_parallel_size=2, pipeline_parallel_size=2)
    runner = parallel.engine.runner
    try:
        assert [o.token_ids for o in parallel.generate(PROMPTS, PARAMS)] == want
        workers = runner.worker_info()
        assert [(w["layers"], w["rank"]) for w in workers] == [([0, 2], 0), ([0, 2], 1), ([2, 3], 0), ([2, 3], 1)]
        assert len({w["pid"] for w in workers}) == 4 and {w["all_reduce"] for w in workers} == {"gloo"}
    finally:
        runner.shutdown()


def test_lora_adapters_under_tensor_and_pipeline_parallelism(ray_cluster, models, tmp_path):
    """Phi-3's fused qkv/gate_up checkpoint tensors, adapters on every projection: each rank
    keeps its rows of B (its heads, its intermediate columns) and its columns of A (o and
    down), each stage its layers'; the adapters travel to the workers with the step plan.
    Token-identical to PEFT on Hugging Face, the base and two adapters in one batch."""
    from tests.engine.test_lora import build_adapter, hf_greedy

    folder, _, single = models("phi3")
    ids = single.tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    want = {}
    for name, seed in (("a", 1), ("b", 2)):
        peft_model = build_adapter(folder, tmp_path / name, seed, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], 8)
        want[name] = hf_greedy(peft_model, ids, 12)
    parallel = LLM(model=str(folder), **CONFIG, executor=RayExecutor(ParallelConfig(tp_backend="gloo")),
                   tensor_parallel_size=2, pipeline_parallel_size=2, max_loras=2,
                   lora_modules={"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        outs = parallel.generate([ids] * 3, params, lora=["a", None, "b"])
        base = single.generate([ids], params)[0].token_ids
        assert [o.token_ids for o in outs] == [want["a"], base, want["b"]]
        assert base != want["a"] and base != want["b"]
    finally:
        parallel.engine.runner.shutdown()


def test_a_dead_rank_rebuilds_its_group_and_requests_complete(ray_cluster, models):
    """Kill rank 1 mid-generation: its peer's all-reduce fails at once (not at a timeout), the
    engine rebuilds the group (both ranks: a process group takes no new member) and
    recomputes the running requests; every request ends with the tokens of an undisturbed
    run, and the replica serves again with no KV block leaked."""
    import ray

    folder, want, _ = models("phi3")
    parallel = LLM(model=str(folder), **CONFIG, executor=ray_executor, tensor_parallel_size=2)
    engine, runner = parallel.engine, parallel.engine.runner
    try:
        old = {w["pid"] for w in runner.worker_info()}
        ids = [engine.add_request(p, s).request_id for p, s in zip(PROMPTS, PARAMS)]
        final = {}
        step(engine, final, 4)
        assert engine.scheduler.num_running > 0
        ray.kill(runner.stages[0][1], no_restart=True)
        step(engine, final, 400)
        assert [final[i].token_ids for i in ids] == want
        assert engine.stats.num_executor_rebuilds == 1 and engine.health_problem is None
        assert not old & {w["pid"] for w in runner.worker_info()}  # the whole group is new
        assert [o.token_ids for o in parallel.generate(PROMPTS[:1], PARAMS[:1])] == want[:1]
        assert engine.block_manager.num_used_blocks == 0
    finally:
        runner.shutdown()


def test_a_size_the_model_cannot_split_is_refused(ray_cluster, models):
    folder, _, _ = models("phi3")  # 4 attention heads
    with pytest.raises(ConfigError, match="tensor_parallel_size 3: 4 attention heads with 2 KV heads cannot be split"):
        LLM(model=str(folder), **CONFIG, executor=ray_executor, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="tensor_parallel_size > 1 runs the model on Ray workers"):
        LLM(model=str(folder), **CONFIG, tensor_parallel_size=2)


def test_tensor_parallel_ranks_keep_their_gguf_blocks_packed(ray_cluster, tmp_path):
    """A GGUF of every packed type over 2 ranks under quantization auto: each rank packs its
    rows (its vocabulary's of the embedding too), and its columns where they are whole blocks,
    straight from the file (o_proj's 128 columns of Q4_0 blocks are; of Q5_K's 256-weight
    blocks are not, and that layer is dequantized); the tokens are the single process's up to
    its first near-tie (the rows' partial sums add up in another order)."""
    from engine.quantization import _cpu_kernel
    from tests.engine.test_quantization import agreeing_greedy_tokens, write_mixed_gguf

    if _cpu_kernel() is None:
        pytest.skip("the CPU extension is not available here")
    path = write_mixed_gguf(tmp_path / "mixed.gguf")
    settings = dict(device="cpu", dtype="float32", num_kv_blocks=64, num_threads=1, quantization="auto",
                    cache_dir=str(tmp_path / "cache"))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    prompts = PROMPTS + ["Dear Sir,", "import numpy as np", "The weather today", "1, 2, 3, 4,"]
    want = LLM(model=str(path), **settings).generate(prompts, params)
    parallel = LLM(model=str(path), **settings, executor=ray_executor, tensor_parallel_size=2)
    runner = parallel.engine.runner
    try:
        # Per layer: qkv, o, gate_up, down; the head; the embedding (vocabulary rows) and the
        # packed table it owns (untied). Only blk.1's o (Q5_K columns split mid-block) is float.
        kinds = [w["layer_kinds"] for w in runner.worker_info()]
        floats = sum(kinds[0].get(kind, 0) for kind in ("Linear", "OneDNNLinear", "Embedding"))
        assert kinds[0] == kinds[1] and floats == 1 and kinds[0].get("PackedEmbedding") == 1, sorted(kinds[0].items())
        assert sum(kinds[0].values()) == 11, sorted(kinds[0].items())
        assert agreeing_greedy_tokens(want, parallel.generate(prompts, params)) >= 15
    finally:
        runner.shutdown()

"""Pipeline parallelism on a local Ray cluster (CPU): stages as actors, outputs token-identical."""

from __future__ import annotations

import pytest
import torch

from cluster.executors import ParallelConfig, RayExecutor, ray_executor
from engine import SamplingParams
from tests.cluster.conftest import step
from tests.conftest import BASE_CONFIG

# A small KV cache and step budget: long prompts are chunked and requests get preempted.
SMALL = {"num_kv_blocks": 10, "max_num_batched_tokens": 48}
# On a GPU (SEMLINE_TEST_DEVICE=cuda) the stages share the one GPU a test machine has.
GPU_SHARE = {} if BASE_CONFIG["device"] == "cpu" else {"gpus_per_worker": 0.33}


def executor(**parallel) -> RayExecutor:
    return RayExecutor(ParallelConfig(**GPU_SHARE, **parallel))
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a kingdom by the sea, there lived an old fisherman and his wife, who " * 3,
           "List the planets of the solar system in order from the sun:"]
# Greedy rows travel from the last stage as token ids; one with penalties and one with
# logprobs need whole logits rows, so steps mix both kinds.
PARAMS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **extra) for n, extra in
          ((24, {"repetition_penalty": 1.3}), (40, {}), (16, {"logprobs": 2}), (56, {}))]


def test_logits_assembler_gives_back_every_row_the_driver_reads():
    """Greedy rows travel as argmax ids, the others whole; the assembled logits give the same
    argmax for every row and the same values for whole rows, also when an all-greedy step
    reuses the buffer of the step before."""
    from cluster.parallel import LogitsAssembler
    from engine.parallel import TensorParallel

    torch.manual_seed(0)
    assemble = LogitsAssembler(vocab_size=50)
    for argmax_rows, num_rows in (([0, 2, 3], 6), ([0, 1, 2, 3], 4), ([0, 1, 2], 3), ([1, 2], 3),
                                     ([], 2), ([0, 1, 2], 3), ([0, 1, 2, 3, 4], 5)):
        logits = torch.randn(num_rows, 50)
        full, token_ids = TensorParallel().gather_logits(logits, argmax_rows, 50)
        out = assemble(full, token_ids.long(), argmax_rows, num_rows)
        assert out.shape == logits.shape
        assert torch.equal(out.argmax(-1), logits.argmax(-1))
        for row in range(num_rows):
            if row in argmax_rows:  # one finite entry: the token
                assert torch.isfinite(out[row]).sum() == 1
            else:
                assert torch.equal(out[row], logits[row])


def test_a_worker_reserves_a_gpu_or_a_share_of_one():
    from cluster.executors import worker_bundle
    from engine.config import ConfigError, EngineConfig

    assert worker_bundle(on_gpu=True, num_threads=4) == {"GPU": 1.0, "CPU": 1}
    assert worker_bundle(on_gpu=True, num_threads=4, gpus=0.5) == {"GPU": 0.5, "CPU": 1}
    assert worker_bundle(on_gpu=False, num_threads=4, gpus=0.5) == {"CPU": 4}
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="gpus_per_worker"):
            ParallelConfig.from_dict({"gpus_per_worker": bad})
    # Ray's settings are the executor's, not the engine's.
    with pytest.raises(ConfigError, match="unknown engine config keys: pipeline_placement_strategy"):
        EngineConfig.from_dict({"pipeline_placement_strategy": "SPREAD"})


@pytest.fixture(scope="module")
def expected(make_llm):
    single = make_llm(**SMALL)
    outputs = single.generate(PROMPTS, PARAMS)
    assert single.engine.stats.num_preemptions > 0  # the workload does exercise preemption
    return [o.token_ids for o in outputs], single.engine.runner.num_parameters


@pytest.mark.parametrize("stages,layers,transport", [(2, [10, 20], "compiled_graph"), (3, None, "actor_calls")])
def test_pipeline_matches_the_single_process_engine(ray_cluster, make_llm, expected, stages, layers, transport):
    """2 stages with an explicit split over a Compiled Graph, 3 split evenly over actor calls."""
    tokens, total_parameters = expected
    pipeline = make_llm(**SMALL, executor=executor(transport=transport), pipeline_parallel_size=stages,
                        pipeline_layers=layers, num_threads=1)
    runner = pipeline.engine.runner
    try:
        outputs = pipeline.generate(PROMPTS, PARAMS)
        assert [o.token_ids for o in outputs] == tokens
        assert pipeline.engine.stats.num_preemptions > 0
        # Micro-batches overlapped: one batch per stage in flight at once.
        assert pipeline.engine.stats.max_batches_in_flight == stages
        assert (runner.dag is not None) == (transport == "compiled_graph")
        info = runner.stage_info()
        # Contiguous layer ranges covering the model, each in its own process...
        assert [i["layers"] for i in info][0][0] == 0 and info[-1]["layers"][1] == runner.args.num_layers
        assert all(a["layers"][1] == b["layers"][0] for a, b in zip(info, info[1:]))
        assert layers is None or [b - a for a, b in (i["layers"] for i in info)] == layers
        assert layers is not None or max(b - a for a, b in (i["layers"] for i in info)) == 10  # 30 / 3
        assert len({i["pid"] for i in info}) == stages
        assert all(i["device"].startswith(BASE_CONFIG["device"]) for i in info)
        # ...holding only its share of the weights: its layers, plus the embedding (first) or
        # the output head (last); never the whole model.
        args = runner.args
        head = args.vocab_size * args.hidden_size
        per_layer = (args.num_parameters - head) // args.num_layers + 2 * args.hidden_size  # + its two norms
        for stage in info:
            first, last = stage["layers"]
            share = (last - first) * per_layer + head * (first == 0) + (head + args.hidden_size) * (
                last == args.num_layers)
            assert stage["num_parameters"] == share, (stage, share)
            assert stage["num_parameters"] < args.num_parameters <= total_parameters
    finally:
        runner.shutdown()


@pytest.mark.parametrize("transport", ["actor_calls", "compiled_graph"])
def test_a_dead_stage_is_replaced_and_its_requests_recomputed(ray_cluster, make_llm, expected, transport):
    """Kill the last stage mid-generation: the engine notices at the next step, replaces only
    that stage, recomputes the running requests, and every request still ends with exactly the
    tokens of an undisturbed run; the replica then serves new requests."""
    import ray

    tokens, _ = expected
    pipeline = make_llm(**SMALL, executor=executor(transport=transport), pipeline_parallel_size=2, num_threads=1)
    engine, runner = pipeline.engine, pipeline.engine.runner
    try:
        first_pid, old_pid = [i["pid"] for i in runner.stage_info()]
        # The long prompt (chunked) and the longest output: still running when the stage dies.
        picked = [2, 3]
        ids = [engine.add_request(PROMPTS[i], PARAMS[i]).request_id for i in picked]
        final = {}
        step(engine, final, 8)
        assert engine.scheduler.num_running > 0 and not all(o.finished for o in final.values())
        ray.kill(runner.stages[1][0], no_restart=True)
        step(engine, final, 400)
        assert [final[i].token_ids for i in ids] == [tokens[i] for i in picked]
        assert engine.stats.num_executor_rebuilds == 1 and engine.health_problem is None
        pids = [i["pid"] for i in runner.stage_info()]
        assert pids[0] == first_pid and pids[1] != old_pid  # only the dead stage was replaced
        again = pipeline.generate(PROMPTS[:1], PARAMS[:1])[0]
        assert again.token_ids == tokens[0]
        assert engine.block_manager.num_used_blocks == 0
    finally:
        runner.shutdown()


@pytest.mark.parametrize("family", ["gemma3", "qwen3_moe"])
def test_other_families_split_into_stages_match_one_process(ray_cluster, llm, tmp_path, family):
    """Gemma 3 (tied head in the last stage, embedding in the first, local/global layers, q/k
    norms) and Qwen3-MoE (experts) over 2 stages: token-identical to one process, and each
    stage holds only its layers."""
    from engine import LLM
    from tests.engine.test_families import build_tiny_model

    build_tiny_model(family, tmp_path, llm.engine.model_dir)
    config = dict(model=str(tmp_path), device="cpu", dtype="float32", num_kv_blocks=16, max_num_batched_tokens=24)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    single = LLM(**config)
    want = [o.token_ids for o in single.generate(PROMPTS, params)]
    pipeline = LLM(**config, executor=ray_executor, pipeline_parallel_size=2, num_threads=1)
    try:
        assert [o.token_ids for o in pipeline.generate(PROMPTS, params)] == want
        stages = pipeline.engine.runner.stage_info()
        assert [s["layers"] for s in stages] == [[0, 2], [2, 3]]
        assert all(s["num_parameters"] < single.engine.runner.num_parameters for s in stages)
    finally:
        pipeline.engine.runner.shutdown()

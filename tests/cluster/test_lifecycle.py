"""A split model built, used and closed again and again in one process: every close (or the
collection of an unclosed LLM) gives Ray back the workers' CPUs, and nothing stays in /dev/shm."""

from __future__ import annotations

import gc
import os
import time

import pytest
import ray

from cluster.executors import ray_executor
from engine import LLM, RequestError, SamplingParams
from tests.engine.test_families import build_tiny_model

CONFIG = dict(device="cpu", dtype="float32", num_kv_blocks=16, num_threads=1)
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def _shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("semline")}


def _wait_for_cpus(expected: float, timeout_s: float = 20.0) -> float:
    """Ray's available CPUs once they reach `expected` (its resource view lags a kill)."""
    deadline = time.monotonic() + timeout_s
    while True:
        available = ray.available_resources().get("CPU", 0.0)
        if available == expected or time.monotonic() > deadline:
            return available
        time.sleep(0.2)


def test_split_llm_gives_back_its_workers_when_closed_or_collected(ray_cluster, llm, tmp_path):
    build_tiny_model("qwen2", tmp_path, llm.engine.model_dir)
    # What earlier tests' workers still hold is theirs to give back: start from what is free.
    start_cpus, start_shm = _wait_for_cpus(ray.cluster_resources()["CPU"]), _shm_segments()
    assert start_cpus >= 2
    answers, build_seconds = [], []
    for _ in range(3):
        began = time.monotonic()
        with LLM(model=str(tmp_path), **CONFIG, executor=ray_executor, tensor_parallel_size=2) as split:
            build_seconds.append(time.monotonic() - began)
            assert _wait_for_cpus(start_cpus - 2) == start_cpus - 2  # the two workers hold a CPU each
            answers.append([o.token_ids for o in split.generate(PROMPTS, PARAMS, use_tqdm=False)])
        assert _wait_for_cpus(start_cpus) == start_cpus
        with pytest.raises(RequestError, match="closed"):
            split.generate(PROMPTS, PARAMS)
        split.close()  # a second close does nothing
    assert answers[0] == answers[1] == answers[2] and all(len(t) == 8 for t in answers[0])
    # The third build waited for nothing the first two left behind.
    assert max(build_seconds) < 2 * min(build_seconds) + 10, build_seconds

    unclosed = LLM(model=str(tmp_path), **CONFIG, executor=ray_executor, tensor_parallel_size=2)
    assert [o.token_ids for o in unclosed.generate(PROMPTS, PARAMS, use_tqdm=False)] == answers[0]
    assert _wait_for_cpus(start_cpus - 2) == start_cpus - 2
    with pytest.warns(ResourceWarning, match="close"):
        del unclosed
        gc.collect()
    assert _wait_for_cpus(start_cpus) == start_cpus
    assert _shm_segments() <= start_shm

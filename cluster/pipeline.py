"""Pipeline parallelism: the model's layers split over Ray actors, one per GPU (or CPU share).

Each `StageActor` holds a contiguous range of decoder layers (the first also the
embedding, the last also the final norm and the output head), loads only those
weights, and keeps the paged KV cache of its own layers. The engine's scheduler
and block manager stay in the driver (the replica): every step, the
`PipelineRunner` sends the step's plan (token ids, positions, slot mapping,
block tables: plain lists) to every stage, so all stages' caches use the same
block ids; the hidden states flow stage to stage (numpy arrays) and
the last stage returns the logits of the rows that sample (or need penalties or
logprobs) and only the argmax token id of each greedy row (4 bytes instead of
a vocabulary of floats; LogitsAssembler turns them back into rows the sampler
reads). The chain runs as a Ray Compiled Graph
(channels set up once; `pipeline_transport: compiled_graph`, the default for
GPU stages) or as plain actor calls chained by object refs (`actor_calls`, the
default for CPU stages: a compiled graph's channel readers poll, which costs
more compute than it saves in transport where stages share cores;
benchmarks/pipeline.py).

The stages of one pipeline are placed in one placement group (one bundle per
stage: a GPU, or a CPU share), `PACK` by default, `SPREAD`/`STRICT_SPREAD` for
one stage per node. Inside a Serve replica that reserved bundles for them
(`placement_group_bundles`: bundle 0 for the replica), the stages use bundles
1..P of the replica's group.

Faults: a stage that dies (or does not answer within `pipeline_step_timeout_s`)
fails the step with `ExecutorError`; the engine then re-queues every running
request for recomputation and calls `rebuild()`, which replaces the dead or
unresponsive stages in their bundles (the survivors keep their weights; every
KV cache is treated as empty). The replica reports itself unhealthy meanwhile.

Micro-batches: the engine keeps up to `max_inflight` batches in the pipeline at
once (one per stage by default), each from requests not in another batch in
flight, so every stage has work while the driver samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.config import ConfigError, EngineConfig
from engine.executor import ExecutorError
from engine.loader import load_hf_config
from engine.model_runner import ModelRunner, StepPlan, num_logits, plan_step
from engine.models import model_args

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120
# What a dead or stuck stage looks like to the driver (a compiled graph reports a dead actor
# as a closed channel).
STAGE_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ObjectLostError,
                ray.exceptions.RayChannelError)


def split_layers(num_layers: int, num_stages: int, counts: list[int] | None = None) -> list[tuple[int, int]]:
    """[first, last) layer ranges, one per stage: `counts` when given, else as even as possible
    (earlier stages take the remainder)."""
    if counts is None:
        counts = [num_layers // num_stages + (i < num_layers % num_stages) for i in range(num_stages)]
    if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
        raise ConfigError(f"pipeline_layers {counts} must be {num_stages} counts >= 1 summing to {num_layers}")
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def stage_bundle(on_gpu: bool, num_threads: int, gpus: float = 1.0) -> dict:
    """The resources of one stage: a GPU or a share of one (and a CPU to drive it), or
    `num_threads` CPUs."""
    return {"GPU": gpus, "CPU": 1} if on_gpu else {"CPU": num_threads}


@ray.remote
class StageActor:
    """Layers [first, last) of the model and their KV cache, in their own process."""

    def __init__(self, config: dict, model_dir: str, dtype: str, max_model_len: int,
                 first: int, last: int, num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.config = EngineConfig.from_dict(config)
        device = torch.device("cuda") if torch.cuda.is_available() and self.config.device != "cpu" else \
            torch.device("cpu")
        self.runner = ModelRunner(self.config, load_hf_config(Path(model_dir)), Path(model_dir), device,
                                  getattr(torch, dtype), max_model_len, first, last)
        self.first, self.last = first, last
        self.busy_seconds, self.num_runs = 0.0, 0

    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def ping(self) -> int:
        return os.getpid()

    def resize_cache(self, num_blocks: int) -> None:
        """Every stage must hold the same block ids: the smallest affordable count wins."""
        self.runner.resize_kv_cache(num_blocks)

    def info(self) -> dict:
        return {"layers": [self.first, self.last], "num_parameters": self.runner.num_parameters,
                "num_blocks": self.runner.num_blocks, "pid": os.getpid(), "device": str(self.runner.device),
                "busy_seconds": self.busy_seconds, "num_runs": self.num_runs}

    def run(self, plan: StepPlan, hidden: np.ndarray | None):
        """Hidden states in, hidden states out, as numpy arrays: Ray stores those without
        pickling and the next process maps them without a copy. The last stage returns
        (logits of the rows that need them, argmax token ids of plan.argmax_rows)."""
        start = time.perf_counter()
        if hidden is not None:
            hidden = _tensor(hidden)
            if hidden.dtype == torch.int16:
                hidden = hidden.view(torch.bfloat16)
        out = self.runner.execute(self.runner.build(plan), hidden)
        if self.runner.model.is_last:  # fp32 logits
            result = _split_logits(out, plan.argmax_rows)
        else:
            result = _to_numpy(out)
        self.busy_seconds += time.perf_counter() - start
        self.num_runs += 1
        return result


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
        tensor = tensor.view(torch.int16)
    return tensor.cpu().numpy()


def _split_logits(logits: torch.Tensor, argmax_rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(the rows not in argmax_rows, the argmax of those that are): a greedy decode row
    travels as 4 bytes instead of a vocabulary of floats (6.3 MB per step for 32 rows of
    SmolLM2 in float32)."""
    if not argmax_rows:
        return logits.cpu().numpy(), np.empty(0, dtype=np.int32)
    greedy = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    greedy[argmax_rows] = True
    token_ids = logits[greedy].argmax(dim=-1).to(torch.int32)
    return logits[~greedy].cpu().numpy(), token_ids.cpu().numpy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an array Ray mapped read-only from its object store (no copy; nothing
    downstream writes to it in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return torch.from_numpy(array)


class LogitsAssembler:
    """The driver's [rows, vocab] logits from the last stage's (full rows, argmax ids of
    argmax_rows): a row sent as its argmax becomes -inf everywhere but 0 at that token, which
    every greedy reader (the sampler's argmax, greedy verification) reads as the same token.
    An all-greedy step (the common decode step) reuses one buffer instead of filling a new
    tensor: only the entries the previous step set to 0 go back to -inf, so a result is
    valid until the next call."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._buffer = torch.empty(0, vocab_size)
        self._hot = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    def __call__(self, full: torch.Tensor, token_ids: torch.Tensor, argmax_rows: list[int],
                 num_rows: int) -> torch.Tensor:
        if not argmax_rows:
            return full
        rows = torch.tensor(argmax_rows)
        if full.shape[0] == 0:
            if self._buffer.shape[0] < num_rows:
                self._buffer = torch.full((num_rows, self.vocab_size), float("-inf"))
            else:
                self._buffer[self._hot] = float("-inf")
            logits = self._buffer[:num_rows]
            self._hot = (rows, token_ids)
        else:
            logits = torch.full((num_rows, self.vocab_size), float("-inf"))
            others = torch.ones(num_rows, dtype=torch.bool)
            others[rows] = False
            logits[others] = full
        logits[rows, token_ids] = 0.0
        return logits


class PipelineRunner:
    """Stands in for the engine's ModelRunner when pipeline_parallel_size > 1."""

    def __init__(self, config: EngineConfig, hf_config, model_dir: Path, device: torch.device,
                 dtype: torch.dtype, max_model_len: int) -> None:
        if not ray.is_initialized():
            ray.init(logging_level=logging.WARNING)
        self.config = config
        self.args = model_args(hf_config)
        self.block_size = config.block_size
        self.device = torch.device("cpu")  # logits come back to the driver's memory
        self.decode_kernel = None
        size = config.pipeline_parallel_size
        # Batches the engine keeps in flight (one per stage by default).
        self.max_inflight = config.pipeline_inflight_batches or size
        self.ranges = split_layers(self.args.num_layers, size, config.pipeline_layers)
        self.threads = config.num_threads or 1
        self.bundle = stage_bundle(device.type == "cuda", self.threads, config.pipeline_gpus_per_stage)
        self._own_group = None
        group, self.first_bundle = get_current_placement_group(), 1
        if group is None or len(group.bundle_specs) < size + 1:  # not inside a replica that reserved them
            group = self._own_group = placement_group([self.bundle] * size,
                                                      strategy=config.pipeline_placement_strategy)
            self.first_bundle = 0
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        self.group = group
        self._stage_args = (
            dataclasses.asdict(dataclasses.replace(config, pipeline_parallel_size=1, pipeline_layers=None)),
            str(model_dir), str(dtype).removeprefix("torch."), max_model_len)
        self.stages = [self._start_stage(i) for i in range(size)]
        self.num_blocks = min(ray.get([stage.num_blocks.remote() for stage in self.stages]))
        ray.get([stage.resize_cache.remote(self.num_blocks) for stage in self.stages])
        transport = config.pipeline_transport
        self.transport = transport if transport != "auto" else (
            "compiled_graph" if device.type == "cuda" else "actor_calls")
        self.dag = None
        self._compile()
        self.wall_seconds, self.num_steps, self.num_rebuilds = 0.0, 0, 0
        self._assemble = LogitsAssembler(self.args.vocab_size)
        logger.info("pipeline of %d stages (layers %s), %d KV blocks", size, self.ranges, self.num_blocks)

    def _start_stage(self, index: int):
        first, last = self.ranges[index]
        return StageActor.options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.first_bundle + index),
        ).remote(*self._stage_args, first, last, self.threads)

    def _compile(self) -> None:
        """The stage chain as a Ray Compiled Graph: the plan goes to every stage, each stage's
        output to the next, over channels set up once (benchmarks/pipeline_transport.py:
        ~4x less transport time per step than actor calls on this machine)."""
        if self.transport != "compiled_graph":
            return
        from ray.dag import InputNode

        with InputNode() as plan:
            hidden = None
            for stage in self.stages:
                hidden = stage.run.bind(plan, hidden)
        self.dag = hidden.experimental_compile(_max_inflight_executions=self.max_inflight)

    def _teardown(self) -> None:
        if self.dag is not None:
            try:
                self.dag.teardown()
            except Exception as exc:  # noqa: BLE001 - a broken graph is being replaced anyway
                logger.warning("compiled graph teardown: %r", exc)
            self.dag = None

    def rebuild(self) -> list[int]:
        """Replace every stage that is dead or does not answer; returns their indices. The
        caller must treat every KV cache as empty (the survivors' caches are not cleared, but
        no request may rely on them)."""
        timeout = self.config.pipeline_step_timeout_s
        self._teardown()
        dead = []
        for index, stage in enumerate(self.stages):
            try:
                ray.get(stage.ping.remote(), timeout=timeout)
            except STAGE_ERRORS:
                dead.append(index)
        for index in dead:
            ray.kill(self.stages[index], no_restart=True)
        if self._own_group is not None:  # Ray re-places a group whose node died
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        for index in dead:
            self.stages[index] = self._start_stage(index)
        ray.get([self.stages[i].resize_cache.remote(self.num_blocks) for i in dead], timeout=PLACEMENT_TIMEOUT_S)
        self._compile()
        self.num_rebuilds += 1
        logger.warning("pipeline rebuilt: replaced stage(s) %s", dead)
        return dead

    def prepare(self, chunks) -> StepPlan:
        plan = plan_step(chunks, self.block_size)
        row = 0
        for chunk in chunks:  # logits rows in chunk order, as plan_step lays them out
            rows = range(row, row + num_logits(chunk))
            if chunk.samples_token and not chunk.all_logits and chunk.request.sampling_params.reads_only_argmax:
                plan.argmax_rows += rows
            row = rows.stop
        return plan

    def submit(self, plan: StepPlan) -> tuple:
        """Start the plan through the stages without waiting: each stage's call takes the
        previous one's result as a ref, which Ray hands from stage to stage. A stage runs its
        calls in order, so batches in flight overlap (stage 1 on batch k+1, stage 2 on k) and
        a freed block's last writes land before any later batch's."""
        start = time.perf_counter()
        try:
            if self.dag is not None:
                return self.dag.execute(plan), start, plan
            plan_ref, hidden = ray.put(plan), None
            for stage in self.stages:
                hidden = stage.run.remote(plan_ref, hidden)
            return hidden, start, plan
        except STAGE_ERRORS as exc:
            raise ExecutorError(f"a pipeline stage failed: {exc}") from exc

    def result(self, handle: tuple) -> torch.Tensor:
        """The logits of a submitted plan. A row the last stage sent as its argmax comes back
        as -inf everywhere but 0 at that token, which every greedy reader (the sampler's
        argmax, greedy verification) reads as the same token. Valid until the next result()."""
        ref, start, plan = handle
        try:
            full, token_ids = ray.get(ref, timeout=self.config.pipeline_step_timeout_s)
        except STAGE_ERRORS as exc:
            raise ExecutorError(f"a pipeline stage failed: {exc}") from exc
        logits = self._assemble(_tensor(full), torch.from_numpy(token_ids).long(), plan.argmax_rows,
                                len(plan.logits_indices))
        self.wall_seconds += time.perf_counter() - start
        self.num_steps += 1
        return logits

    def execute(self, plan: StepPlan) -> torch.Tensor:
        return self.result(self.submit(plan))

    def stage_info(self) -> list[dict]:
        return ray.get([stage.info.remote() for stage in self.stages])

    @property
    def num_parameters(self) -> int:
        return sum(info["num_parameters"] for info in self.stage_info())

    def shutdown(self) -> None:
        self._teardown()
        for stage in self.stages:
            ray.kill(stage)
        if self._own_group is not None:
            remove_placement_group(self._own_group)

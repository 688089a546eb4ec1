"""The Ray side of the engine's executor interface (engine/executor.py).

`ray_executor` is the factory the LLM server, `semline` and Ray users pass to the
engine (`LLM(..., executor=ray_executor)`): when the engine config asks for
`tensor_parallel_size` T or `pipeline_parallel_size` P above 1, the model runs on
T x P Ray actors (cluster/parallel.py), else in the calling process.

How those actors are placed and watched is Ray's business, not the engine's: it is
set here (`ParallelConfig`; the `parallel:` section of the service config), and a
factory carries it: `RayExecutor(ParallelConfig(step_timeout_s=10))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ConfigError, EngineConfig, config_from_dict
from engine.executor import Executor, in_process_executor

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TRANSPORTS = ("auto", "compiled_graph", "actor_calls")


@dataclass
class ParallelConfig:
    """How the Ray workers of one engine replica are placed, connected and watched."""

    # Placement group strategy of the T x P workers (one bundle each): PACK keeps them on
    # as few nodes as fit (a tensor-parallel group wants one node); SPREAD / STRICT_SPREAD
    # put them on different nodes.
    placement_strategy: str = "PACK"
    # GPUs each GPU worker reserves: 1 = a GPU each; a fraction lets the workers of a small
    # model share one GPU (0.5: two per GPU).
    gpus_per_worker: float = 1.0
    # A step (or a health ping) that a worker does not answer within this many seconds
    # counts as its failure: its stage is rebuilt and the running requests recomputed.
    step_timeout_s: float = 60.0
    # Batches in the pipeline at once (each from different requests, so a stage computes
    # one while the next computes another); None = one per stage, 1 = no overlap.
    inflight_batches: int | None = None
    # How steps travel between workers: "compiled_graph" (a Ray Compiled Graph: channels set
    # up once, ~4x less transport time, but its channel readers poll and take CPU from the
    # compute where workers share cores), "actor_calls" (plain actor calls chained by object
    # refs), or "auto": compiled_graph on GPUs, actor_calls on CPUs.
    transport: str = "auto"
    # torch.distributed backend of a tensor-parallel group: "auto" = NCCL on GPUs; on CPUs gloo,
    # with the all-reduces through shared memory when the group is on one host; "gloo" or
    # "nccl" = that backend for everything.
    tp_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.placement_strategy not in STRATEGIES:
            raise ConfigError(f"placement_strategy must be one of {', '.join(STRATEGIES)}, "
                              f"got {self.placement_strategy!r}")
        if not 0 < self.gpus_per_worker <= 1:
            raise ConfigError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}")
        if self.step_timeout_s <= 0:
            raise ConfigError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.inflight_batches is not None and self.inflight_batches < 1:
            raise ConfigError(f"inflight_batches must be >= 1, got {self.inflight_batches}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.tp_backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"tp_backend must be 'auto', 'gloo' or 'nccl', got {self.tp_backend!r}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "ParallelConfig":
        return config_from_dict(cls, values, "parallel")


def worker_bundle(on_gpu: bool, num_threads: int, gpus: float = 1.0) -> dict:
    """The resources of one worker: a GPU or a share of one (and a CPU to drive it), or
    `num_threads` CPUs."""
    return {"GPU": gpus, "CPU": 1} if on_gpu else {"CPU": num_threads}


def replica_bundles(engine: EngineConfig, parallel: ParallelConfig, replica: dict, on_gpu: bool,
                    num_threads: int) -> list[dict]:
    """A Serve replica's placement group: bundle 0 for the replica itself, then one per
    worker, stage after stage (T x P), so autoscaling adds and removes whole model copies."""
    return [replica] + [worker_bundle(on_gpu, num_threads, parallel.gpus_per_worker)] * engine.num_model_workers


class RayExecutor:
    """An engine ExecutorFactory: the model on Ray workers when it is split, else in process."""

    def __init__(self, parallel: ParallelConfig | None = None) -> None:
        self.parallel = parallel or ParallelConfig()

    def __call__(self, config: EngineConfig, hf_config, model_dir: Path, device: torch.device,
                 dtype: torch.dtype, max_model_len: int) -> Executor:
        if config.num_model_workers > 1:
            from cluster.parallel import ParallelRunner  # starts Ray if needed

            return ParallelRunner(config, self.parallel, hf_config, model_dir, device, dtype, max_model_len)
        return in_process_executor(config, hf_config, model_dir, device, dtype, max_model_len)


ray_executor = RayExecutor()

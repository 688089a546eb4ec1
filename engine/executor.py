"""The line between the engine and where its model runs.

The engine schedules a step, hands it to an executor, and samples from the logits it
returns. The in-process `ModelRunner` is the default executor; `cluster/` provides the
Ray executors (tensor-parallel workers, pipeline stages of them) and callers plug
them in with `LLM(..., executor=...)` / `LLMEngine(config, executor=...)`, so the
engine itself never imports Ray or `cluster/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from engine.config import ConfigError, EngineConfig
from engine.model_runner import ModelRunner
from engine.models import ModelArgs


class ExecutorError(RuntimeError):
    """Where the model runs failed (a worker or stage died or did not answer): the step's work
    is lost, and the executor must be rebuilt before the next step. The engine then re-queues
    every running request for recomputation and calls the executor's `rebuild()` (which an
    executor that can raise this must have; the in-process runner never raises it)."""


class Executor(Protocol):
    """Runs steps of a model. `prepare` turns scheduled chunks into whatever `submit` takes;
    `submit` starts a step without waiting and `result` waits for its [rows, vocab] float32
    logits (rows: the sampling rows of the step, in chunk order). Up to `max_inflight` steps
    may be submitted before the oldest result is taken."""

    args: ModelArgs  # the model's architecture numbers
    device: torch.device  # where the returned logits live
    num_blocks: int  # KV-cache blocks every part of the model holds
    max_inflight: int

    def prepare(self, chunks: list) -> Any: ...

    def submit(self, prepared: Any) -> Any: ...

    def result(self, handle: Any) -> torch.Tensor: ...

    def execute(self, prepared: Any) -> torch.Tensor: ...

    def set_lora(self, slot: int, adapter: Any) -> None:
        """Put a LoRA adapter (engine/lora.py) into a slot of the model, or None to empty it;
        steps submitted from now on read it."""


# (config, HF config, model folder, device, dtype, max_model_len) -> an Executor.
ExecutorFactory = Callable[[EngineConfig, Any, Path, torch.device, torch.dtype, int], Executor]


def in_process_executor(config: EngineConfig, hf_config, model_dir: Path, device: torch.device,
                        dtype: torch.dtype, max_model_len: int) -> Executor:
    """The whole model in this process (the default)."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(config, name) > 1:
            raise ConfigError(f"{name} > 1 runs the model on Ray workers: pass "
                              "executor=cluster.executors.ray_executor (semline serve and the LLM server do)")
    return ModelRunner(config, hf_config, model_dir, device, dtype, max_model_len)

"""The Ray side of the engine's executor interface (engine/executor.py).

`ray_executor` is the factory the LLM server, `semline` and Ray users pass to the
engine (`LLM(..., executor=ray_executor)`): pipeline stages on Ray actors when
`pipeline_parallel_size > 1`, else the model in the calling process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.executor import Executor, in_process_executor


def ray_executor(config: EngineConfig, hf_config, model_dir: Path, device: torch.device, dtype: torch.dtype,
                 max_model_len: int) -> Executor:
    if config.pipeline_parallel_size > 1:
        from cluster.pipeline import PipelineRunner  # starts Ray if needed

        return PipelineRunner(config, hf_config, model_dir, device, dtype, max_model_len)
    return in_process_executor(config, hf_config, model_dir, device, dtype, max_model_len)

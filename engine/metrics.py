"""The line's efficiency figures: FLOPs per step and energy, per request and in aggregate."""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass, field

import torch

from engine.models import ModelArgs


def chunk_flops(args: ModelArgs, num_cached: int, num_new: int, samples_token: bool) -> float:
    """FLOPs to compute `num_new` tokens after `num_cached` ones.

    2 x (layer parameters) per token, plus attention: QK^T and AV cost
    2 x 2 x heads x head_dim per (query, key) pair, where query i sees
    num_cached + i + 1 keys; plus the output head for a sampled token.
    """
    layer_params = args.num_parameters - args.vocab_size * args.hidden_size
    pairs = num_new * num_cached + num_new * (num_new + 1) // 2
    attention = 4 * args.num_layers * args.num_heads * args.head_dim * pairs
    head = 2 * args.vocab_size * args.hidden_size if samples_token else 0
    return float(2 * layer_params * num_new + attention + head)


def account_step(stats: "EngineStats", args: ModelArgs, chunks: list, seconds: float, joules: float,
                 energy_source: str) -> None:
    """Charge a step: its FLOPs to each request (scheduled chunks), its energy to them in
    proportion to FLOPs, and both, with its time, to the engine's totals."""
    flops = [chunk_flops(args, c.request.num_computed_tokens, c.num_new_tokens, c.samples_token) for c in chunks]
    total = sum(flops) or 1.0
    for chunk, f in zip(chunks, flops):
        metrics = chunk.request.metrics
        metrics.flops += f
        metrics.energy_joules += joules * f / total
        metrics.energy_source = energy_source
    stats.num_generation_tokens += sum(c.samples_token for c in chunks)
    stats.flops += sum(flops)
    stats.energy_joules += joules
    stats.busy_seconds += seconds
    stats.num_steps += 1


class EnergyMeter:
    """Joules used by the device, measured where the platform allows, else estimated.

    CUDA: NVML's total energy counter (through torch.cuda). CPU: RAPL package
    counters under /sys/class/powercap when readable. Otherwise a configured
    power figure times the busy time, labelled "estimate".
    """

    def __init__(self, device: torch.device, power_watts: float) -> None:
        self.device = device
        self.power_watts = power_watts
        self._rapl_files = [f for f in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj")
                            if f.count(":") == 1 and _readable(f)]
        self._nvml_handle = self._open_nvml() if device.type == "cuda" else None
        if self._nvml_handle is not None:
            self.source = "nvml"
        else:
            self.source = "rapl" if self._rapl_files else "estimate"

    def _open_nvml(self):
        """NVML handle of the device (package nvidia-ml-py), or None where NVML is unavailable."""
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # older GPUs lack the counter
            return handle
        except Exception:  # noqa: BLE001 - no pynvml, no driver, no counter: estimate instead
            return None

    def read(self) -> float:
        """A monotonic energy reading in joules (an estimate's reading is wall time x watts)."""
        if self._nvml_handle is not None:
            import pynvml

            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml_handle) / 1000.0
        if self.source == "rapl":
            return sum(int(open(f).read()) for f in self._rapl_files) / 1e6
        return time.perf_counter() * self.power_watts


def _readable(path: str) -> bool:
    try:
        with open(path) as f:
            int(f.read())
        return True
    except (OSError, ValueError):
        return False


@dataclass
class EngineStats:
    """Aggregate counters since the engine started (monotonic), and current gauges."""

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    flops: float = 0.0
    energy_joules: float = 0.0
    busy_seconds: float = 0.0
    finished_reasons: dict[str, int] = field(default_factory=dict)
    # Prompt tokens looked up in the prefix cache, and how many were found there.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Speculative decoding: steps that verified proposals, tokens proposed, tokens accepted.
    spec_num_verify_steps: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    # Pipeline parallelism: times a failed stage was replaced (its requests recomputed).
    num_executor_rebuilds: int = 0
    # Most batches in the pipeline at once (micro-batch overlap; 1 in process).
    max_batches_in_flight: int = 0
    # Gauges, refreshed every step.
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.num_generation_tokens / self.busy_seconds if self.busy_seconds else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens reused from the cache / prompt tokens."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        """Proposed tokens accepted / proposed."""
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def spec_tokens_per_verify_step(self) -> float:
        """Mean tokens a verifying step adds: accepted proposals + the model's own token."""
        steps = self.spec_num_verify_steps
        return (self.spec_num_accepted_tokens + steps) / steps if steps else 0.0

    @property
    def joules_per_token(self) -> float:
        total = self.num_prompt_tokens + self.num_generation_tokens
        return self.energy_joules / total if total else 0.0


def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]

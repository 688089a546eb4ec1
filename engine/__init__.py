"""semline's engine: one replica of the LLM production line, usable as a library."""

from engine.async_engine import AsyncEngine
from engine.config import ConfigError, EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine, RequestError
from engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineConfig",
    "SamplingParams",
    "RequestOutput",
    "RequestMetrics",
    "TokenLogprob",
    "LLMEngine",
    "RequestError",
    "ConfigError",
]

"""The LLM server deployment: each Serve replica owns one AsyncEngine.

A thin shim: the engine knows nothing of Ray. Prompts arrive as text, token ids
or chat messages; outputs stream back as RequestOutput objects.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import torch

from engine import AsyncEngine, EngineConfig, RequestOutput, SamplingParams
from engine.llm import apply_chat_template

logger = logging.getLogger(__name__)


class LLMServer:
    def __init__(self, engine_config: dict, num_threads: int) -> None:
        # Ray sets OMP_NUM_THREADS=1 in replicas: use the CPUs this replica was given.
        torch.set_num_threads(max(1, num_threads))
        self.engine = AsyncEngine(EngineConfig.from_dict({**engine_config, "num_threads": max(1, num_threads)}))

    async def model_info(self) -> dict:
        core = self.engine.engine
        return {"max_model_len": core.max_model_len, "vocab_size": core.runner.args.vocab_size}

    async def generate(self, prompt: str | list[int] | None, messages: list[dict] | None,
                       params: SamplingParams, priority: int, request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; cancelling the stream aborts it in the engine."""
        if messages is not None:
            prompt = apply_chat_template(self.engine.tokenizer, messages)
        stream = self.engine.generate(prompt, params, request_id=request_id, priority=priority)
        try:
            async for output in stream:
                yield output
        finally:
            # Serve cancels this generator when the caller goes away; close the engine's
            # stream now (not at garbage collection) so the request is aborted at once.
            await stream.aclose()

    def stats(self) -> dict:
        stats = self.engine.stats()
        return {"num_running": stats.num_running, "num_waiting": stats.num_waiting,
                "kv_cache_usage": stats.kv_cache_usage, "num_free_blocks": stats.num_free_blocks,
                "num_generation_tokens": stats.num_generation_tokens}

    def check_health(self) -> None:
        """Called by Serve: an engine whose loop died makes the replica unhealthy."""
        if not self.engine.is_running:
            raise RuntimeError("engine loop is not running")

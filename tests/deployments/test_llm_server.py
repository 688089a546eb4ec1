"""The LLM server in process (no Serve): what it does to a request before the engine sees it."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import RequestError, SamplingParams


@pytest.fixture(scope="module")
def server():
    import torch

    from deployments.config import SemlineConfig
    from deployments.llm_server import LLMServer

    config = SemlineConfig(engine={"kv_cache_memory_gb": 0.1})
    server = LLMServer(config.engine, torch.get_num_threads(), model_name=config.model_name)
    yield server
    server.engine.shutdown()


def test_a_large_prompt_is_prepared_off_the_event_loop(server):
    """A ~170 KB chat prompt (rendered and tokenized in a worker thread, the GIL released while
    tokenizing, then refused as too long) arrives while a stream runs: the replica's event
    loop, which carries every stream's chunks, never stops for it (before, the rendering ran
    on the loop: ~0.15 s without a chunk for any stream). A 1 MiB prompt is refused before it
    is even tokenized."""
    text = " ".join(f"word{i}" for i in range(25_000))  # ~170 KB, ~140k tokens: rendered, then too long
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        arrivals, ticks, window = [], [], []

        async def stream():
            async for out in server.generate("Tell me a long story.", None, params, 0, "running", interval=0.0):
                arrivals.append(time.monotonic())
            return out

        async def ticker():
            while not window or time.monotonic() < window[-1] + 0.05:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        async def large():
            while len(arrivals) < 20:
                await asyncio.sleep(0.01)
            window.append(time.monotonic())
            with pytest.raises(RequestError, match="prompt has 1"):
                async for _ in server.generate(None, [{"role": "user", "content": text}], params, 0, "large"):
                    pass
            window.append(time.monotonic())

        final, *_ = await asyncio.gather(stream(), ticker(), large())
        return final, ticks, window

    final, ticks, (start, end) = asyncio.run(main())
    assert final.finished and len(final.token_ids) == 200
    assert end - start > 0.05  # it was worked on...
    during = [t for t in ticks if start - 0.01 <= t <= end + 0.01]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) < 0.05, (end - start, max(gaps))  # ...and the loop went on meanwhile
    huge = "x " * (1 << 19)
    began = time.monotonic()
    with pytest.raises(RequestError, match="at least"):
        server.prompt_ids(huge, None)
    assert time.monotonic() - began < 0.05  # no tokenization: its bytes alone make too many tokens


def test_streams_send_fewer_chunks_when_many_are_open(server):
    """stream_chunks_per_s: each open stream waits at least (open streams / the budget)
    between chunks; the tokens and text are the same however they are chunked."""
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    async def run(budget: float | None, count: int):
        server.stream_chunks_per_s = budget

        async def one(i):
            outs = [o async for o in server.generate(f"Story {i}:", None, params, 0, f"c{budget}-{i}")]
            return len(outs), [t for o in outs for t in o.delta_token_ids], outs[-1]

        return await asyncio.gather(*(one(i) for i in range(count)))

    try:
        free = asyncio.run(run(None, 8))
        bounded = asyncio.run(run(40.0, 8))  # 8 streams: at least 0.2 s between chunks
    finally:
        server.stream_chunks_per_s = None
    for (n_free, tokens_free, last_free), (n_bounded, tokens_bounded, last_bounded) in zip(free, bounded):
        assert tokens_free == tokens_bounded == last_bounded.token_ids and last_free.text == last_bounded.text
        assert n_bounded < n_free
    assert server.num_streams == 0

"""AsyncEngine: many concurrent streams, cancellation frees blocks, errors reach the caller."""

from __future__ import annotations

import asyncio

import pytest

from engine import AsyncEngine, RequestError, SamplingParams


@pytest.fixture(scope="module")
def async_engine(make_llm):
    engine = AsyncEngine(engine=make_llm().engine)
    yield engine
    engine.shutdown()


def _greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


async def _collect(engine, prompt, params, **kwargs):
    outputs = [out async for out in engine.generate(prompt, params, **kwargs)]
    return outputs


def test_concurrent_streams_match_offline(async_engine, llm):
    prompts = [f"Fact number {i} about the ocean:" for i in range(6)]
    expected = [o.token_ids for o in llm.generate(prompts, _greedy(12))]

    async def main():
        return await asyncio.gather(*(_collect(async_engine, p, _greedy(12)) for p in prompts))

    results = asyncio.run(main())
    for outputs, tokens in zip(results, expected):
        final = outputs[-1]
        assert final.finished and final.token_ids == tokens
        assert [t for o in outputs for t in o.delta_token_ids] == tokens
        assert "".join(o.delta_text for o in outputs) == final.text
        assert all(not o.finished for o in outputs[:-1])
        m = final.metrics
        assert 0 < m.time_to_first_token <= m.e2e_latency
        assert m.time_per_output_token > 0 and m.flops > 0 and m.energy_joules > 0


def test_leaving_the_stream_aborts_and_frees_blocks(async_engine):
    engine = async_engine.engine

    async def main():
        seen = 0
        async for out in async_engine.generate("Write an endless poem.", _greedy(500), request_id="leaver"):
            seen += 1
            if seen == 3:
                break
        # The abort travels to the engine thread; wait for it to land.
        for _ in range(200):
            if engine.block_manager.num_used_blocks == 0:
                break
            await asyncio.sleep(0.01)
        return seen

    assert asyncio.run(main()) == 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert "leaver" not in engine.requests


def test_cancelled_task_aborts_request(async_engine):
    engine = async_engine.engine

    async def main():
        task = asyncio.create_task(_collect(async_engine, "Describe the universe.", _greedy(500)))
        while engine.block_manager.num_used_blocks == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.block_manager.num_used_blocks == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_callers_cancelled_while_being_added_leave_the_engine_running(async_engine):
    """A caller cancelled before the engine thread takes its request must not kill the loop."""
    engine = async_engine.engine

    async def main():
        for delay in (0, 0, 0.0005, 0.001, 0.002) * 8:
            task = asyncio.create_task(_collect(async_engine, "Hello there.", _greedy(50)))
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _ in range(300):
            if engine.block_manager.num_used_blocks == 0 and not engine.requests:
                break
            await asyncio.sleep(0.01)
        return await _collect(async_engine, "Still alive?", _greedy(3))

    outputs = asyncio.run(main())
    assert async_engine.is_running and outputs[-1].finished and len(outputs[-1].token_ids) == 3
    assert engine.block_manager.num_used_blocks == 0


def test_invalid_request_raises_in_caller(async_engine):
    async def main():
        return await _collect(async_engine, "", _greedy(3))

    with pytest.raises(RequestError):
        asyncio.run(main())
    assert async_engine.is_running


def test_stats_count_tokens(async_engine):
    before = async_engine.stats()
    asyncio.run(_collect(async_engine, "One two three", _greedy(5)))
    after = async_engine.stats()
    assert after.num_generation_tokens - before.num_generation_tokens == 5
    assert after.num_prompt_tokens - before.num_prompt_tokens == 3
    assert after.flops > before.flops and after.energy_joules > before.energy_joules

"""AsyncEngine: many concurrent streams, cancellation frees blocks, errors reach the caller."""

from __future__ import annotations

import asyncio
import math

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


def test_coalesced_streams_merge_what_comes_within_the_interval(async_engine, llm):
    """The first output at once, the rest of the request within a long interval merged into
    the last one; interval 0 merges only what is already waiting. Same tokens and text as the
    plain stream, and what each output adds joins up to the whole, logprobs too."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    expected = llm.generate(["The sea in winter"], params)[0]

    async def run(interval):
        stream = await async_engine.submit("The sea in winter", params)
        return [out async for out in stream.coalesced(interval)]

    slow, only_end, fast = asyncio.run(run(30.0)), asyncio.run(run(math.inf)), asyncio.run(run(0.0))
    for outputs in (slow, only_end):
        assert len(outputs) == 2 and len(outputs[0].token_ids) == 1 and not outputs[0].finished
    assert 2 <= len(fast) <= 16
    for outputs in (slow, only_end, fast):
        final = outputs[-1]
        assert final.finished and final.token_ids == expected.token_ids and final.text == expected.text
        assert [t for o in outputs for t in o.delta_token_ids] == final.token_ids
        assert "".join(o.delta_text for o in outputs) == final.text
        assert [lp.token_id for o in outputs for lp in o.delta_logprobs] == final.token_ids
        assert all(not o.finished for o in outputs[:-1])


def test_outputs_not_due_wait_on_the_engines_thread(async_engine):
    """A coalesced stream's outputs that come before the consumer takes its next are held by
    the engine's thread (its loop is not woken for them) and reach it together: after the
    first output, with a long interval, steps run while nothing reaches the consumer's queue."""
    params = _greedy(40)

    async def run():
        stream = await async_engine.submit("The sea in winter", params)
        outputs = stream.coalesced(30.0)
        first = await anext(outputs)
        # 40 tokens take well under a second here; wait for several steps' outputs to be held.
        for _ in range(500):
            if len(stream._stream.held) >= 3:
                break
            await asyncio.sleep(0.002)
        held, queued = len(stream._stream.held), stream._outputs.qsize()
        rest = [out async for out in outputs]
        return first, held, queued, rest

    first, held, queued, rest = asyncio.run(run())
    assert len(first.token_ids) == 1 and held >= 3 and queued == 0
    assert len(rest) == 1 and rest[0].finished and len(rest[0].token_ids) == 40


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


class _FaultyRows:
    """The engine's sampler, but a batch holding a request with seed 13 raises: a fault that
    belongs to one request (a NaN row, a bad sampling state)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __call__(self, logits, requests):
        if any(r.sampling_params.seed == 13 for r in requests):
            raise RuntimeError("bad row")
        return self.sampler(logits, requests)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def test_a_request_that_fails_on_its_own_leaves_its_step_mates_alone(make_llm, llm, monkeypatch):
    """One request's sampling raises: it alone ends ("error", with the reason; its stream raises
    RequestFailedError), the others of every step it shared finish exactly as without it, and
    its KV blocks are freed. A fault while taking one request's tokens (its stop checks) ends
    that request the same way."""
    from engine.async_engine import RequestFailedError

    prompts = [f"Fact number {i} about the ocean:" for i in range(3)]
    expected = [o.token_ids for o in llm.generate(prompts, _greedy(10))]
    core = make_llm().engine
    monkeypatch.setattr(core, "sampler", _FaultyRows(core.sampler))
    bad = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, seed=13)
    engine = AsyncEngine(engine=core)
    try:
        async def main():
            return await asyncio.gather(*(_collect(engine, p, _greedy(10)) for p in prompts),
                                        _collect(engine, "This one breaks", bad), return_exceptions=True)

        *good, failed = asyncio.run(main())
    finally:
        engine.shutdown()  # the loop thread stops stepping `core`; the rest steps it here
    assert [outs[-1].token_ids for outs in good] == expected
    assert isinstance(failed, RequestFailedError) and "bad row" in str(failed)
    assert core.block_manager.num_used_blocks == 0 and not core.requests
    assert core.stats.finished_reasons.get("error") == 1

    # Offline too: the failing request's output says why; a fault in one request's stop
    # checks ends it alone as well.
    real_append = core._append_token

    def append(request, token_id, logprobs, now, pending=None):
        if request.prompt == "Stop checks break":
            raise ValueError("stop check exploded")
        real_append(request, token_id, logprobs, now, pending)

    monkeypatch.setattr(core, "_append_token", append)
    ids = [core.add_request(p, _greedy(10)).request_id for p in [*prompts, "Stop checks break"]]
    ids.append(core.add_request("This one breaks", bad).request_id)
    final = {}
    for _ in range(200):  # bounded
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            final[out.request_id] = out
    assert [final[i].token_ids for i in ids[:3]] == expected
    assert [final[i].finish_reason for i in ids[3:]] == ["error", "error"]
    assert "stop check exploded" in final[ids[3]].error and "bad row" in final[ids[4]].error
    assert core.block_manager.num_used_blocks == 0


def test_an_engine_built_from_a_config_loads_on_the_engine_thread(tmp_path, monkeypatch):
    """From a config the model is built on the engine thread (the thread that steps it runs
    every parallel region), and a load error still reaches the caller."""
    import threading

    from engine import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.loader import ModelLoadError

    with pytest.raises(ModelLoadError):
        AsyncEngine(EngineConfig(model=str(tmp_path / "no-such-model")))
    built_on = []
    original = LLMEngine.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(threading.current_thread().name)
        original(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "__init__", recording_init)
    engine = AsyncEngine(EngineConfig(device="cpu", dtype="float32", num_kv_blocks=16))
    monkeypatch.undo()
    try:
        assert built_on == ["semline-engine"]
        outputs = asyncio.run(_collect(engine, "The sea is", _greedy(4)))
        assert outputs[-1].finished and len(outputs[-1].token_ids) == 4
    finally:
        engine.shutdown()


def test_delta_streams_carry_what_is_new_and_end_with_the_totals(async_engine):
    """output_kind "delta": outputs before the last carry only their increment (no prompt, no
    text or tokens so far), the last the totals too; the bytes a stream's outputs take when
    pickled (what crosses a process boundary) grow with its length, not its square. The same
    request as "cumulative" gives the same tokens, text and logprobs."""
    import pickle

    def params(n, kind):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1, output_kind=kind)

    prompt = "A long story about the sea, told slowly: " * 8

    async def run(n, kind):
        return [out async for out in async_engine.generate(prompt, params(n, kind))]

    sizes = {}
    for n in (24, 96):
        deltas = asyncio.run(run(n, "delta"))
        assert all(o.token_ids == [] and o.text == "" and o.prompt_token_ids == [] and o.logprobs is None
                   for o in deltas[:-1]) and len(deltas) > 2
        final = deltas[-1]
        assert final.finished and final.prompt_token_ids and len(final.token_ids) == n
        assert [t for o in deltas for t in o.delta_token_ids] == final.token_ids
        assert "".join(o.delta_text for o in deltas) == final.text
        assert [lp for o in deltas for lp in o.delta_logprobs] == final.logprobs
        sizes[n] = sum(len(pickle.dumps(o)) for o in deltas)
    cumulative = asyncio.run(run(96, "cumulative"))
    assert cumulative[-1].token_ids == final.token_ids and cumulative[-1].text == final.text
    assert cumulative[-1].logprobs == final.logprobs
    cumulative_bytes = sum(len(pickle.dumps(o)) for o in cumulative)
    # 4x the tokens: ~4x the bytes (the prompt and totals, sent once, make it a little less).
    assert sizes[96] < 4.5 * sizes[24], sizes
    assert cumulative_bytes > 3 * sizes[96], (cumulative_bytes, sizes)

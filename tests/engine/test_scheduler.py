"""Scheduler and block manager alone: budgets, priorities, preemption, accounting."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def _scheduler(num_blocks=100, block_size=4, **config):
    config = EngineConfig(block_size=block_size, **config)
    manager = BlockManager(num_blocks, block_size)
    return Scheduler(config, manager), manager


def _request(rid, num_prompt, priority=0):
    return Request(rid, None, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=100), priority)


def _run(scheduler, out, new_token=7):
    """Pretend the model ran: advance computed tokens, append a token where sampled."""
    for chunk in out.chunks:
        chunk.request.num_computed_tokens += chunk.num_new_tokens
        if chunk.samples_token:
            chunk.request.output_token_ids.append(new_token)


def test_block_manager_allocates_and_frees_with_ref_counts():
    manager = BlockManager(num_blocks=4, block_size=4)
    req = _request("a", 5)
    assert manager.allocate_slots(req, 5) and len(req.block_table) == 2
    assert manager.allocate_slots(req, 8) and len(req.block_table) == 2  # still fits
    assert manager.allocate_slots(req, 9) and len(req.block_table) == 3
    assert not manager.allocate_slots(_request("b", 8), 8)  # 1 block left, 2 needed
    assert manager.num_free_blocks == 1 and manager.usage == 0.75
    manager.free(req)
    assert manager.num_free_blocks == 4 and req.block_table == []
    assert all(count == 0 for count in manager.ref_counts)


def test_token_budget_chunks_long_prompts_and_keeps_decodes_first():
    scheduler, _ = _scheduler(max_num_batched_tokens=16)
    short, long = _request("short", 3), _request("long", 40)
    scheduler.add_request(short)
    scheduler.add_request(long)
    first = scheduler.schedule()
    assert [(c.request.request_id, c.num_new_tokens, c.samples_token) for c in first.chunks] == [
        ("short", 3, True), ("long", 13, False)]
    _run(scheduler, first)
    second = scheduler.schedule()
    assert [(c.request.request_id, c.num_new_tokens) for c in second.chunks] == [("short", 1), ("long", 15)]
    assert second.num_batched_tokens == 16


def test_without_chunking_a_prompt_waits_for_a_whole_step():
    scheduler, _ = _scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    scheduler.add_request(_request("a", 10))
    scheduler.add_request(_request("b", 10))
    out = scheduler.schedule()
    assert [c.request.request_id for c in out.chunks] == ["a"]  # b does not fit in the 6 left


def test_max_num_seqs_caps_running():
    scheduler, _ = _scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(_request(f"r{i}", 2))
    out = scheduler.schedule()
    assert len(out.chunks) == 2 and scheduler.num_waiting == 1


def test_out_of_blocks_preempts_lowest_priority_latest_first():
    scheduler, manager = _scheduler(num_blocks=6, block_size=4)
    early_batch, late_batch, realtime = _request("eb", 4, 1), _request("lb", 4, 1), _request("rt", 4, 0)
    for req in (early_batch, late_batch, realtime):
        scheduler.add_request(req)
    _run(scheduler, scheduler.schedule())  # each holds 1 block, 3 free
    for _ in range(10):  # decode until blocks run out (each request needs a 3rd block)
        out = scheduler.schedule()
        _run(scheduler, out)
        if out.preempted:
            break
    assert out.preempted[0] is late_batch
    assert late_batch.status == RequestStatus.WAITING and late_batch.num_computed_tokens == 0
    assert late_batch.block_table == [] and late_batch.metrics.num_preemptions == 1
    assert realtime.status == RequestStatus.RUNNING
    assert manager.num_free_blocks + sum(len(r.block_table) for r in scheduler.running) == 6


def test_waiting_realtime_preempts_running_batch_when_full():
    scheduler, _ = _scheduler(num_blocks=4, block_size=4, max_num_seqs=8)
    batch = _request("batch", 15, priority=1)
    scheduler.add_request(batch)
    _run(scheduler, scheduler.schedule())  # holds all 4 blocks
    scheduler.add_request(_request("rt", 4, priority=0))
    out = scheduler.schedule()
    assert out.preempted == [batch]
    assert [c.request.request_id for c in out.chunks] == ["rt"]


def test_equal_priority_does_not_preempt_for_waiting():
    scheduler, _ = _scheduler(num_blocks=4, block_size=4)
    scheduler.add_request(_request("first", 15))
    _run(scheduler, scheduler.schedule())
    scheduler.add_request(_request("second", 4))
    out = scheduler.schedule()
    assert not out.preempted and [c.request.request_id for c in out.chunks] == ["first"]


def test_finish_and_abort_free_blocks():
    scheduler, manager = _scheduler(num_blocks=10)
    running, waiting = _request("run", 8), _request("wait", 8)
    scheduler.add_request(running)
    _run(scheduler, scheduler.schedule())
    scheduler.add_request(waiting)
    scheduler.finish_request(running, RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request(waiting, RequestStatus.FINISHED_ABORTED)
    assert manager.num_free_blocks == 10 and not scheduler.has_unfinished_requests()


def test_waiting_realtime_goes_before_running_batch_prefill():
    """A realtime prompt is not starved of token budget by a long batch prefill."""
    scheduler, _ = _scheduler(num_blocks=100, max_num_batched_tokens=16)
    batch = _request("batch", 64, priority=1)
    scheduler.add_request(batch)
    _run(scheduler, scheduler.schedule())  # batch's first 16-token chunk
    scheduler.add_request(_request("rt", 10, priority=0))
    out = scheduler.schedule()  # the new realtime prompt's first step is its own
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("rt", 10)]
    assert [r.request_id for r in scheduler.running] == ["rt", "batch"]
    _run(scheduler, out)
    out = scheduler.schedule()  # then the batch prefill goes on, beside rt's decode
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("rt", 1), ("batch", 15)]


def test_background_prefill_is_capped_while_realtime_runs():
    """Batch prompts prefill in small chunks while a realtime request is in the engine."""
    scheduler, _ = _scheduler(num_blocks=200, max_num_batched_tokens=256, background_prefill_tokens=32)
    scheduler.add_request(_request("rt", 8, priority=0))
    for i in range(3):
        scheduler.add_request(_request(f"b{i}", 100, priority=1))
    out = scheduler.schedule()
    chunks = [(c.request.request_id, c.num_new_tokens) for c in out.chunks]
    assert chunks == [("rt", 8), ("b0", 32)]  # 32 background prefill tokens in all
    _run(scheduler, out)
    out = scheduler.schedule()  # rt decodes; the cap applies again
    assert sum(c.num_new_tokens for c in out.chunks if c.request.priority == 1) == 32


def test_background_prefill_is_not_capped_when_alone():
    scheduler, _ = _scheduler(num_blocks=200, max_num_batched_tokens=256, background_prefill_tokens=32)
    for i in range(3):
        scheduler.add_request(_request(f"b{i}", 100, priority=1))
    out = scheduler.schedule()
    assert [c.num_new_tokens for c in out.chunks] == [100, 100, 56]


def test_new_realtime_prompt_gets_a_step_without_batch_decodes():
    scheduler, _ = _scheduler(num_blocks=200, max_num_batched_tokens=256)
    for i in range(2):
        scheduler.add_request(_request(f"b{i}", 10, priority=1))
    _run(scheduler, scheduler.schedule())  # both batch prompts prefilled: they decode now
    scheduler.add_request(_request("rt", 12, priority=0))
    out = scheduler.schedule()
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("rt", 12)]
    assert {r.request_id for r in scheduler.running} == {"rt", "b0", "b1"}  # held back, not preempted
    _run(scheduler, out)
    out = scheduler.schedule()
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("rt", 1), ("b0", 1), ("b1", 1)]

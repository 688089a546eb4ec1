"""Iteration-level scheduling under a token budget, with priorities and preemption.

Every step the scheduler decides, for each request, how many of its tokens to
compute: the whole rest of a short prompt, a chunk of a long one, or the one new
token of a decoding request. Running requests go first (in priority order), so
decodes are never starved by a long prefill; waiting requests fill what is left
of the budget. When KV blocks run out, the lowest-priority, latest-arrived
running request is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus

# A chunk that returns every position's logits (prompt logprobs) holds [tokens, vocabulary]
# floats: with chunked prefill it computes at most this many tokens a step.
MAX_ALL_LOGITS_TOKENS = 256


@dataclass
class ScheduledChunk:
    """A run of one request's tokens computed in this step."""

    request: Request
    # Tokens [request.num_computed_tokens, + num_new_tokens) are computed now.
    num_new_tokens: int
    # True when the chunk reaches the request's last token, so a new token is sampled.
    samples_token: bool
    # Proposed tokens at the end of the chunk, verified by this step (speculative decoding).
    num_spec_tokens: int = 0
    # Logits for every position of the chunk (scoring a text), not just the sampling ones.
    all_logits: bool = False

    @property
    def num_logits(self) -> int:
        """Logits rows the chunk gets: all its tokens (scoring, prompt logprobs), or the last
        position and those that verify proposals, or none."""
        if self.all_logits:
            return self.num_new_tokens
        if self.samples_token:
            return 1 + self.num_spec_tokens
        return 0


@dataclass
class SchedulerOutput:
    """What one step computes."""

    # In execution order: running requests first, then newly admitted ones.
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests preempted in this step (blocks freed, back in the waiting queue).
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, loras=None) -> None:
        """loras: the engine's LoRAManager (engine/lora.py): a request served by an adapter
        runs only while its adapter holds one of the model's slots."""
        self.loras = loras
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.background_prefill_tokens = config.background_prefill_tokens if config.enable_chunked_prefill else None
        self.block_manager = block_manager
        # Heap of (priority, arrival_seq, request).
        self.waiting: list[tuple[int, int, Request]] = []
        # Kept sorted by Request.sort_key at the start of each step.
        self.running: list[Request] = []
        self._arrival_counter = itertools.count()
        self.num_prefix_waits = 0  # steps a waiting request sat out for another's prompt blocks

    # --- queue management -------------------------------------------------

    def add_request(self, request: Request) -> None:
        request.arrival_seq = next(self._arrival_counter)
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self.waiting, (request.priority, request.arrival_seq, request))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues for good and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting = [item for item in self.waiting if item[2] is not request]
            heapq.heapify(self.waiting)
        request.status = status
        self.block_manager.free(request)
        self._release_lora(request)

    def _waits_for_prefix(self, request: Request) -> bool:
        """Whether a running request of the same or a better priority is computing the next
        prompt block `request` needs: it then waits for those blocks to land in the prefix
        cache (one computation instead of two racing for the step's tokens). A worse-priority
        owner (a batch prefill, held back) is not waited for."""
        if request.needs_prompt_logprobs:
            return False  # computes its whole prompt whatever the cache holds
        owner = self.block_manager.computing_next(request)
        if owner is None or owner.priority > request.priority or owner.status != RequestStatus.RUNNING:
            return False
        self.num_prefix_waits += 1
        return True

    def _release_lora(self, request: Request) -> None:
        if request.lora_slot is not None:
            self.loras.release(request.lora_slot)
            request.lora_slot = None

    def _has_lora_slot(self, request: Request) -> bool:
        """Whether the request's adapter (if any) holds a slot for it, taking one if it can."""
        if request.lora is None or request.lora_slot is not None:
            return True
        request.lora_slot = self.loras.acquire(request.lora)
        return request.lora_slot is not None

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.block_manager.free(request)
        self._release_lora(request)
        request.spec_token_ids = []
        out.preempted.append(request)
        request.num_computed_tokens = request.draft_num_computed_tokens = 0
        request.metrics.num_preemptions += 1
        self._push_waiting(request)

    def preempt_all(self) -> list[Request]:
        """Send every running request back to the queue, to be recomputed from its tokens."""
        out = SchedulerOutput()
        while self.running:
            request = self.running.pop()
            request.in_flight = False
            self._preempt(request, out)
        return out.preempted

    # --- the step ---------------------------------------------------------

    def schedule(self, max_chunks: int | None = None) -> SchedulerOutput:
        """Pick this step's chunks: running and waiting requests merged by priority.

        Within a priority, running requests go first (decodes are never starved by a
        new prefill). A waiting request of a better priority goes before running ones
        of a worse priority, so a realtime prompt never waits behind a batch prefill.

        Pipeline micro-batches: requests in a batch still in flight (`request.in_flight`)
        are skipped and never preempted, and `max_chunks` caps this batch's requests so
        the running set splits over the batches in flight.
        """
        out = SchedulerOutput()
        self.running.sort(key=Request.sort_key)
        self._make_room_for_higher_priority(out)
        num_preempted_for_priority = len(out.preempted)
        budget = self.max_num_batched_tokens
        # Prefill tokens left this step for requests worse than the best priority present.
        best = min([r.priority for r in self.running] + [w[0] for w in self.waiting[:1]], default=0)
        background = self.background_prefill_tokens

        # A best-priority prompt waiting for its first step gets a step without the
        # worse-priority decodes: its time to first token is then one short step.
        head = self.waiting[0][2] if self.waiting else None
        hold_back = (background is not None and head is not None and head.priority == best
                     and head.num_computed_tokens == 0 and any(r.priority > best for r in self.running))

        def room(request: Request) -> int:
            if background is None or request.priority == best:
                return budget
            if request.num_tokens - request.num_computed_tokens <= 1:
                return budget  # a decode: never held back
            return min(budget, background)

        index = 0  # running[:index] have been considered this step
        can_admit = True  # False once a request could not get blocks or a seat
        # Waiting requests that sit this step out while others go: their LoRA adapter has no
        # free slot, or the next prompt block they need is being computed by another request.
        deferred = []
        while budget > 0 and (max_chunks is None or len(out.chunks) < max_chunks):
            # A step that ran out of blocks admits nothing new: the preempted come back first.
            can_admit = can_admit and len(out.preempted) == num_preempted_for_priority
            request = self.running[index] if index < len(self.running) else None
            head = self.waiting[0][2] if self.waiting and can_admit else None
            if head is not None and (request is None or request.priority > head.priority) \
                    and (self._waits_for_prefix(head) or not self._has_lora_slot(head)):
                deferred.append(heapq.heappop(self.waiting))
                continue
            if request is None and head is None:
                break
            if request is not None and (head is None or request.priority <= head.priority):
                if request.in_flight or (hold_back and request.priority > best):
                    index += 1  # sits this step out (not preempted: it keeps its blocks)
                    continue
                num_new = self._num_new_tokens(request, room(request))
                if num_new > 1 and request.spec_token_ids and not self.block_manager.allocate_slots(
                        request, request.num_computed_tokens + num_new):
                    request.spec_token_ids = []  # speculation never preempts anyone: decode plainly
                    num_new = 1
                if num_new and not self._allocate_or_preempt(request, num_new, out):
                    continue  # the request preempted itself; `running` shrank under index
                if num_new:
                    self._add_chunk(out, request, num_new)
                    budget -= num_new
                index += 1
            elif self._admit(head, room(head), index, out):
                num_new = out.chunks[-1].num_new_tokens
                budget -= num_new
                request = head
                index += 1
            else:
                can_admit = False
                continue
            if background is not None and request.priority != best and num_new > 1 and not request.spec_token_ids:
                background -= num_new
        for item in deferred:
            heapq.heappush(self.waiting, item)
        return out

    def _make_room_for_higher_priority(self, out: SchedulerOutput) -> None:
        """Preempt lower-priority running requests a waiting higher-priority one cannot run without."""
        if not self.waiting:
            return
        head = self.waiting[0][2]
        num_new = self._num_new_tokens(head, self.max_num_batched_tokens)
        needed = self.block_manager.num_blocks_needed(head, head.num_computed_tokens + num_new)
        while len(self.running) >= self.max_num_seqs or not self.block_manager.can_allocate(needed):
            victim = self._last_preemptable()
            if victim is None or self.running[victim].priority <= head.priority:
                return
            self._preempt(self.running.pop(victim), out)

    def _last_preemptable(self) -> int | None:
        """Index of the last running request not in a batch in flight (the next victim)."""
        for i in range(len(self.running) - 1, -1, -1):
            if not self.running[i].in_flight:
                return i
        return None

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for the chunk, preempting from the back of `running` as needed (the
        request itself, not in flight, is the last candidate: victims are never before it)."""
        total = request.num_computed_tokens + num_new
        while not self.block_manager.allocate_slots(request, total):
            victim = self.running.pop(self._last_preemptable())
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _admit(self, request: Request, budget: int, index: int, out: SchedulerOutput) -> bool:
        """Move the waiting head into `running` at `index` with its first chunk, if it fits."""
        if len(self.running) >= self.max_num_seqs:
            self._release_lora(request)
            return False
        if request.num_computed_tokens == 0:
            request.num_computed_tokens = self.block_manager.match_prefix(request)
        num_new = self._num_new_tokens(request, budget)
        if num_new == 0 or not self.block_manager.allocate_slots(request, request.num_computed_tokens + num_new):
            self.block_manager.free(request)  # hand back the cached blocks it matched
            self._release_lora(request)
            request.num_computed_tokens = 0
            return False
        self.block_manager.claim(request)
        if request.metrics.first_scheduled_time is None:
            request.metrics.num_cached_tokens = request.num_computed_tokens
        heapq.heappop(self.waiting)
        request.status = RequestStatus.RUNNING
        self.running.insert(index, request)
        self._add_chunk(out, request, num_new)
        return True

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining == 1 and request.spec_token_ids:  # a decode with proposals to verify
            del request.spec_token_ids[max(0, budget - 1):]
            return min(budget, 1 + len(request.spec_token_ids))
        if self.enable_chunked_prefill and request.needs_prompt_logprobs:
            budget = min(budget, MAX_ALL_LOGITS_TOKENS)
        if remaining <= budget:
            return remaining
        # Without chunked prefill a prompt runs whole or waits for a step with room.
        return budget if self.enable_chunked_prefill else 0

    @staticmethod
    def _add_chunk(out: SchedulerOutput, request: Request, num_new: int) -> None:
        end = request.num_computed_tokens + num_new
        out.chunks.append(ScheduledChunk(request, num_new, end >= request.num_tokens,
                                         max(0, end - request.num_tokens), request.needs_prompt_logprobs))

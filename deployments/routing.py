"""Replica choice for the LLM server: cache-aware, balanced, with live load.

Serve runs a request router in every process that calls the LLM server (the ingress
and the batch runner). `server.routing` picks one:

- `prefix_affinity` (default, `CacheAwareRouter`): a request whose prompt shares a
  long prefix with an earlier one (a system prompt, a few-shot header, the earlier
  turns of a conversation) goes to the replica that served that prefix, whose prefix
  cache holds its KV blocks, unless that replica is overloaded (bounded load: more
  than LOAD_BOUND x the mean requests in flight, plus LOAD_SLACK); otherwise power
  of two choices.
- `power_of_two` (`CacheAwareRouter` without affinity): two replicas drawn at random,
  weighted by their free KV blocks (reported every second), the one with fewer
  requests in flight first. Requests in flight are counted by this process as it
  routes and as answers finish: live, not a report a second old.
- `free_kv` (`FreeKVRouter`, the earlier policy): replicas ranked by reported free KV
  blocks; between two reports every request goes to the same best replica.

A prefix is hashed at a few lengths of the prompt's text (PREFIX_LEVELS characters);
the longest one known wins. Each caller process keeps its own table (bounded, least
recently used out). FIFOMixin hands a chosen replica to the oldest waiting request.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict, defaultdict

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

# Prompt prefixes (characters) that are remembered; shorter prompts have no affinity.
PREFIX_LEVELS = (256, 1024, 4096, 16384)
MAX_PREFIXES = 65536
# Bounded load: a replica keeps its affinity while its requests in flight are at most
# LOAD_BOUND x the mean over the candidates + LOAD_SLACK.
LOAD_BOUND = 1.25
LOAD_SLACK = 2
PICK_TTL_S = 10.0
# LLM server methods whose first arguments are (prompt, messages, ...).
GENERATE_METHODS = ("generate", "stream", "complete")


def rank_by_free_kv(stats: list[dict]) -> list[int]:
    """Indices of replicas, best first: most free KV blocks, then fewest waiting requests."""
    return sorted(range(len(stats)), key=lambda i: (-stats[i]["num_free_blocks"], stats[i]["num_waiting"]))


def prompt_text(prompt, messages) -> str:
    """The text a request's prefix is read from: its messages (role and content, in order),
    its prompt text, or its token ids."""
    if messages:
        return "".join(f"{m.get('role', '')}\n{m.get('content') or ''}\n" for m in messages)
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(str(token) for token in prompt)
    return ""


def prefix_keys(text: str) -> list[bytes]:
    """Keys of the text's prefixes at each level it reaches, shortest first."""
    data = text.encode("utf-8", "surrogatepass")
    return [hashlib.blake2b(data[:level], digest_size=16, person=str(level).encode()).digest()
            for level in PREFIX_LEVELS if len(data) >= level]


class CacheAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, prefix_affinity: bool = True, **kwargs) -> None:
        self.prefix_affinity = prefix_affinity
        self._inflight: defaultdict[str, int] = defaultdict(int)
        # Requests this router has picked a replica for that Serve has not yet sent: counted
        # on that replica meanwhile, or a burst routed in one moment would all see the same
        # counts and herd. {id(pending request): replica}
        # (A request cancelled before it is sent never reaches on_request_routed: its pick
        # expires after PICK_TTL_S.)
        self._picked: dict[int, tuple[str, float]] = {}
        self._owners: OrderedDict[bytes, str] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every call considers all replicas: let Serve back off between rounds (without
            # this its retry loop never yields and starves the event loop it runs on).
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        ranks = None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if self.prefix_affinity:
            for key in reversed(_keys(pending_request)):  # the longest known prefix
                owner = by_id.get(self._owners.get(key))
                if owner is not None and not self._overloaded(owner, candidate_replicas):
                    self._owners.move_to_end(key)
                    ranks = [[owner]] + self._two_choices([r for r in candidate_replicas if r is not owner])
                    break
        ranks = ranks or self._two_choices(candidate_replicas)
        if pending_request is not None:
            now = time.monotonic()
            for key in [k for k, (_, when) in self._picked.items() if now - when > PICK_TTL_S]:
                self._done(self._picked.pop(key)[0])
            self._unpick(pending_request)
            replica = ranks[0][0].replica_id.unique_id
            self._picked[id(pending_request)] = (replica, now)
            self._inflight[replica] += 1
        return ranks

    def _unpick(self, pending_request: PendingRequest) -> None:
        picked = self._picked.pop(id(pending_request), None)
        if picked is not None:
            self._done(picked[0])

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        self._unpick(pending_request)
        replica = replica_id.unique_id
        self._inflight[replica] += 1
        result.add_done_callback(lambda _: self._done(replica))
        for key in _keys(pending_request):
            if self._owners.get(key) is None:  # the first replica to hold a prefix keeps it
                self._owners[key] = replica
            self._owners.move_to_end(key)
        while len(self._owners) > MAX_PREFIXES:
            self._owners.popitem(last=False)

    def _done(self, replica: str) -> None:
        self._inflight[replica] = max(0, self._inflight[replica] - 1)

    def _overloaded(self, replica: RunningReplica, candidates: list[RunningReplica]) -> bool:
        mean = sum(self._inflight[r.replica_id.unique_id] for r in candidates) / len(candidates)
        return self._inflight[replica.replica_id.unique_id] > LOAD_BOUND * mean + LOAD_SLACK

    def _two_choices(self, candidates: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Two replicas drawn by free KV blocks, fewer requests in flight first (then the rest,
        so a full pair does not stall the request)."""
        if len(candidates) <= 2:
            pair = list(candidates)
        else:
            weights = [1 + (r.routing_stats or {}).get("num_free_blocks", 0) for r in candidates]
            first = random.choices(range(len(candidates)), weights)[0]
            rest = [i for i in range(len(candidates)) if i != first]
            second = random.choices(rest, [weights[i] for i in rest])[0]
            pair = [candidates[first], candidates[second]]
        random.shuffle(pair)  # ties broken at random
        pair.sort(key=lambda r: self._inflight[r.replica_id.unique_id])
        others = [r for r in candidates if r not in pair]
        return [[r] for r in pair] + ([others] if others else [])


class FreeKVRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        stats = [r.routing_stats or {} for r in candidate_replicas]
        if not candidate_replicas or not all("num_free_blocks" in s for s in stats):
            chosen = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [chosen] if chosen else []
        return [[candidate_replicas[i]] for i in rank_by_free_kv(stats)]


def _keys(pending_request: PendingRequest | None) -> list[bytes]:
    """A request's affinity keys, shortest first: for a LoRA adapter's request its adapter
    (the replica that loaded it keeps it resident), then its prompt's prefixes (salted by
    the adapter: its KV blocks are its own)."""
    if pending_request is None or pending_request.metadata.call_method not in GENERATE_METHODS:
        return []
    args = pending_request.args
    if len(args) < 2:
        return []
    lora = (pending_request.kwargs or {}).get("lora")
    if lora is None:
        return prefix_keys(prompt_text(args[0], args[1]))
    salt = f"lora:{lora[0]}\n"
    return [hashlib.blake2b(salt.encode(), digest_size=16).digest()] + \
        prefix_keys(salt + prompt_text(args[0], args[1]))


# The routers `server.routing` names, and their initialize_state arguments.
POLICIES = {
    "prefix_affinity": ("deployments.routing:CacheAwareRouter", {"prefix_affinity": True}),
    "power_of_two": ("deployments.routing:CacheAwareRouter", {"prefix_affinity": False}),
    "free_kv": ("deployments.routing:FreeKVRouter", {}),
}

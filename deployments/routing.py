"""Replica choice for the LLM server: the replica with the most free KV cache first.

Serve runs this request router in every process that calls the LLM server (the
ingress and the batch runner). Replicas report their free KV blocks through
`LLMServer.record_routing_stats`; replicas are ranked by free blocks (then by
fewest waiting requests), one replica per tier, so Serve tries the best one and
moves down the list only when it is at its `max_ongoing_requests`. Until every
candidate has reported, Serve's default choice (power of two choices on queue
length) decides. FIFOMixin hands a chosen replica to the oldest waiting request
(the bare RequestRouter only matches a replica to the request that asked, and
lets the others wait).
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def rank_by_free_kv(stats: list[dict]) -> list[int]:
    """Indices of replicas, best first: most free KV blocks, then fewest waiting requests."""
    return sorted(range(len(stats)), key=lambda i: (-stats[i]["num_free_blocks"], stats[i]["num_waiting"]))


class FreeKVRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every call considers all replicas: let Serve back off between rounds (without
            # this its retry loop never yields and starves the event loop it runs on).
            pending_request.routing_context.should_backoff = True
        stats = [r.routing_stats or {} for r in candidate_replicas]
        if not candidate_replicas or not all("num_free_blocks" in s for s in stats):
            chosen = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [chosen] if chosen else []
        return [[candidate_replicas[i]] for i in rank_by_free_kv(stats)]

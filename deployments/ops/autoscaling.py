"""The LLM server's autoscaling policy: demand = requests at the replicas + the router's backlog,
and, when targets are set, what users feel: the realtime queue wait and time to first token.

The router holds work back until replicas have room, so Serve's own count of
ongoing requests never exceeds the router's capacity and would never call for
another replica. The replicas report the router's queue depth
(`LLMServer.record_autoscaling_stats`); this policy adds it to Serve's count and
asks for enough replicas to bring each to `target_ongoing_requests`. Serve then
applies min/max replicas and the up/downscale delays to the answer.

With `target_queue_wait_s` or `target_ttft_p90_s` (as Ray Serve LLM's TTFT policy),
the replicas also report the router's realtime queue wait (90th percentile of the last
10 s, or the oldest waiter's age) and their own realtime TTFT p90; a latency over its
target asks for replicas in proportion (current x latency / target), one under half its
target lets the backlog decide, and in between the current count holds (no flapping).
"""

from __future__ import annotations

import math

from ray.serve.config import AutoscalingContext


def router_backlog(ctx: AutoscalingContext) -> float:
    """The router's queue depth as the replicas last reported it (they all see the same router)."""
    reported = (ctx.aggregated_metrics or {}).get("router_queued", {})
    return max(reported.values(), default=0.0)


class BacklogPolicy:
    """The policy Serve runs (a class, so that Serve hands it its policy_kwargs: the targets)."""

    def __init__(self, target_queue_wait_s: float | None = None, target_ttft_p90_s: float | None = None) -> None:
        self.target_queue_wait_s, self.target_ttft_p90_s = target_queue_wait_s, target_ttft_p90_s

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict]:
        return backlog_policy(ctx, self.target_queue_wait_s, self.target_ttft_p90_s)


def backlog_policy(ctx: AutoscalingContext, target_queue_wait_s: float | None = None,
                   target_ttft_p90_s: float | None = None) -> tuple[int, dict]:
    target = ctx.config.target_ongoing_requests or 1.0
    demand = ctx.total_num_requests + router_backlog(ctx)
    desired = math.ceil(demand / target) if demand > 0 else 0
    current = max(1, ctx.current_num_replicas)
    metrics = ctx.aggregated_metrics or {}
    wait = max((metrics.get("router_queue_wait_s") or {}).values(), default=0.0)
    ttft = max((metrics.get("ttft_p90_s") or {}).values(), default=0.0)
    for latency, goal in ((wait, target_queue_wait_s), (wait + ttft, target_ttft_p90_s)):
        if goal:
            desired = max(desired, latency_replicas(current, latency, goal))
    return desired, {}


def latency_replicas(current: int, latency: float, target: float) -> int:
    """Replicas a latency asks for: more in proportion when over target, the current count
    while between half the target and the target, none of its own below half."""
    if latency > target:
        return math.ceil(current * latency / target)
    return current if latency >= target / 2 else 0

"""The LLM server's autoscaling policy: demand = requests at the replicas + the router's backlog.

The router holds work back until replicas have room, so Serve's own count of
ongoing requests never exceeds the router's capacity and would never call for
another replica. The replicas report the router's queue depth
(`LLMServer.record_autoscaling_stats`); this policy adds it to Serve's count and
asks for enough replicas to bring each to `target_ongoing_requests`. Serve then
applies min/max replicas and the up/downscale delays to the answer.
"""

from __future__ import annotations

import math

from ray.serve.config import AutoscalingContext


def router_backlog(ctx: AutoscalingContext) -> float:
    """The router's queue depth as the replicas last reported it (they all see the same router)."""
    reported = (ctx.aggregated_metrics or {}).get("router_queued", {})
    return max(reported.values(), default=0.0)


def backlog_policy(ctx: AutoscalingContext) -> tuple[int, dict]:
    target = ctx.config.target_ongoing_requests or 1.0
    demand = ctx.total_num_requests + router_backlog(ctx)
    desired = math.ceil(demand / target) if demand > 0 else 0
    return desired, {}

"""The service's metrics on its own HTTP port (`GET /metrics`), under vLLM's names.

Dashboards, autoscalers (KEDA, HPA adapters) and endpoint pickers built for vLLM read
`vllm:*` series from the server's `/metrics`. semline's replicas record their figures through
Ray's metrics API, which every node exports on its metrics port (`ray_semline_*`, one series
per worker process). This module reads those ports, keeps semline's series, and sums them
over the replicas and nodes (Ray's per-process labels dropped): the figures both measure
under vLLM's names and labels (`model_name`, `finished_reason`), and every semline figure
(FLOPs, energy, lanes, experiment arms, the router) under its own name beside them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

RAY_PREFIX = "ray_"
# semline's metric families (as Ray exports them, without "ray_") that vLLM also has.
VLLM_NAMES = {
    "semline_num_requests_running": "vllm:num_requests_running",
    "semline_num_requests_waiting": "vllm:num_requests_waiting",
    "semline_kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "semline_prompt_tokens": "vllm:prompt_tokens",
    "semline_generation_tokens": "vllm:generation_tokens",
    "semline_num_preemptions": "vllm:num_preemptions",
    "semline_request_success": "vllm:request_success",
    "semline_prefix_cache_queries": "vllm:prefix_cache_queries",
    "semline_prefix_cache_hits": "vllm:prefix_cache_hits",
    "semline_spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "semline_spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
    "semline_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "semline_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "semline_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "semline_request_queue_time_seconds": "vllm:request_queue_time_seconds",
    "semline_request_prompt_tokens": "vllm:request_prompt_tokens",
    "semline_request_generation_tokens": "vllm:request_generation_tokens",
}
# vLLM's series carry these labels only (semline's lane is summed away under vLLM's names).
VLLM_LABELS = frozenset({"model_name", "finished_reason", "le"})
# Labels Ray adds to every series (which process, node and session recorded it).
RAY_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId",
                        "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"})
# Gauges that are a fraction per replica: their mean over the replicas, not their sum.
MEAN_GAUGES = frozenset({"semline_kv_cache_usage_perc"})
# Gauges every ingress replica reports whole (the feedback store's summary): the largest.
MAX_GAUGES = frozenset({"semline_feedback_score_sum", "semline_feedback_count"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _ours(text: str) -> str:
    """The lines of a node's exposition that are semline's (a node exports ~300 KB of Ray's own)."""
    keep = ("ray_semline_", "# HELP ray_semline_", "# TYPE ray_semline_")
    return "\n".join(line for line in text.splitlines() if line.startswith(keep)) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Family:
    def __init__(self, name: str, kind: str, documentation: str, how: str) -> None:
        self.name, self.kind, self.documentation, self.how = name, kind, documentation, how
        # (sample name, labels) -> the values of the replicas' series
        self.samples: dict[tuple[str, tuple], list[float]] = defaultdict(list)

    def add(self, sample_name: str, labels: tuple, value: float) -> None:
        self.samples[(sample_name, labels)].append(value)

    def lines(self) -> list[str]:
        head = self.name + ("_total" if self.kind == "counter" else "")
        out = [f"# HELP {head} {self.documentation}", f"# TYPE {head} {self.kind}"]
        for (sample, labels), values in sorted(self.samples.items(), key=_bucket_order):
            value = {"mean": sum(values) / len(values), "max": max(values)}.get(self.how, sum(values))
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{sample}{{{text}}} {_number(value)}" if text else f"{sample} {_number(value)}")
        return out


def _bucket_order(item) -> tuple:
    """Series by name and labels, a histogram's buckets by their bound."""
    (sample, labels), _ = item
    rest = tuple((k, v) for k, v in labels if k != "le")
    bound = next((float(v) for k, v in labels if k == "le"), 0.0)
    return sample, rest, bound


def translate(texts: list[str]) -> str:
    """Prometheus text of semline's series summed over the expositions `texts` (one per node),
    vLLM's names first, then semline's own."""
    families: dict[str, _Family] = {}
    for text in texts:
        for family in text_string_to_metric_families(_ours(text)):
            base = family.name[len(RAY_PREFIX):]  # e.g. semline_prompt_tokens (counters: no _total)
            how = "mean" if base in MEAN_GAUGES else "max" if base in MAX_GAUGES else "sum"
            outputs = [(base, None)]
            if base in VLLM_NAMES:
                outputs.insert(0, (VLLM_NAMES[base], VLLM_LABELS))
            for name, allowed in outputs:
                target = families.get(name)
                if target is None:
                    target = families[name] = _Family(name, family.type, family.documentation, how)
                for sample in family.samples:
                    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in RAY_LABELS
                                          and (allowed is None or k in allowed)))
                    target.add(name + sample.name[len(family.name):], labels, sample.value)
    ordered = sorted(families.values(), key=lambda f: (not f.name.startswith("vllm:"), f.name))
    return "\n".join(line for family in ordered for line in family.lines()) + "\n"


class MetricsExposition:
    """Reads the metrics ports of the cluster's live nodes (at most once a `max_age_s`)."""

    def __init__(self, max_age_s: float = 1.0, timeout_s: float = 5.0) -> None:
        self.max_age_s, self.timeout_s = max_age_s, timeout_s
        self._cached: tuple[float, str] | None = None
        self._lock = asyncio.Lock()

    async def text(self) -> str:
        async with self._lock:  # concurrent scrapes share one read of the nodes
            if self._cached is not None and time.monotonic() - self._cached[0] < self.max_age_s:
                return self._cached[1]
            targets = await asyncio.to_thread(_metrics_targets)
            async with httpx.AsyncClient(timeout=self.timeout_s) as http:
                answers = await asyncio.gather(*(http.get(url) for url in targets), return_exceptions=True)
            texts = [a.text for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
            result = await asyncio.to_thread(translate, texts)
            self._cached = (time.monotonic(), result)
            return result


def _metrics_targets() -> list[str]:
    """The metrics URL of every live node of the Ray cluster this process belongs to."""
    import ray

    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort")]

"""Prometheus metrics of the service, through Ray's metrics API (`ray.util.metrics`).

Ray exports them on each node's metrics port with a `ray_` prefix (and `_total`
on counters): `semline_generation_tokens` is scraped as
`ray_semline_generation_tokens_total`. Names follow vLLM's, under `semline_`,
with a `model_name` tag and a `lane` tag where it applies.
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

from cluster.admission import lane_of_priority
from engine.metrics import EngineStats
from engine.outputs import RequestOutput

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]

class ServerMetrics:
    """The LLM server replica's metrics: engine counters as deltas, gauges, per-request histograms."""

    def __init__(self, model_name: str) -> None:
        self.tags = {"model_name": model_name}
        model, lane = ("model_name",), ("model_name", "lane")
        self.running = Gauge("semline_num_requests_running", "Requests in the engine's running set.", model)
        self.waiting = Gauge("semline_num_requests_waiting", "Requests waiting in the engine.", model)
        self.kv_usage = Gauge("semline_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", model)
        self.counters = {
            "num_prompt_tokens": Counter("semline_prompt_tokens", "Prompt tokens processed.", model),
            "num_generation_tokens": Counter("semline_generation_tokens", "Tokens generated.", model),
            "num_preemptions": Counter("semline_num_preemptions", "Requests preempted.", model),
            "prefix_cache_queries": Counter("semline_prefix_cache_queries", "Prompt tokens looked up.", model),
            "prefix_cache_hits": Counter("semline_prefix_cache_hits", "Prompt tokens found cached.", model),
            "flops": Counter("semline_flops", "Floating-point operations (2 x params x tokens + attention).", model),
            "energy_joules": Counter("semline_energy_joules", "Energy used (measured or estimated).", model),
            "spec_num_draft_tokens": Counter("semline_spec_decode_num_draft_tokens",
                                             "Tokens proposed by speculative decoding.", model),
            "spec_num_accepted_tokens": Counter("semline_spec_decode_num_accepted_tokens",
                                                "Proposed tokens the model accepted.", model),
        }
        self.success = Counter("semline_request_success", "Finished requests.", model + ("lane", "finished_reason"))
        self.ttft = Histogram("semline_time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS, lane)
        self.itl = Histogram("semline_inter_token_latency_seconds", "Time between output tokens.",
                             LATENCY_BUCKETS, lane)
        self.e2e = Histogram("semline_e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS, lane)
        self.queue = Histogram("semline_request_queue_time_seconds", "Arrival to first scheduled.",
                               LATENCY_BUCKETS, lane)
        self.prompt_tokens = Histogram("semline_request_prompt_tokens", "Prompt tokens per request.",
                                       TOKEN_BUCKETS, lane)
        self.generation_tokens = Histogram("semline_request_generation_tokens", "Output tokens per request.",
                                           TOKEN_BUCKETS, lane)
        self._last = EngineStats()
        for counter in self.counters.values():
            # Export 0 before the first event, so "no preemptions yet" is a series with value 0
            # rather than no series (Ray's public inc() refuses 0).
            counter._record(0.0, tags=self.tags)

    def update_engine(self, stats: EngineStats) -> None:
        """Gauges now, counters by what they grew since the last call."""
        self.running.set(stats.num_running, self.tags)
        self.waiting.set(stats.num_waiting, self.tags)
        self.kv_usage.set(stats.kv_cache_usage, self.tags)
        for field, counter in self.counters.items():
            delta = getattr(stats, field) - getattr(self._last, field)
            if delta > 0:
                counter.inc(delta, self.tags)
        self._last = stats

    def request_tracker(self, priority: int) -> "RequestTracker":
        return RequestTracker(self, lane_of_priority(priority))


class RequestTracker:
    """Follows one request's stream: inter-token gaps as tokens arrive, the rest at the end."""

    def __init__(self, metrics: ServerMetrics, lane: str) -> None:
        self.metrics, self.tags = metrics, {**metrics.tags, "lane": lane}
        self.last_token_time: float | None = None

    def observe(self, output: RequestOutput) -> None:
        now, new = time.time(), len(output.delta_token_ids)
        if new > 0:
            if self.last_token_time is not None:
                gap = (now - self.last_token_time) / new
                for _ in range(new):
                    self.metrics.itl.observe(gap, self.tags)
            self.last_token_time = now
        if output.finished:
            self.finish(output)

    def finish(self, output: RequestOutput) -> None:
        m, tags = output.metrics, self.tags
        self.metrics.success.inc(1, {**tags, "finished_reason": output.finish_reason or "abort"})
        if m.time_to_first_token is not None:
            self.metrics.ttft.observe(m.time_to_first_token, tags)
        if m.queue_time is not None:
            self.metrics.queue.observe(m.queue_time, tags)
        if m.finished_time is not None:
            self.metrics.e2e.observe(m.finished_time - m.arrival_time, tags)
        self.metrics.prompt_tokens.observe(m.num_prompt_tokens, tags)
        self.metrics.generation_tokens.observe(m.num_generated_tokens, tags)


# The arm label of requests outside any experiment.
NO_ARM = "none"


class QualityMetrics:
    """The ingress's view per served model and experiment arm (model_name, experiment, arm):
    requests, time to first token, end-to-end latency and output tokens of each arm, users'
    feedback, output-filter hits and result-cache lookups."""

    def __init__(self) -> None:
        arm = ("model_name", "experiment", "arm")
        self.requests = Counter("semline_arm_requests", "Requests answered, per model and experiment arm.", arm)
        self.ttft = Histogram("semline_arm_time_to_first_token_seconds", "Time to first token per arm.",
                              LATENCY_BUCKETS, arm)
        self.e2e = Histogram("semline_arm_e2e_request_latency_seconds", "Arrival to last token per arm.",
                             LATENCY_BUCKETS, arm)
        self.tokens = Counter("semline_arm_generation_tokens", "Output tokens per arm.", arm)
        self.feedback_sum = Gauge("semline_feedback_score_sum", "Sum of users' scores (thumbs up = 1, down = 0).", arm)
        self.feedback_count = Gauge("semline_feedback_count", "Ratings received.", arm)
        self.filter_hits = Counter("semline_filter_hits", "Output filter matches.", arm + ("filter",))
        self.cache = Counter("semline_result_cache_requests", "Result cache lookups.", arm + ("result",))
        # Per tenant (names from the config: bounded) and lane.
        tenant = ("tenant", "lane")
        self.tenant_requests = Counter("semline_tenant_requests", "Requests answered, per tenant and lane.", tenant)
        self.tenant_tokens = Counter("semline_tenant_tokens", "Prompt and generated tokens per tenant and lane.",
                                     tenant + ("kind",))
        self.tenant_ttft = Histogram("semline_tenant_time_to_first_token_seconds", "Time to first token per "
                                     "tenant and lane (admission wait included).", LATENCY_BUCKETS, tenant)

    @staticmethod
    def tags(target) -> dict:
        return {"model_name": target.model, "experiment": target.experiment or NO_ARM, "arm": target.arm or NO_ARM}

    def answered(self, target, outputs: list[RequestOutput], tenant: str | None = None, lane: str = "realtime") -> None:
        tags = self.tags(target)
        self.requests.inc(1, tags)
        tokens = sum(len(o.token_ids) for o in outputs)
        if tokens:
            self.tokens.inc(tokens, tags)
        if tenant is not None:
            who = {"tenant": tenant, "lane": lane}
            self.tenant_requests.inc(1, who)
            prompt = sum(o.metrics.num_prompt_tokens for o in outputs if o.metrics is not None)
            for kind, count in (("prompt", prompt), ("generation", tokens)):
                if count:
                    self.tenant_tokens.inc(count, {**who, "kind": kind})
            first = outputs[0].metrics if outputs else None
            if first is not None and first.time_to_first_token is not None:
                self.tenant_ttft.observe(first.time_to_first_token, who)
        for out in outputs[:1]:
            m = out.metrics
            if m.time_to_first_token is not None:
                self.ttft.observe(m.time_to_first_token, tags)
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time, tags)

    def filtered(self, target, hits: dict[str, int]) -> None:
        for name, count in hits.items():
            self.filter_hits.inc(count, {**self.tags(target), "filter": name})

    def cache_lookup(self, target, hit: bool) -> None:
        self.cache.inc(1, {**self.tags(target), "result": "hit" if hit else "miss"})

    def feedback(self, summary: dict) -> None:
        """summary: {(model, experiment, arm): (score sum, count)} from the feedback store."""
        for (model, experiment, arm), (total, count) in summary.items():
            tags = {"model_name": model, "experiment": experiment or NO_ARM, "arm": arm or NO_ARM}
            self.feedback_sum.set(total, tags)
            self.feedback_count.set(count, tags)

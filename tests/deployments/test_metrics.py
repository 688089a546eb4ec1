"""Prometheus metrics: a real Prometheus scrapes the Ray cluster; counters match the traffic sent."""

from __future__ import annotations

import httpx

from tests.deployments.conftest import MODEL
from tests.deployments.promql import query, settled, value, wait_for

NAMES = [
    "ray_semline_num_requests_running", "ray_semline_num_requests_waiting", "ray_semline_kv_cache_usage_perc",
    "ray_semline_router_queue_depth", "ray_semline_router_inflight",
    "ray_semline_prompt_tokens_total", "ray_semline_generation_tokens_total", "ray_semline_num_preemptions_total",
    "ray_semline_request_success_total", "ray_semline_prefix_cache_queries_total",
    "ray_semline_prefix_cache_hits_total", "ray_semline_flops_total", "ray_semline_energy_joules_total",
    "ray_semline_time_to_first_token_seconds_bucket", "ray_semline_inter_token_latency_seconds_bucket",
    "ray_semline_e2e_request_latency_seconds_bucket", "ray_semline_request_queue_time_seconds_bucket",
    "ray_semline_request_prompt_tokens_bucket", "ray_semline_request_generation_tokens_bucket",
]


def test_counters_match_the_traffic_and_every_metric_has_data(client, prometheus):
    tokens = f'sum(ray_semline_generation_tokens_total{{model_name="{MODEL}"}})'
    prompt = f'sum(ray_semline_prompt_tokens_total{{model_name="{MODEL}"}})'
    # (no series at all until a first request succeeded)
    success = f'sum(ray_semline_request_success_total{{model_name="{MODEL}",lane="realtime"}}) or vector(0)'
    before = {q: settled(prometheus, q) for q in (tokens, prompt, success)}

    usages = []
    for i in range(3):
        resp = client.chat.completions.create(model=MODEL, max_tokens=6 + i, temperature=0,
                                              messages=[{"role": "user", "content": f"Say hello {i}."}])
        usages.append(resp.usage)
    stream = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}, temperature=0)
    usages.append([chunk for chunk in stream][-1].usage)

    expected = {tokens: sum(u.completion_tokens for u in usages), prompt: sum(u.prompt_tokens for u in usages),
                success: len(usages)}
    for promql, delta in expected.items():
        wait_for(prometheus, lambda: value(prometheus, promql), lambda v: v >= before[promql] + delta, promql)
        assert settled(prometheus, promql) == before[promql] + delta, promql

    missing = [name for name in NAMES if not query(prometheus, name)]
    assert not missing, f"no data in Prometheus for {missing}"
    ttft_count = 'sum(ray_semline_time_to_first_token_seconds_count{lane="realtime"})'
    assert value(prometheus, ttft_count) >= len(usages)


# What vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json in
# vLLM's repository) asks Prometheus, with its $model_name variable set; each must return data.
VLLM_DASHBOARD_QUERIES = [
    'histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="$m"}[1m])))',
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$m"}[1m])'
    ' / rate(vllm:e2e_request_latency_seconds_count{model_name="$m"}[1m])',
    'rate(vllm:prompt_tokens_total{model_name="$m"}[1m])',
    'rate(vllm:generation_tokens_total{model_name="$m"}[1m])',
    'histogram_quantile(0.9, sum by(le) (rate(vllm:inter_token_latency_seconds_bucket{model_name="$m"}[1m])))',
    'vllm:num_requests_running{model_name="$m"}',
    'vllm:num_requests_waiting{model_name="$m"}',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{model_name="$m"}[1m])))',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$m"}[1m]))',
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$m"}[1m]))',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$m"}[1m]))',
    'vllm:kv_cache_usage_perc{model_name="$m"}',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$m"}[1m])',
    'rate(vllm:prefix_cache_hits_total{model_name="$m"}[1m]) / rate(vllm:prefix_cache_queries_total{model_name="$m"}[1m])',
]


def test_http_metrics_use_vllms_names_and_its_dashboard_has_data(client, prometheus, serve_app):
    """GET /metrics on the HTTP port (no key, as vLLM's): the replicas' figures under vLLM's names
    and labels, equal to semline's own series summed; scraped by the real Prometheus, every
    query of vLLM's Grafana dashboard returns data; semline's own figures are beside them."""
    total = f'sum(vllm:generation_tokens_total{{model_name="{MODEL}"}})'
    ours = f'sum(ray_semline_generation_tokens_total{{model_name="{MODEL}"}})'
    before = settled(prometheus, f"{ours} or vector(0)")
    generated = 0
    for i in range(3):  # traffic within the queries' 1-minute windows, the same prompt twice (cache hits)
        generated += client.completions.create(
            model=MODEL, prompt="A prefix long enough to fill one cached block of sixteen tokens, and then "
            "some more words.", max_tokens=4 + i, temperature=0).usage.completion_tokens
    text = httpx.get(f"{serve_app}/metrics", timeout=30).text
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}}' in text
    assert "semline_flops_total" in text and "semline_router_queue_depth" in text and "ray_" not in text
    assert 'lane="' not in "".join(line for line in text.splitlines() if line.startswith("vllm:"))
    # The two series come from two scrape targets (the HTTP port, Ray's metrics port): compare them
    # once each holds this test's traffic and has stopped moving.
    wait_for(prometheus, lambda: (value(prometheus, total), value(prometheus, ours)),
             lambda pair: pair[0] == pair[1] >= before + generated, "vLLM's and semline's token counters")
    assert settled(prometheus, total) == settled(prometheus, ours) >= before + generated > 0
    empty = []
    for promql in VLLM_DASHBOARD_QUERIES:
        promql = promql.replace("$m", MODEL)
        try:
            wait_for(prometheus, lambda: query(prometheus, promql), bool, promql)
        except AssertionError:
            empty.append(promql)
    assert not empty, f"no data for {empty}"

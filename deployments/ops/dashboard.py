"""The Grafana dashboard, generated from code, and its provisioning with grafana-client.

`build_dashboard()` returns the dashboard JSON (k8s/grafana/semline.json is its
output: `semline dashboard render`); `provision()` creates or updates the
Prometheus datasource and the dashboard through Grafana's HTTP API, and changes
nothing when both are already as they should be.
"""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD_UID = "semline-overview"
DATASOURCE_UID = "semline-prometheus"
DASHBOARD_FILE = Path(__file__).parents[2] / "k8s" / "grafana" / "semline.json"

LANE = "{{lane}}"

# (title, unit, [(PromQL, legend)]): the line's four efficiency figures first.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Output tokens/s per lane", "short", [
        ("sum by (lane) (rate(ray_semline_request_generation_tokens_sum[1m]))", LANE)]),
    ("Time to first token p50 / p99 per lane", "s", [
        ("histogram_quantile(0.5, sum by (le, lane) (rate(ray_semline_time_to_first_token_seconds_bucket[1m])))",
         "p50 " + LANE),
        ("histogram_quantile(0.99, sum by (le, lane) (rate(ray_semline_time_to_first_token_seconds_bucket[1m])))",
         "p99 " + LANE)]),
    ("Inter-token latency p50 / p99 per lane", "s", [
        ("histogram_quantile(0.5, sum by (le, lane) (rate(ray_semline_inter_token_latency_seconds_bucket[1m])))",
         "p50 " + LANE),
        ("histogram_quantile(0.99, sum by (le, lane) (rate(ray_semline_inter_token_latency_seconds_bucket[1m])))",
         "p99 " + LANE)]),
    ("FLOP/s", "flops", [("sum(rate(ray_semline_flops_total[1m]))", "FLOP/s")]),
    ("Joules per token", "joule", [
        ("sum(rate(ray_semline_energy_joules_total[1m])) / (sum(rate(ray_semline_generation_tokens_total[1m]))"
         " + sum(rate(ray_semline_prompt_tokens_total[1m])))", "J/token")]),
    ("Router queue depth per lane", "short", [("sum by (lane) (ray_semline_router_queue_depth)", LANE)]),
    ("KV cache usage", "percentunit", [("max(ray_semline_kv_cache_usage_perc)", "usage")]),
    ("Preemptions/s", "short", [("sum(rate(ray_semline_num_preemptions_total[5m]))", "preemptions/s")]),
    ("Prefix cache hit rate", "percentunit", [
        ("sum(rate(ray_semline_prefix_cache_hits_total[5m])) / sum(rate(ray_semline_prefix_cache_queries_total[5m]))",
         "hit rate")]),
    ("Speculative decoding acceptance rate", "percentunit", [
        ("sum(rate(ray_semline_spec_decode_num_accepted_tokens_total[5m])) / "
         "sum(rate(ray_semline_spec_decode_num_draft_tokens_total[5m]))", "accepted / proposed")]),
    ("Request errors/s", "short", [
        ("sum by (lane, reason) (rate(ray_semline_router_requests_rejected_total[5m]))", "rejected {{lane}} {{reason}}"),
        ('sum by (lane) (rate(ray_semline_request_success_total{finished_reason="abort"}[5m]))', "aborted " + LANE),
        ("sum by (reason) (rate(ray_semline_router_tickets_reclaimed_total[5m]))", "seats reclaimed {{reason}}")]),
    ("Serve replicas", "short", [
        ("sum by (deployment) (ray_serve_deployment_replica_healthy)", "healthy {{deployment}}"),
        ("max by (deployment) (ray_serve_autoscaling_target_replicas)", "target {{deployment}}")]),
]


# The quality row, repeated for each experiment (the $experiment variable: every value of the
# experiment label; "none" is the traffic outside experiments): per arm.
ARM = "{{arm}}"
_EXP = 'experiment="$experiment"'
QUALITY_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Traffic share per arm", "percentunit", [
        (f"sum by (arm) (rate(ray_semline_arm_requests_total{{{_EXP}}}[5m])) / scalar(sum("
         f"rate(ray_semline_arm_requests_total{{{_EXP}}}[5m])))", ARM)]),
    ("Time to first token p90 per arm", "s", [
        ("histogram_quantile(0.9, sum by (le, arm) (rate("
         f"ray_semline_arm_time_to_first_token_seconds_bucket{{{_EXP}}}[5m])))", "p90 " + ARM)]),
    ("Output tokens/s per arm", "short", [
        (f"sum by (arm) (rate(ray_semline_arm_generation_tokens_total{{{_EXP}}}[1m]))", ARM)]),
    ("Feedback score per arm (mean, ratings)", "short", [
        (f"max by (arm) (ray_semline_feedback_score_sum{{{_EXP}}}) / "
         f"max by (arm) (ray_semline_feedback_count{{{_EXP}}})", "mean " + ARM),
        (f"max by (arm) (ray_semline_feedback_count{{{_EXP}}})", "ratings " + ARM)]),
    ("Output filter hits/s per arm", "short", [
        (f"sum by (arm, filter) (rate(ray_semline_filter_hits_total{{{_EXP}}}[5m]))", "{{filter}} " + ARM)]),
    ("Result cache hit rate", "percentunit", [
        (f'sum(rate(ray_semline_result_cache_requests_total{{{_EXP}, result="hit"}}[5m])) / '
         f"sum(rate(ray_semline_result_cache_requests_total{{{_EXP}}}[5m]))", "hit rate")]),
]


def panel_queries() -> list[str]:
    return [expr for _, _, targets in PANELS + QUALITY_PANELS for expr, _ in targets]


def _panel(panel_id: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict:
    return {
        "id": panel_id, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": DATASOURCE_UID},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": DATASOURCE_UID}}
                    for j, (expr, legend) in enumerate(targets)],
    }


def build_dashboard() -> dict:
    panels = [_panel(i + 1, title, unit, targets, 12 * (i % 2), 8 * (i // 2))
              for i, (title, unit, targets) in enumerate(PANELS)]
    top = 8 * ((len(PANELS) + 1) // 2)
    panels.append({"id": len(panels) + 1, "type": "row", "title": "Experiment $experiment", "repeat": "experiment",
                   "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": top}, "panels": []})
    panels += [_panel(len(PANELS) + 2 + i, title, unit, targets, 12 * (i % 2), top + 1 + 8 * (i // 2))
               for i, (title, unit, targets) in enumerate(QUALITY_PANELS)]
    experiment = {
        "name": "experiment", "label": "Experiment", "type": "query",
        "datasource": {"type": "prometheus", "uid": DATASOURCE_UID},
        "query": {"query": "label_values(ray_semline_arm_requests_total, experiment)", "refId": "experiments"},
        "definition": "label_values(ray_semline_arm_requests_total, experiment)",
        "refresh": 2, "multi": True, "includeAll": True, "current": {"text": "All", "value": "$__all"},
    }
    return {"uid": DASHBOARD_UID, "title": "semline", "tags": ["semline", "llm"], "timezone": "browser",
            "schemaVersion": 39, "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "panels": panels,
            "templating": {"list": [experiment]}}


def render(path: Path = DASHBOARD_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_dashboard(), indent=2) + "\n")
    return path


def datasource(prometheus_url: str) -> dict:
    return {"uid": DATASOURCE_UID, "name": "semline-prometheus", "type": "prometheus", "access": "proxy",
            "url": prometheus_url, "isDefault": False, "jsonData": {"timeInterval": "5s"}}


def provision(grafana_url: str, prometheus_url: str, token: str | None = None) -> dict[str, str]:
    """Create or update the datasource and the dashboard; returns what was done to each."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(grafana_url, credential=token)
    done = {}
    wanted = datasource(prometheus_url)
    try:
        current = api.datasource.get_datasource_by_uid(DATASOURCE_UID)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.datasource.create_datasource(wanted)
        done["datasource"] = "created"
    else:
        if any(current.get(key) != value for key, value in wanted.items()):
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, wanted)
            done["datasource"] = "updated"
        else:
            done["datasource"] = "unchanged"
    dashboard = build_dashboard()
    try:
        current = api.dashboard.get_dashboard(DASHBOARD_UID)["dashboard"]
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        current = None
    if current is not None and all(current.get(key) == value for key, value in dashboard.items()):
        done["dashboard"] = "unchanged"
    else:
        api.dashboard.update_dashboard({"dashboard": dashboard, "overwrite": True, "folderId": 0,
                                        "message": "provisioned by semline"})
        done["dashboard"] = "created" if current is None else "updated"
    return done

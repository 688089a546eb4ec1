"""The Grafana dashboard: generated, its queries valid in a real Prometheus, provisioned idempotently."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from deployments.ops.dashboard import (DASHBOARD_FILE, DASHBOARD_UID, DATASOURCE_UID, build_dashboard, panel_queries,
                                   provision)
from tests.deployments.conftest import MODEL
from tests.deployments.promql import query, wait_for

KEY_QUERIES = ["max(ray_semline_kv_cache_usage_perc)", "sum by (lane) (ray_semline_router_queue_depth)",
               "sum(rate(ray_semline_flops_total[1m]))", "sum by (deployment) (ray_serve_deployment_replica_healthy)"]


def test_committed_dashboard_is_the_generated_one():
    assert json.loads(DASHBOARD_FILE.read_text()) == build_dashboard(), "run `semline dashboard render`"
    assert set(KEY_QUERIES) <= set(panel_queries())


def test_every_panel_query_parses_and_key_panels_have_data(client, prometheus):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    for promql in panel_queries():
        resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql})
        assert resp.status_code == 200 and resp.json()["status"] == "success", (promql, resp.text)
    wait_for(prometheus, lambda: [q for q in KEY_QUERIES if not query(prometheus, q)], lambda missing: not missing,
             "key panels without data")
    bad = httpx.get(f"{prometheus}/api/v1/query", params={"query": "sum(rate(x[1m]"})
    assert bad.status_code == 400  # the check above can fail


def test_alert_rules_use_series_that_exist(client, prometheus):
    """Every metric the PrometheusRule's alerts read is one the running application exports
    (promtool, in tests/k8s, only checks the rules against made-up series)."""
    import re

    import openai
    import yaml

    with pytest.raises(openai.NotFoundError):  # an error for the error-rate alert's series
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=2)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    rule = yaml.safe_load((DASHBOARD_FILE.parents[1] / "monitoring" / "prometheusrule.yaml").read_text())
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    wanted = {name for expr in exprs for name in re.findall(r"\b(ray_[a-z_]+)", expr)}
    assert len(wanted) >= 6
    wait_for(prometheus, lambda: wanted - set(httpx.get(f"{prometheus}/api/v1/label/__name__/values").json()["data"]),
             lambda missing: not missing, "series the alerts read, not exported")
    for expr in exprs:
        resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr})
        assert resp.status_code == 200, (expr, resp.text)


class _GrafanaStandIn(BaseHTTPRequestHandler):
    """The few routes of Grafana's HTTP API that provisioning uses, recording every request."""

    state: dict = {}
    requests: list = []

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.requests.append((self.command, self.path, self.headers.get("Authorization"), body))
        return body

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._record()
        key = {f"/api/datasources/uid/{DATASOURCE_UID}": "datasource",
               f"/api/dashboards/uid/{DASHBOARD_UID}": "dashboard"}.get(self.path)
        if key is None or key not in self.state:
            return self._reply(404, {"message": "not found"})
        value = self.state[key]
        self._reply(200, {"dashboard": value, "meta": {"folderId": 0}} if key == "dashboard" else value)

    def do_POST(self):  # noqa: N802
        body = self._record()
        if self.path == "/api/datasources":
            self.state["datasource"] = {**body, "id": 1}
            return self._reply(200, {"id": 1, "message": "Datasource added"})
        if self.path == "/api/dashboards/db":
            self.state["dashboard"] = {**body["dashboard"], "id": 7, "version": 1}
            return self._reply(200, {"uid": body["dashboard"]["uid"], "status": "success"})
        self._reply(404, {"message": "not found"})

    def do_PUT(self):  # noqa: N802
        body = self._record()
        self.state["datasource"] = {**body, "id": 1}
        self._reply(200, {"message": "Datasource updated"})

    def log_message(self, *args):
        pass


@pytest.fixture
def grafana():
    _GrafanaStandIn.state, _GrafanaStandIn.requests = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GrafanaStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _GrafanaStandIn
    server.shutdown()


def test_provisioning_creates_then_changes_nothing(grafana):
    url, stand_in = grafana
    first = provision(url, "http://prometheus:9090", token="glsa_test")
    assert first == {"datasource": "created", "dashboard": "created"}
    writes = [(m, p, auth, body) for m, p, auth, body in stand_in.requests if m in ("POST", "PUT")]
    assert [(m, p) for m, p, _, _ in writes] == [("POST", "/api/datasources"), ("POST", "/api/dashboards/db")]
    assert all(auth == "Bearer glsa_test" for _, _, auth, _ in stand_in.requests)
    datasource, dashboard = writes[0][3], writes[1][3]
    assert datasource["uid"] == DATASOURCE_UID and datasource["url"] == "http://prometheus:9090"
    assert dashboard["dashboard"]["uid"] == DASHBOARD_UID and dashboard["overwrite"] is True
    assert {p["datasource"]["uid"] for p in dashboard["dashboard"]["panels"] if p["type"] != "row"} == {DATASOURCE_UID}

    stand_in.requests.clear()
    assert provision(url, "http://prometheus:9090", token="glsa_test") == {
        "datasource": "unchanged", "dashboard": "unchanged"}
    assert [m for m, *_ in stand_in.requests] == ["GET", "GET"]  # nothing written

    assert provision(url, "http://other:9090", token="glsa_test")["datasource"] == "updated"
    assert stand_in.state["datasource"]["url"] == "http://other:9090"

"""The route table (deployments/api/routes.py) is the one list of the ingress's routes."""

from __future__ import annotations

from fastapi.routing import APIRoute

from deployments.api.http_app import build_fastapi, is_api_path
from deployments.api.routes import ROUTES
from deployments.config import SemlineConfig


def test_the_application_serves_exactly_the_declared_routes():
    app = build_fastapi(SemlineConfig())
    served = sorted((method.lower(), route.path) for route in app.routes if isinstance(route, APIRoute)
                    for method in route.methods)
    declared = sorted((route.method, route.path) for route in ROUTES)
    assert served == declared and len(set(declared)) == len(declared)
    # The API key check and body limits cover every route but the probes and Prometheus' scrape.
    assert {route.path for route in ROUTES if not is_api_path(route.path)} == {"/health", "/live", "/metrics"}
    assert all(is_api_path(route.path) == route.api for route in ROUTES)

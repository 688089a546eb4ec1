"""The HTTP application: the routes of deployments/api/routes.py, and around them the error
handlers, the API key check, body limits and the published OpenAPI schema (request bodies
read by hand are described as if FastAPI had parsed them)."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from deployments.api import protocol
from deployments.api.errors import APIError, error_response, to_api_error
from deployments.api.routes import EXTRA_API_PATHS, ROUTES
from deployments.config import DEFAULT_TENANT, OPEN_TENANT, SemlineConfig

logger = logging.getLogger(__name__)

# Addresses only this machine reaches: a server there may go without keys.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_fastapi(config: SemlineConfig) -> FastAPI:
    """The application with every route of the table, each answered by its ingress method
    (`serve.ingress(app)` binds them to the ingress replica)."""
    app = FastAPI(title="semline", description="OpenAI-compatible LLM serving on Ray")
    for route in ROUTES:
        # response_model None: the handlers' answers are published from the table (_publish_schema).
        app.add_api_route(route.path, _endpoint(route.handler), methods=[route.method.upper()], response_model=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return error_response(to_api_error(exc))

    @app.exception_handler(ValidationError)
    async def _model_error(_: Request, exc: ValidationError):  # a model built from the request while planning
        return error_response(to_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):  # unknown route, wrong method, ...
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(_: Request, exc: json.JSONDecodeError):
        return error_response(APIError(400, f"malformed JSON body: {exc}"))

    _publish_schema(app, config.model_name)
    app.add_middleware(_BodyLimit, limit_for=lambda path: (
        config.batch.max_file_bytes if path == "/v1/files" else config.http.max_body_bytes))

    tenants = config.tenant_keys()  # key -> its tenant; empty: no key needed
    keys = list(tenants)
    anyone = config.tenant(OPEN_TENANT)
    if not tenants and config.http.host not in LOOPBACK:
        logger.warning("SECURITY: semline listens on %s with no API keys: anyone who reaches it may use and "
                       "administer it. Configure tenants (or api_key) before exposing it.", config.http.host)
    roles = [(route.method.upper(), compile_path(route.path)[0], route.role) for route in ROUTES]

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = route_path(request.scope)
        if is_api_path(path):
            if keys:
                key = _authorized(request, keys)
                if key is None:
                    return error_response(APIError(401, "invalid or missing API key", "authentication_error",
                                                    code="invalid_api_key"))
                tenant = tenants[key]
                # Limits are kept by the router per tenant, or for the legacy keys per key (under
                # an id of the key, never the key).
                request.state.api_key_id = hashlib.sha256(key.encode()).hexdigest()[:16] \
                    if tenant.name == DEFAULT_TENANT else tenant.limit_key
            else:
                tenant = anyone
            request.state.tenant = tenant
            role = next((role for method, pattern, role in roles
                         if method == request.method and pattern.match(path)), "inference")
            if role == "admin" and tenant.role != "admin":
                return error_response(APIError(
                    403, f"{request.method} {path} needs an admin key; tenant {tenant.name!r} has the "
                    f"{tenant.role} role", "permission_error", code="insufficient_role"))
            limit = (config.batch.max_file_bytes if route_path(request.scope) == "/v1/files"
                     else config.http.max_body_bytes)
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limit:
                return error_response(APIError(413, f"request body larger than {limit} bytes",
                                                code="request_too_large"))
        return await call_next(request)

    return app


def _endpoint(handler):
    """A route's endpoint: the ingress method, through a function of this app's own. Serve's
    class-based view rewrites its endpoints' signatures in place (the instance injected as
    `self`), so each application gets functions of its own rather than sharing the ingress's
    methods; its qualified name puts it on the ingress class, where Serve looks for it, and
    its annotations are resolved here (FastAPI reads the parameters from the signature)."""
    async def endpoint(self, *args, **kwargs):
        return await handler(self, *args, **kwargs)

    endpoint.__signature__ = inspect.signature(handler, eval_str=True)
    endpoint.__name__ = handler.__name__
    endpoint.__qualname__ = f"OpenAIIngress.{handler.__name__}"
    return endpoint


def _publish_schema(app: FastAPI, model_name: str) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})

        def ref(model: type[BaseModel]) -> dict:
            if model.__name__ not in components:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        for route in ROUTES:
            model, operation = route.body, schema["paths"].get(route.path, {}).get(route.method)
            if model is None or operation is None:
                continue
            if isinstance(model, dict):
                content = {"multipart/form-data": {"schema": model}}
            else:
                content = {"application/json": {"schema": ref(model)}}
                if "model" in model.model_fields and model.model_fields["model"].is_required():
                    # the one model served (any other name: 404)
                    components[model.__name__]["properties"]["model"] = {"type": "string", "enum": [model_name]}
            operation["requestBody"] = {"required": True, "content": content}
        error = {"description": "An error (4xx/5xx), OpenAI-style",
                 "content": {"application/json": {"schema": ref(protocol.ErrorResponse)}}}
        for route in ROUTES:
            body, events, path = route.answer, route.events, route.path
            operation = schema["paths"].get(path, {}).get(route.method)
            if operation is None:
                continue
            if isinstance(body, str):
                content = {body: {"schema": {"type": "string"}}}
            else:
                content = {"application/json": {"schema": ref(body)}}
            if events is not None:  # x-event-schema: what each `data:` event holds
                content["text/event-stream"] = {"schema": {
                    "type": "string", "description": f"with stream: true, server-sent events, each `data: ` + "
                    f"a {events.__name__} (or, if the request fails mid-stream, an ErrorResponse)" + (
                        "; the last is response.completed (or response.incomplete)" if path == "/v1/responses"
                        else ", then `data: [DONE]` unless it failed")},
                    "x-event-schema": {"anyOf": [ref(events), ref(protocol.ErrorResponse)]}}
            # Path and query parameters are checked by FastAPI, but their errors are answered
            # 400 with the OpenAI-style body, not FastAPI's 422.
            operation["responses"] = {"200": {"description": "OK", "content": content}, "default": error}
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a /v1/* body that streams past its limit (sent without Content-Length,
    or longer than it said) is answered 413 as soon as the limit is passed; the rest is never
    read, and whatever the app was about to answer is dropped."""

    def __init__(self, app, limit_for) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_api_path(route_path(scope)):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(route_path(scope))
        received, exceeded, started = 0, False, False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a cut-off body
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            response = error_response(APIError(413, f"request body larger than {limit} bytes",
                                                code="request_too_large"))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)


def route_path(scope) -> str:
    """The request's path within the application: without the route prefix the application
    is served under (Serve's route_prefix arrives as the ASGI root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def is_api_path(path: str) -> bool:
    return path.startswith("/v1/") or path in EXTRA_API_PATHS


def _authorized(request: Request, keys: list[str]) -> str | None:
    """The accepted key the request carries, or None."""
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    matches = [key for key in keys if hmac.compare_digest(token.encode(), key.encode())]  # compare with all
    return matches[0] if matches else None

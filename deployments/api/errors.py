"""One place where errors become OpenAI's error body: {"error": {"message", "type", "param",
"code"}}. APIError is what handlers raise; to_api_error maps everything else (the engine's,
the router's, pydantic's, Ray's) to one."""

from __future__ import annotations

import asyncio
import math

import ray
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from cluster.admission import DeadlineError, KeyLimitError, QueueFullError
from engine.async_engine import RequestFailedError


class APIError(Exception):
    """An error with an HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def __reduce__(self):  # raised in the batch runner, caught in the ingress
        return (APIError, (self.status, self.message, self.type, self.param, self.code, self.headers))

    def body(self) -> dict:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map engine and validation errors (possibly wrapped by Ray) to API errors."""
    exc = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(math.ceil(exc.retry_after_s))})
    if isinstance(exc, KeyLimitError):
        return APIError(429, str(exc), "rate_limit_error", code="key_limit",
                        headers={"Retry-After": str(math.ceil(exc.retry_after_s))})
    if isinstance(exc, DeadlineError):
        if exc.passed:
            return APIError(503, str(exc), "server_error", code="deadline_exceeded")
        return APIError(429, str(exc), "rate_limit_error", code="deadline_unmeetable",
                        headers={"Retry-After": str(math.ceil(exc.retry_after_s))})
    if isinstance(exc, asyncio.TimeoutError):
        return APIError(503, "timed out waiting for capacity", "server_error", code="queue_timeout")
    if isinstance(exc, ray.exceptions.RayActorError):  # the replica (or its node) died mid-request
        return APIError(503, "the model replica serving this request was lost; retry", "server_error",
                        code="replica_lost")
    if isinstance(exc, (RequestValidationError, ValidationError)):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(getattr(cause, "param", None), str):  # a check across fields that names one
            loc.append(cause.param)
        param = ".".join(loc) or None
        return APIError(400, f"invalid parameter {param}: {first.get('msg', 'invalid value')}", param=param)
    if isinstance(exc, ValueError):  # the engine's RequestError (prompt too long, ...) is one
        return APIError(400, str(exc))
    if isinstance(exc, RequestFailedError):  # this request alone failed in the engine
        return APIError(500, str(exc), type_="server_error", code="request_failed")
    return APIError(500, f"internal error: {type(exc).__name__}", type_="server_error")


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union that failed ('str', 'list[constrained-str]') in an
    error's location; clients want the field's path."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or not part.isidentifier())

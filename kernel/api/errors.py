"""One table from errors to API error bodies, and the one handler that uses it."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)

from kernel.api.schemas import ErrorBody, ErrorDetail
from kernel.config import ConfigError
from kernel.errors import (
    DownloadExists,
    DownloadNotFound,
    EngineError,
    InvalidRequest,
    InvalidState,
    KernelError,
)

__all__ = ["ApiError", "error_response", "handle_error", "param_of", "to_api_error"]

log = structlog.get_logger()

INVALID = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER = "server_error"

# kernel error class -> (HTTP status, type, code)
TABLE: dict[type[KernelError], tuple[int, str, str | None]] = {
    DownloadNotFound: (404, NOT_FOUND, None),
    DownloadExists: (409, INVALID, "download_exists"),
    InvalidState: (400, INVALID, None),
    InvalidRequest: (400, INVALID, None),
    ConfigError: (400, INVALID, None),
    EngineError: (500, SERVER, "engine_error"),
}

_DOWNLOADS_PATH = re.compile(r"^/(v1/)?downloads(/|$)")
_EMPTY_ID = re.compile(r"^/(v1/)?downloads//")
_MSGSPEC_PATH = re.compile(r"at `\$\.([^`\[]+)")
_MSGSPEC_FIELD = re.compile(r"field `([^`]+)`")


class ApiError(Exception):
    """An error raised by the API layer itself, already in API terms."""

    def __init__(
        self, status: int, message: str, type_: str = INVALID, *,
        param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type_, param=param, code=code)
        self.headers = headers or {}


def param_of(exc: msgspec.ValidationError) -> str | None:
    """The field a msgspec validation error is about, as a dotted path."""
    text = str(exc)
    match = _MSGSPEC_PATH.search(text)
    path = match.group(1) if match else None
    field = _MSGSPEC_FIELD.search(text)
    if field and ("missing required field" in text or "unknown field" in text):
        return f"{path}.{field.group(1)}" if path else field.group(1)
    return path


def _type_for(status: int) -> str:
    return {401: "authentication_error", 404: NOT_FOUND, 429: "rate_limit_error"}.get(
        status, SERVER if status >= 500 else INVALID
    )


def to_api_error(request: Request[Any, Any, Any], exc: Exception) -> tuple[int, ErrorDetail, dict[str, str]]:
    """Pure mapping: (status, error detail, extra headers) for any exception."""
    if isinstance(exc, ApiError):
        return exc.status, exc.detail, exc.headers
    for cls in type(exc).__mro__:
        if cls in TABLE:
            status, type_, code = TABLE[cls]
            assert isinstance(exc, KernelError)
            param = getattr(exc, "param", None)
            code = getattr(exc, "code", None) or code
            if isinstance(exc, DownloadNotFound) and request.method == "GET":
                param, code = "model_id", "download_not_found"
            if isinstance(exc, DownloadExists):
                param = "model_id"
            return status, ErrorDetail(message=exc.message, type=type_, param=param, code=code), {}
    if isinstance(exc, msgspec.ValidationError):
        return 400, ErrorDetail(message=f"Invalid request body: {exc}", type=INVALID,
                                param=param_of(exc)), {}
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        param = extra[0].get("key") if extra and isinstance(extra[0], dict) else None
        message = extra[0].get("message") if extra and isinstance(extra[0], dict) else None
        detail = f"{exc.detail}: {message}" if message else str(exc.detail)
        return 400, ErrorDetail(message=detail, type=INVALID, param=param), {}
    in_downloads = _DOWNLOADS_PATH.match(request.url.path) is not None
    if in_downloads and _EMPTY_ID.match(request.url.path):
        return 400, ErrorDetail(
            message="Cannot extract model ID from request path", type=INVALID,
            param="path", code="invalid_path_format",
        ), {}
    if isinstance(exc, NotFoundException) and in_downloads:
        return 400, ErrorDetail(
            message=f"Invalid endpoint: {request.method} {request.url.path}",
            type=INVALID, code="invalid_endpoint",
        ), {}
    if isinstance(exc, NotFoundException):
        return 404, ErrorDetail(message=f"Not found: {request.url.path}", type=NOT_FOUND,
                                code="not_found"), {}
    if isinstance(exc, MethodNotAllowedException):
        return 405, ErrorDetail(
            message=f"Method {request.method} is not allowed on {request.url.path}",
            type=INVALID, code="method_not_allowed",
        ), dict(exc.headers or {})
    if isinstance(exc, HTTPException):
        return exc.status_code, ErrorDetail(message=str(exc.detail), type=_type_for(exc.status_code)), dict(exc.headers or {})
    log.error("api.internal_error", path=request.url.path, exc_info=exc)
    return 500, ErrorDetail(message="Server error: Internal processing failed", type=SERVER), {}


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> Response[ErrorBody]:
    return Response(ErrorBody(error=detail), status_code=status, headers=headers or {})


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    status, detail, headers = to_api_error(request, exc)
    return error_response(status, detail, headers)

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
from litestar.openapi import ResponseSpec

from kernel.api.schemas import ErrorBody, ErrorDetail
from kernel.config import ConfigError
from kernel.errors import (
    Conflict,
    DownloadNotFound,
    EngineError,
    InvalidRequest,
    InvalidState,
    KernelError,
    ModelLoadingFailed,
    NotFound,
)

__all__ = [
    "error_response",
    "error_responses",
    "handle_error",
    "param_of",
    "to_api_error",
]

log = structlog.get_logger()

INVALID = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER = "server_error"

# kernel error class -> (HTTP status, error type); the most specific class in an error's MRO
# wins. ``param`` and ``code`` come from the error itself (kernel.errors).
TABLE: dict[type[KernelError], tuple[int, str]] = {
    NotFound: (404, NOT_FOUND),
    Conflict: (409, INVALID),
    InvalidState: (400, INVALID),
    InvalidRequest: (400, INVALID),
    ConfigError: (400, INVALID),
    EngineError: (500, SERVER),
    ModelLoadingFailed: (422, INVALID),
}

# What each error status means, for the OpenAPI document (the body is always ErrorBody).
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request (invalid_request_error); `param` names the field or `path`; "
    "code invalid_host for a Host header that does not name a loopback-only server",
    401: "Missing or wrong API key when auth.require_api_key is set "
    "(authentication_error, code invalid_api_key)",
    404: "Nothing with this model ID (not_found_error)",
    409: "A download with this model ID is still under way "
    "(invalid_request_error, code download_exists)",
    413: "Request body larger than auth.max_body_bytes (invalid_request_error)",
    415: "A request body that is not Content-Type: application/json "
    "(invalid_request_error, code unsupported_media_type)",
    422: "The model file could not be loaded (invalid_request_error, code model_loading_failed)",
    429: "Too many requests (rate_limit_error, code rate_limit_exceeded); see Retry-After",
    500: "Internal error (server_error); never carries a traceback",
}
# Every route behind the edge can answer these, whatever its handler does.
EDGE_STATUSES = (400, 401, 415, 429, 500)


def error_responses(*statuses: int, edge: bool = True) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses=`` for a route handler: ErrorBody under each status it can answer
    with (and, with ``edge``, the edge's 401/429 and the catch-all 500). Replaces Litestar's
    default 400 schema, which documents its own error shape rather than ours."""
    wanted = sorted({*statuses, *(EDGE_STATUSES if edge else ())})
    return {
        status: ResponseSpec(
            ErrorBody, description=ERROR_DESCRIPTIONS[status], generate_examples=False
        )
        for status in wanted
    }


_DOWNLOADS_PATH = re.compile(r"^/(v1/)?downloads(/|$)")
_EMPTY_ID = re.compile(r"^/(v1/)?downloads//")
_MSGSPEC_PATH = re.compile(r"at `\$\.([^`\[]+)")
_MSGSPEC_FIELD = re.compile(r"field `([^`]+)`")


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


def _detail(message: str, type_: str = INVALID, *, param: str | None = None,
            code: str | None = None) -> ErrorDetail:  # fmt: skip
    return ErrorDetail(message=message, type=type_, param=param, code=code)


Mapped = tuple[int, ErrorDetail, dict[str, str]]


def _kernel_error(request: Request[Any, Any, Any], exc: KernelError) -> Mapped | None:
    for cls in type(exc).__mro__:
        if cls in TABLE:
            status, type_ = TABLE[cls]
            param, code = exc.param, exc.code
            if isinstance(exc, DownloadNotFound) and request.method != "GET":
                param, code = None, None  # Kolosal names it only when it was looked up
            elif isinstance(exc, DownloadNotFound):
                code = "download_not_found"
            return status, _detail(exc.message, type_, param=param, code=code), {}
    return None


def _framework_error(request: Request[Any, Any, Any], exc: Exception) -> Mapped | None:
    """Litestar's and msgspec's own errors, and the router's 404/405, in our shape."""
    path = request.url.path
    in_downloads = _DOWNLOADS_PATH.match(path) is not None
    if isinstance(exc, msgspec.ValidationError):
        return 400, _detail(f"Invalid request body: {exc}", param=param_of(exc)), {}
    if isinstance(exc, ValidationException):
        return 400, _validation_detail(exc), {}
    if isinstance(exc, RecursionError):  # msgspec's decoder on a body nested too deeply
        return 400, _detail("Invalid request body: the JSON is nested too deeply."), {}
    if in_downloads and _EMPTY_ID.match(path):
        message = "Cannot extract model ID from request path"
        return 400, _detail(message, param="path", code="invalid_path_format"), {}
    if isinstance(exc, NotFoundException) and in_downloads:
        message = f"Invalid endpoint: {request.method} {path}"
        return 400, _detail(message, code="invalid_endpoint"), {}
    if isinstance(exc, NotFoundException):
        return 404, _detail(f"Not found: {path}", NOT_FOUND, code="not_found"), {}
    if isinstance(exc, MethodNotAllowedException):
        message = f"Method {request.method} is not allowed on {path}"
        return 405, _detail(message, code="method_not_allowed"), dict(exc.headers or {})
    if isinstance(exc, HTTPException):
        message = str(exc.detail)
        if exc.status_code == 413:
            limit = request.app.request_max_body_size
            message = (
                f"The request body is larger than this server accepts ({limit} bytes; "
                "the limit is the auth.max_body_bytes setting)."
            )
        detail = _detail(message, _type_for(exc.status_code))
        return exc.status_code, detail, dict(exc.headers or {})
    return None


def to_api_error(request: Request[Any, Any, Any], exc: Exception) -> Mapped:
    """Pure mapping: (status, error detail, extra headers) for any exception."""
    mapped = _kernel_error(request, exc) if isinstance(exc, KernelError) else None
    mapped = mapped or _framework_error(request, exc)
    if mapped is not None:
        return mapped
    log.error("api.internal_error", path=request.url.path, exc_info=exc)
    return 500, _detail("Server error: Internal processing failed", SERVER), {}


def _validation_detail(exc: ValidationException) -> ErrorDetail:
    """Litestar's validation error in our shape. Its key ``data`` is the whole body, a name
    the client never sent: ``param`` then names the field the message is about, if any."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    param, message = first.get("key"), first.get("message")
    if param == "data" and first.get("source") == "body":
        if message == "'data'":  # no body at all
            message = "a JSON object body is required"
        field = _MSGSPEC_FIELD.search(message or "")
        param = field.group(1) if field else None
    detail = f"{exc.detail}: {message}" if message else str(exc.detail)
    return ErrorDetail(message=detail, type=INVALID, param=param, code=None)


def error_response(
    status: int, detail: ErrorDetail, headers: dict[str, str] | None = None
) -> Response[ErrorBody]:
    return Response(ErrorBody(error=detail), status_code=status, headers=headers or {})


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    status, detail, headers = to_api_error(request, exc)
    return error_response(status, detail, headers)

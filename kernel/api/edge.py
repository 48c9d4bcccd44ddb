"""The edge of the app, before routing: CORS on every response, OPTIONS, API keys, and the
checks that keep browsers out: the Host header on loopback (DNS rebinding), JSON-only bodies
(415, so a cross-site form or ``text/plain`` request changes nothing), bad id segments.

It wraps the whole ASGI app (not only matched routes), so router 404s, 405s and errors carry
the CORS headers too, and an OPTIONS preflight on any path answers 204 without auth.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.config import Settings

if TYPE_CHECKING:
    from kernel.metrics import Metrics

__all__ = [
    "EXEMPT_PATHS",
    "Edge",
    "RateLimiter",
    "bad_id_segment",
    "is_slashed_collection",
    "json_body_or_none",
]

EXEMPT_PATHS = frozenset({"/health"})
# The dashboard page and its files load without a key (the page asks for one itself), and
# EventSource cannot send headers, so the event stream also takes ``?api_key=``.
DASHBOARD_PATHS = frozenset({"/"})
DASHBOARD_PREFIX = "/static/"
QUERY_KEY_PATHS = frozenset({"/v1/events", "/events"})
# Exactly the values of the Kolosal contract (shared/API.md); clients may compare them.
ALLOW_METHODS = b"GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = b"Content-Type, Authorization, X-API-Key"

Scope = dict[str, Any]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# The part of a raw (still percent-encoded) path after the downloads prefix.
_DOWNLOADS_REST = re.compile(rb"^/(?:v1/)?downloads/(.*)$")


class Edge:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.origins = settings.cors.allowed_origins
        self.require_key = settings.auth.require_api_key
        self.keys = [k.encode() for k in settings.auth.api_keys]
        self.exempt = EXEMPT_PATHS | ({"/metrics"} if settings.auth.metrics_public else set())
        self.metrics = metrics
        limit = settings.auth.rate_limit
        self.limiter = RateLimiter(limit.max_requests, limit.window_s) if limit else None
        allowed = [h.lower().rstrip(".") for h in settings.server.allowed_hosts]
        self.check_host = _is_loopback(settings.server.host) and "*" not in allowed
        self.allowed_hosts = frozenset(h for h in allowed if not h.startswith("."))
        self.allowed_suffixes = tuple(h for h in allowed if h.startswith("."))

    def host_allowed(self, scope: Scope) -> bool:
        """Whether the Host header names this server, when it listens on loopback only.

        A DNS-rebinding page reaches a loopback server under the attacker's own name, so that
        name must be refused; IP literals and ``localhost`` cannot be rebound.
        """
        if not self.check_host or scope["path"] in EXEMPT_PATHS:
            return True
        server = scope.get("server")
        if not server or not _is_loopback(str(server[0])):  # not a loopback socket (tests)
            return True
        sent = _header(scope, b"host")
        if sent is None:
            return True
        host = _host_name(sent.decode("latin-1"))
        if host == "localhost" or host.endswith(".localhost") or _is_ip(host):
            return True
        return host in self.allowed_hosts or any(
            host.endswith(suffix) or host == suffix[1:] for suffix in self.allowed_suffixes
        )

    def cors_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        if "*" in self.origins:
            origin = b"*"
        else:
            sent = _header(scope, b"origin")
            if sent is None or sent.decode("latin-1") not in self.origins:
                return [(b"vary", b"Origin")]
            origin = sent
        vary = [] if origin == b"*" else [(b"vary", b"Origin")]  # caches key on the origin
        return [
            *vary,
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ALLOW_HEADERS),
            (b"access-control-max-age", b"600"),
        ]

    def authorized(self, scope: Scope) -> bool:
        path = scope["path"]
        if not self.require_key or path in self.exempt:
            return True
        if path in DASHBOARD_PATHS or path.startswith(DASHBOARD_PREFIX):
            return True
        key = _header(scope, b"x-api-key")
        if key is None:
            auth = _header(scope, b"authorization") or b""
            scheme, _, token = auth.partition(b" ")
            key = token.strip() if scheme.lower() == b"bearer" else None
        if key is None and path in QUERY_KEY_PATHS:
            key = _query_param(scope, "api_key")
        if not key:
            return False
        # Compare against every key so timing does not reveal which one (or how much) matched.
        matched = False
        for candidate in self.keys:
            matched |= hmac.compare_digest(key, candidate)
        return matched

    async def __call__(self, app: Any, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        cors = self.cors_headers(scope)
        if scope["method"] == "OPTIONS":
            await _send(send, 204, b"", cors)
            return
        if _header(scope, b"content-length") is not None and (
            _header(scope, b"transfer-encoding") is not None
        ):  # RFC 9112 6.3: a request smuggling vector; answer, then close the connection
            body = _error_body(
                "A request cannot carry both Content-Length and Transfer-Encoding.",
                "invalid_request_error",
                "invalid_framing",
            )
            headers = [*cors, (b"content-type", b"application/json"), (b"connection", b"close")]
            await _send(send, 400, body, headers)
            return
        if not self.host_allowed(scope):
            host = (_header(scope, b"host") or b"").decode("latin-1")
            message = (
                f"The Host header {host!r} does not name this server, which listens on "
                "loopback only; add the name to the server.allowed_hosts setting to accept it."
            )
            body = _error_body(message, "invalid_request_error", "invalid_host")
            await _send(send, 400, body, [*cors, (b"content-type", b"application/json")])
            return
        if self.limiter is not None and scope["path"] not in EXEMPT_PATHS:
            client = (scope.get("client") or ("unknown", 0))[0]
            retry_after = self.limiter.hit(client)
            if retry_after is not None:
                body = _error_body(
                    "Too many requests: slow down and retry after the Retry-After delay.",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                )
                await _send(
                    send,
                    429,
                    body,
                    [
                        *cors,
                        (b"content-type", b"application/json"),
                        (b"retry-after", str(retry_after).encode()),
                    ],
                )
                return
        if not self.authorized(scope):
            body = _error_body(
                "Invalid or missing API key: send X-API-Key or Authorization: Bearer.",
                "authentication_error",
                "invalid_api_key",
            )
            await _send(
                send,
                401,
                body,
                [*cors, (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            )
            return
        if bad_id_segment(scope):
            body = _error_body(
                "Cannot extract model ID from request path: the id segment is empty or "
                "holds an encoded '/'.",
                "invalid_request_error",
                "invalid_path_format",
                param="path",
            )
            await _send(send, 400, body, [*cors, (b"content-type", b"application/json")])
            return
        if not json_body_or_none(scope):
            body = _error_body(
                "Request bodies must be JSON: send them with Content-Type: application/json.",
                "invalid_request_error",
                "unsupported_media_type",
            )
            await _send(send, 415, body, [*cors, (b"content-type", b"application/json")])
            return

        started = time.perf_counter()
        status = 500

        async def send_with_cors(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *cors]
            await send(message)

        try:
            await app(scope, receive, send_with_cors)
        finally:
            if self.metrics is not None:
                route = scope.get("path_template") or "unmatched"
                self.metrics.http_latency.labels(
                    method=scope["method"], route=route, status=str(status)
                ).observe(time.perf_counter() - started)


class RateLimiter:
    """Fixed windows per client: at most ``max_requests`` in each ``window_s``."""

    def __init__(self, max_requests: int, window_s: float) -> None:
        self.max_requests = max_requests
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, client: str) -> int | None:
        """Count one request; None if allowed, else whole seconds until the window resets."""
        now = time.monotonic()
        start, count = self._windows.get(client, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        if count >= self.max_requests:
            return max(1, math.ceil(start + self.window_s - now))
        self._windows[client] = (start, count + 1)
        if len(self._windows) > 10_000:  # forget idle clients; memory stays bounded
            self._windows = {c: w for c, w in self._windows.items() if now - w[0] < self.window_s}
        return None


def json_body_or_none(scope: Scope) -> bool:
    """Whether a POST, PUT or PATCH carries a JSON body or none at all (``curl -X POST``).

    Any other Content-Type, or a body without one, is what a cross-site form or a
    ``text/plain`` fetch sends without a CORS preflight.
    """
    if scope["method"] not in BODY_METHODS:
        return True
    content_type = _header(scope, b"content-type")
    if content_type is None:
        length = _header(scope, b"content-length")
        return _header(scope, b"transfer-encoding") is None and length in (None, b"0")
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def _host_name(host: str) -> str:
    """The name in a Host header, without port or final dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bad_id_segment(scope: Scope) -> bool:
    """Whether a path under /downloads has an empty id segment or one with an encoded '/'.

    Judged on the raw path, before routing: the router would fold ``DELETE /v1/downloads/``
    and ``POST /v1/downloads//cancel`` into the bulk cancel, and decode ``a%2Fb`` into two
    segments. ``GET`` and ``POST`` on ``/v1/downloads/`` stay the list and the create (a
    ``cancel_all`` body there is refused by the create handler).
    """
    raw = bytes(scope.get("raw_path") or scope["path"].encode()).partition(b"?")[0]
    match = _DOWNLOADS_REST.match(raw)
    if match is None:
        return False
    rest = match.group(1)
    if rest == b"":
        return scope["method"] not in ("GET", "HEAD", "POST")
    segment = rest.split(b"/", 1)[0]
    return segment == b"" or b"%2f" in segment.lower()


def is_slashed_collection(scope: Mapping[str, Any]) -> bool:
    """Whether the raw path is the downloads collection with a trailing slash."""
    raw = bytes(scope.get("raw_path") or scope["path"].encode()).partition(b"?")[0]
    match = _DOWNLOADS_REST.match(raw)
    return match is not None and match.group(1) == b""


def _error_body(message: str, type_: str, code: str, *, param: str | None = None) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _query_param(scope: Scope, name: str) -> bytes | None:
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    values = urllib.parse.parse_qs(query).get(name)
    return values[0].encode() if values else None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""A real loopback HTTP origin for tests: a raw ASGI app served by uvicorn in a background thread.

It behaves like a static file server (nginx) with single byte ranges, ETag/If-Range validation
and redirects, plus injectable faults (throttling, dropped/stalled/short bodies, error statuses).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from types import TracebackType
from typing import Any
from urllib.parse import quote

import uvicorn

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CHUNK = 64 * 1024
_THROTTLED_CHUNK = 16 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_BODY_FAULTS = ("drop_after", "short_body", "stall_after")  # one-shot, counted in body bytes
_UVICORN_LOG = logging.getLogger("uvicorn.error")


@dataclass
class RequestLog:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    query: str = ""  # the raw query string
    client: tuple[str, int] | None = None  # the client's (address, port): one per connection


@dataclass
class Faults:
    ignore_range: bool = False  # serve 200 + full body even when Range is sent
    throttle_bps: int | None = None  # body bytes/second, paced in small pieces
    drop_after: int | None = None  # cut the connection after this many body bytes (once)
    fail_statuses: list[int] = field(default_factory=list)  # next GET/HEADs answer these, in order
    retry_after: int | None = None  # Retry-After value added to fail_statuses answers
    stall_after: int | None = None  # hang after this many body bytes until released (once)
    no_head: bool = False  # HEAD answers 405
    no_content_length: bool = False  # omit Content-Length (chunked transfer)
    short_body: int | None = None  # full Content-Length but only this many bytes, then close (once)
    no_ranges: bool = False  # no Accept-Ranges, and Range is ignored (200 + the whole file)
    cut_every_after: int | None = None  # cut EVERY response after this many body bytes
    expired_queries: set[str] = field(default_factory=set)  # these query strings answer 403
    corrupt_at: int | None = None  # every body covering this file offset has that byte flipped
    new_connection_delay_s: float = 0.0  # answer a connection's first request this much later


@dataclass
class _File:
    data: bytes
    etag: str
    mtime: float = field(default_factory=time.time)


@dataclass
class _Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: bool = False  # file content: paced, and subject to the body faults


class _Abort(Exception):
    """Raised inside the app after a partial body: uvicorn then closes the connection."""


class _HideAbort(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Abort))


def _etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


def _text(status: int, text: str, *headers: tuple[str, str]) -> _Reply:
    if status in (204, 304):  # these may not carry a body
        return _Reply(status, list(headers))
    body = text.encode()
    length = ("content-length", str(len(body)))
    return _Reply(status, [("content-type", "text/plain"), length, *headers], body)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """One byte range as [start, end), end clamped to size; None if malformed (then ignored)."""
    m = _RANGE.fullmatch(value.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.groups()
    if not first:  # suffix range "bytes=-N": the last N bytes
        n = int(last)
        return (max(size - n, 0), size) if n else (size, size)
    start = int(first)
    if last and int(last) < start:
        return None
    return start, min(int(last) + 1 if last else size, size)


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Origin:
    """Loopback origin server on 127.0.0.1 with an ephemeral port; use as a context manager.
    With ``tls`` (a certificate and key, see tests/helpers/tls.py) it speaks HTTPS, as
    ``https://{host}:{port}``."""

    def __init__(self, tls: Any = None, host: str = "127.0.0.1") -> None:
        self.base_url = ""
        self.tls = tls
        self.host = host  # the name in base_url (the server listens on 127.0.0.1)
        self.faults = Faults()
        self.requests: list[RequestLog] = []
        self._seen_clients: set[tuple[str, int]] = set()  # for new_connection_delay_s
        self.body_bytes: dict[str, int] = {}  # file name -> body bytes sent (every GET)
        self._files: dict[str, _File] = {}
        self._redirects: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._stalled = threading.Event()
        # stalled responses' release futures and the streams' disconnect watchers (loop-only)
        self._stalls: set[asyncio.Future[None]] = set()
        self._watchers: set[asyncio.Future[None]] = set()
        self._log_filter = _HideAbort()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- files and state -------------------------------------------------------------------

    def url(self, name: str) -> str:
        return f"{self.base_url}/{quote(name)}"

    def add_file(self, name: str, data: bytes, etag: str | None = None) -> str:
        with self._lock:
            self._files[name] = _File(data, etag or _etag(data))
        return self.url(name)

    def set_etag(self, name: str, etag: str) -> None:
        with self._lock:
            file = self._files[name]
            file.etag, file.mtime = etag, time.time()

    def replace_file(self, name: str, data: bytes) -> None:
        with self._lock:
            self._files[name] = _File(data, _etag(data))

    def redirect(self, name: str, target_name: str, status: int = 302) -> str:
        with self._lock:
            self._redirects[name] = (target_name, status)
        return self.url(name)

    def requests_for(self, name: str) -> list[RequestLog]:
        with self._lock:
            return [r for r in self.requests if r.path == "/" + name]

    def reset(self) -> None:
        """Faults back to defaults, request log cleared, pending stalls released (files stay)."""
        with self._lock:
            self.faults = Faults()
            self.requests.clear()
            self._seen_clients.clear()
        self.release_stall()

    def connections_for(self, name: str) -> int:
        """How many connections the requests for ``name`` came over."""
        return len({r.client for r in self.requests_for(name)})

    def wait_stalled(self, timeout: float = 5.0) -> bool:
        """Block until a response is stalled by `stall_after` (cleared by release_stall/reset)."""
        return self._stalled.wait(timeout)

    def release_stall(self) -> None:
        """Resume responses currently stalled by `stall_after`."""
        self._stalled.clear()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_stalls)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        config = uvicorn.Config(
            self._app, host="127.0.0.1", port=0, interface="asgi3", http="h11", ws="none",
            lifespan="off", log_level="warning", log_config=None, access_log=False,
            proxy_headers=False, timeout_graceful_shutdown=5,
            ssl_certfile=str(self.tls.cert) if self.tls else None,
            ssl_keyfile=str(self.tls.key) if self.tls else None,
        )  # fmt: skip
        server = self._server = uvicorn.Server(config)
        _UVICORN_LOG.addFilter(self._log_filter)
        thread = self._thread = threading.Thread(target=self._run, name="origin", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("origin server failed to start")
            thread.join(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if self.tls else "http"
        self.base_url = f"{scheme}://{self.host}:{port}"

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        if self._loop is not None:  # cut off bodies still streaming, so shutdown is prompt
            self._loop.call_soon_threadsafe(self._cancel_streams)
        self._server.should_exit = True
        self._thread.join(15)
        alive = self._thread.is_alive()
        self._server = self._thread = self._loop = None
        _UVICORN_LOG.removeFilter(self._log_filter)
        if alive:
            raise RuntimeError("origin server did not shut down")

    def __enter__(self) -> Origin:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        assert self._server is not None
        self._loop = asyncio.get_running_loop()
        await self._server.serve()

    # -- the ASGI app ----------------------------------------------------------------------

    async def _app(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope["query_string"].decode("latin-1")
        client = tuple(scope["client"]) if scope.get("client") else None
        with self._lock:
            self.requests.append(RequestLog(method, path, headers, query, client))
            fresh = client is not None and client not in self._seen_clients
            if client is not None:
                self._seen_clients.add(client)
            delay = self.faults.new_connection_delay_s if fresh else 0.0
            if query and query in self.faults.expired_queries:  # a signed URL past its expiry
                reply = _text(403, "Request has expired\n")
            else:
                reply = self._decide(method, path.removeprefix("/"), headers)
        if delay:  # a new connection's handshakes on a far network (measurements)
            await asyncio.sleep(delay)
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers})
        if method == "HEAD" or not reply.stream:
            body = b"" if method == "HEAD" else reply.body
            await send({"type": "http.response.body", "body": body})
            return
        gone = asyncio.ensure_future(_disconnected(receive))  # cancelled by stop()
        self._watchers.add(gone)
        try:
            await self._stream(reply.body, send, gone, path.removeprefix("/"))
        finally:
            gone.cancel()
            self._watchers.discard(gone)

    def _decide(self, method: str, name: str, headers: dict[str, str]) -> _Reply:
        """Pick the response; called with the lock held."""
        faults = self.faults
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed\n", ("allow", "GET, HEAD"))
        if faults.fail_statuses:
            status = faults.fail_statuses.pop(0)
            text = f"injected failure {status}\n"
            if faults.retry_after is None:
                return _text(status, text)
            return _text(status, text, ("retry-after", str(faults.retry_after)))
        if method == "HEAD" and faults.no_head:
            return _text(405, "method not allowed\n", ("allow", "GET"))
        if name in self._redirects:
            target, status = self._redirects[name]
            location = target if "://" in target else self.url(target)  # absolute: as given
            return _text(status, "redirect\n", ("location", location))
        file = self._files.get(name)
        if file is None:
            return _text(404, "not found\n")
        size = len(file.data)
        out = [
            *([] if faults.no_ranges else [("accept-ranges", "bytes")]),
            ("etag", file.etag),
            ("last-modified", formatdate(file.mtime, usegmt=True)),
            ("content-type", "application/octet-stream"),
        ]
        span = None
        fresh = headers.get("if-range", file.etag) == file.etag  # If-Range: strong ETag match
        if "range" in headers and fresh and not (faults.ignore_range or faults.no_ranges):
            span = _parse_range(headers["range"], size)
        if span is None:
            status, body = 200, file.data
        elif span[0] >= size:
            return _text(416, "range not satisfiable\n", ("content-range", f"bytes */{size}"))
        else:
            status, body = 206, file.data[span[0] : span[1]]
            out.append(("content-range", f"bytes {span[0]}-{span[1] - 1}/{size}"))
        first = span[0] if span is not None and status == 206 else 0
        if faults.corrupt_at is not None and 0 <= faults.corrupt_at - first < len(body):
            body = _flipped(body, faults.corrupt_at - first)  # a bad CDN node: same ETag
        if not faults.no_content_length:
            out.append(("content-length", str(len(body))))
        return _Reply(status, out, body, stream=True)

    async def _stream(
        self, body: bytes, send: Send, gone: asyncio.Future[None], name: str = ""
    ) -> None:
        pos = 0
        while pos < len(body) and not gone.done():
            bps = self.faults.throttle_bps
            step = _THROTTLED_CHUNK if bps else _CHUNK
            end, fault = self._claim_fault(pos, min(pos + step, len(body)))
            await send({"type": "http.response.body", "body": body[pos:end], "more_body": True})
            sent, pos = end - pos, end
            with self._lock:
                self.body_bytes[name] = self.body_bytes.get(name, 0) + sent
            if fault in ("drop_after", "short_body", "cut_every_after"):
                raise _Abort(fault)
            if fault == "stall_after":
                await self._stall(gone)
            if bps:  # pace: sleep, but wake up early if the client goes away
                await asyncio.wait([gone], timeout=sent / bps)
        if gone.cancelled():
            raise _Abort("origin stopping")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _claim_fault(self, pos: int, end: int) -> tuple[int, str | None]:
        """Take the earliest one-shot body fault due by `end` bytes: (where to cut, its name)."""
        with self._lock:
            due = [
                (value, name)
                for name in (*_BODY_FAULTS, "cut_every_after")
                if (value := getattr(self.faults, name)) is not None and value <= end
            ]
            if not due:
                return end, None
            value, name = min(due)
            if name != "cut_every_after":  # the others fire once
                setattr(self.faults, name, None)
        return max(value, pos), name

    def _wake_stalls(self) -> None:
        for release in self._stalls:
            if not release.done():
                release.set_result(None)

    def _cancel_streams(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()

    async def _stall(self, gone: asyncio.Future[None]) -> None:
        release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stalls.add(release)
        self._stalled.set()
        try:
            await asyncio.wait([gone, release], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stalls.discard(release)

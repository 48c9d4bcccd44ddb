"""A lean HTTP/1.1 body reader: socket bytes land straight in the caller's buffer.

httpx costs about 2.7 CPU s per GiB in per-chunk handling (shared/PERFORMANCE.md). Here an
asyncio ``BufferedProtocol`` hands the event loop a slice of the transfer's own block buffer,
so a body is read with no per-chunk objects at all: one wake-up per filled block (or per
flush interval on slow links). Used for plain ``http://`` without a proxy; everything else
(TLS, proxies, chunked bodies) goes through httpx.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urljoin, urlsplit

__all__ = ["RawResponse", "open_raw"]

HEAD_LIMIT = 64 * 1024
FLUSH_S = 0.25


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.scratch = bytearray(HEAD_LIMIT)
        self.head_len = 0
        self.head_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.leftover = bytearray()  # body bytes that arrived with the head
        self.target: memoryview | None = None
        self.filled = 0
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.target is not None and self.filled < len(self.target):
            return self.target[self.filled :]
        if not self.head_done.done():
            return memoryview(self.scratch)[self.head_len :]
        # No block to fill: take what the socket has, and stop reading until asked.
        assert self.transport is not None
        self.transport.pause_reading()
        return memoryview(self.scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self.target is not None and self.filled < len(self.target):
            self.filled += nbytes
            if self.filled == len(self.target):
                self._wake()
            return
        if not self.head_done.done():
            self.head_len += nbytes
            end = self.scratch.find(b"\r\n\r\n", 0, self.head_len)
            if end >= 0:
                self.leftover += self.scratch[end + 4 : self.head_len]
                self.head_len = end + 4
                self.head_done.set_result(None)
                assert self.transport is not None
                self.transport.pause_reading()
            elif self.head_len >= HEAD_LIMIT:
                self.head_done.set_exception(ConnectionError("response head too large"))
            return
        self.leftover += self.scratch[:nbytes]

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        if not self.head_done.done():
            self.head_done.set_exception(ConnectionError("connection closed before the response"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        if not self.head_done.done():
            self.head_done.set_exception(exc or ConnectionError("connection closed"))
        self._wake()


class RawResponse:
    """Status, headers and a ``readinto`` body over one connection (closed at the end)."""

    def __init__(self, protocol: _Protocol, status: int, headers: dict[str, str], url: str):
        self._p = protocol
        self.status_code = status
        self.headers = headers
        self.url = url

    async def readinto(self, buffer: memoryview, stall_timeout: float) -> int:
        """Fill ``buffer``; return when it is full, or after ``FLUSH_S`` holding some bytes,
        or 0 at the end. TimeoutError when no byte came for ``stall_timeout`` seconds."""
        p = self._p
        if p.leftover:
            n = min(len(buffer), len(p.leftover))
            buffer[:n] = p.leftover[:n]
            del p.leftover[:n]
            return n
        if p.eof:
            if p.error is not None:
                raise p.error
            return 0
        assert p.transport is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + stall_timeout
        p.target, p.filled = buffer, 0
        p.transport.resume_reading()
        try:
            while True:
                p.waiter = loop.create_future()
                timer = loop.call_later(FLUSH_S, p._wake)
                try:
                    await p.waiter
                finally:
                    timer.cancel()
                if p.filled or p.eof:
                    break
                if loop.time() >= deadline:
                    raise TimeoutError(f"no data for {stall_timeout:g} s")
        finally:
            p.target, p.waiter = None, None
            if not p.eof:
                p.transport.pause_reading()
        if p.filled == 0 and p.error is not None:
            raise p.error
        return p.filled

    async def aclose(self) -> None:
        if self._p.transport is not None:
            self._p.transport.close()


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ConnectionError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def open_raw(
    url: str, headers: dict[str, str], *, connect_timeout: float, max_redirects: int = 5
) -> RawResponse:
    """GET ``url`` (following redirects); raises OSError / ConnectionError / TimeoutError."""
    loop = asyncio.get_running_loop()
    for _ in range(max_redirects + 1):
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        async with asyncio.timeout(connect_timeout):
            transport, protocol = await loop.create_connection(_Protocol, host, port)
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            try:
                await protocol.head_done
            except BaseException:
                transport.close()
                raise
        status, response_headers = _parse_head(bytes(protocol.scratch[: protocol.head_len]))
        if status in (301, 302, 303, 307, 308) and "location" in response_headers:
            transport.close()
            url = urljoin(url, response_headers["location"])
            if not url.startswith("http://"):
                raise _Redirected(url)
            continue
        return RawResponse(protocol, status, response_headers, url)
    raise ConnectionError(f"too many redirects from {url}")


class _Redirected(Exception):
    """The body moved to a URL the raw reader does not handle (https): use httpx."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def fast_path_ok(url: str, env: Any) -> bool:
    """Plain http with no proxy configured for it."""
    if not url.startswith("http://"):
        return False
    return not any(env.get(k) for k in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"))

"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load generator.

The latency figures of case 3 and the pause timings of case 4 must measure the server, not
the client: httpx costs about a millisecond of Python per request, which on a shared 2-core
box (the server, nginx and the bench on the same cores) would dominate a p99. This client
writes one request line and reads the status, the headers and exactly Content-Length bytes
(or a chunked body); nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as _json
from typing import Any

__all__ = ["RawConn"]


class RawConn:
    """One keep-alive connection to ``127.0.0.1:port``; reconnects when the server closes."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 20
        )

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.reader = self.writer = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.writer is None:
                await self.connect()
            try:
                return await self._request(method, path, body)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.request("GET", path)

    async def _request(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        assert self.reader is not None
        assert self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        payload = b""
        if body is not None:
            payload = _json.dumps(body).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        elif method in ("POST", "PUT", "PATCH"):
            head += "Content-Length: 0\r\n"
        self.writer.write(head.encode() + b"\r\n" + payload)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(parts)
        elif status in (204, 304) or method == "HEAD":
            data = b""
        else:
            data = await self.reader.read()
            await self.close()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

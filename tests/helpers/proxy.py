"""A small forward proxy on loopback, for proxy tests: ``CONNECT`` tunnels (https) and
absolute-form requests (http), optional Basic proxy authentication, and a log of what it was
asked. Threads, blocking sockets; use as a context manager."""

from __future__ import annotations

import base64
import contextlib
import socket
import socketserver
import threading
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["Proxy", "ProxyRequest"]


@dataclass
class ProxyRequest:
    method: str
    target: str  # host:port for CONNECT, the absolute URL otherwise
    headers: dict[str, str]  # lower-cased names


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the request head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(1 << 20):
            dst.sendall(chunk)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        try:
            head, rest = _read_head(client)
        except (OSError, ConnectionError):
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.server.owner.log(ProxyRequest(method, target, headers))
        wanted = self.server.owner.credentials
        if wanted is not None:
            expected = "Basic " + base64.b64encode(wanted.encode()).decode()
            if headers.get("proxy-authorization") != expected:
                client.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                )
                return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
        else:
            parts = urlsplit(target)
            upstream = socket.create_connection(
                (parts.hostname or "", parts.port or 80), timeout=10
            )
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            kept = [
                line
                for line in lines[1:]
                if not line.lower().startswith(("proxy-authorization:", "proxy-connection:"))
            ]
            upstream.sendall(
                "\r\n".join([f"{method} {path} HTTP/1.1", *kept]).encode("latin-1")
                + b"\r\n\r\n"
                + rest
            )
        upstream.settimeout(None)
        client.settimeout(None)
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join(30)
        upstream.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: Proxy) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)


class Proxy:
    """``url`` is ``http://127.0.0.1:<port>`` (with ``user:password@`` when ``credentials``)."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.requests: list[ProxyRequest] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def log(self, request: ProxyRequest) -> None:
        with self._lock:
            self.requests.append(request)

    @property
    def url(self) -> str:
        auth = f"{self.credentials}@" if self.credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def __enter__(self) -> Proxy:
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

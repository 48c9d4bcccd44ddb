"""HTTP/1.1 on a blocking socket: the fast path for response bodies.

``open_response`` (blocking: call it in a worker thread) connects, directly or through the
proxy the environment names (``CONNECT`` tunnel for https, absolute-form requests for http),
wraps TLS (SNI and host name check, the shared context of kernel/tls.py), writes a GET by hand,
parses the response head and follows redirects itself (up to ``MAX_REDIRECTS``; an
``Authorization`` header is dropped when a redirect leaves the origin). The body is then read
with ``readinto_blocking`` straight into the caller's buffer: for TLS that is one
``recv_into`` per TLS record and nothing else, which is what lets Python keep up with curl.

Chunked bodies are left to httpx (``NeedsHttpx``): model files come with a length.
Every address a host name resolves to passes ``check_address`` before the connect.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import socket
import ssl
import sys
import termios
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from kernel.errors import PermanentError, TransientError
from kernel.tls import tls_failure

__all__ = ["NeedsHttpx", "Response", "open_response", "proxy_for"]

HEAD_LIMIT = 64 * 1024
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}

CheckAddress = Callable[[str, str], None]  # (host, resolved IP) -> raises when denied


class NeedsHttpx(Exception):
    """This response is better read by httpx (a chunked body); ``url`` is where it is."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


@dataclass
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # origin-form: /path?query
    auth: str | None  # "user:password" from the URL, sent as Basic to this origin only

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise PermanentError(
                f"Cannot fetch {url}: only http:// and https:// URLs are supported."
            )
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise PermanentError(f"Cannot fetch {url}: {exc}.") from exc
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        auth = None
        if parts.username is not None:
            auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        return cls(scheme, parts.hostname, port, path, auth)

    @property
    def authority(self) -> str:
        """host[:port] as the Host header and a CONNECT line spell it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def host_port(self) -> str:
        """host:port, always with the port (a CONNECT line)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host.lower(), self.port


def proxy_for(url: str) -> str | None:
    """The proxy URL the environment names for ``url`` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY,
    in either case), or None when there is none or NO_PROXY exempts the host."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    host = parts.hostname or ""
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if proxies.get("no") and bypass(host, proxies):
        return None
    return proxies.get(parts.scheme.lower()) or proxies.get("all") or None


class Response:
    """Status, headers and the body of one GET, on a connection of its own."""

    def __init__(
        self,
        sock: socket.socket,
        status: int,
        headers: dict[str, str],
        url: str,
        leftover: bytes,
    ) -> None:
        self.sock = sock
        self.status_code = status
        self.headers = headers
        self.url = url
        self._leftover = leftover
        length = headers.get("content-length", "").strip()
        self.length: int | None = int(length) if length.isdigit() else None
        self._remaining = self.length  # body bytes still to come; None = until EOF
        self._error: BaseException | None = None  # raised on the next read

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    def readinto_blocking(self, view: memoryview, flush_s: float) -> int:
        """See kernel.pump.BlockingBody. Raises OSError / TimeoutError / ssl.SSLError."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._remaining is not None:
            view = view[: self._remaining]
        filled = 0
        if self._leftover:
            filled = min(len(view), len(self._leftover))
            view[:filled] = self._leftover[:filled]
            self._leftover = self._leftover[filled:]
        size = len(view)
        recv_into = self.sock.recv_into
        # The clock is read after every read: on a slow link each one may wait long for its
        # bytes, so skipping looks (every 4th, say) would hold four arrivals rather than
        # flush_s (64 KiB at a time from an origin sending 16 KiB pieces: a smaller file
        # showed no progress until its end). A look costs ~50 ns, a TLS record's read ~5 us.
        deadline = time.monotonic() + flush_s
        try:
            while filled < size:
                n = recv_into(view[filled:])
                if n == 0:
                    break
                filled += n
                if time.monotonic() >= deadline:
                    break
        except (OSError, ValueError) as exc:  # ValueError: the socket was closed under us
            if not filled:
                raise
            self._error = exc  # keep what arrived; the fault surfaces on the next call
        if self._remaining is not None:
            self._remaining -= filled
        return filled

    def queued(self) -> int:
        """Bytes the kernel holds for this socket, not read yet (FIONREAD): a sender faster
        than this reader keeps it full, a slow origin leaves it empty. -1 when unknown."""
        try:
            raw = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return -1
        return int.from_bytes(raw, sys.byteorder, signed=True)

    def interrupt(self) -> None:
        """Unblock a read in another thread: shut the socket down (not the TLS layer)."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")


def _connect(
    host: str, port: int, timeout: float, check_address: CheckAddress | None
) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        if check_address is not None:
            check_address(host, str(address[0]))
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(f"{host} resolved to no address")


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(data) >= HEAD_LIMIT:
            raise ConnectionError("the response head is larger than 64 KiB")
        chunk = sock.recv(HEAD_LIMIT)
        if not chunk:
            raise ConnectionError("the connection closed before the response head")
        data += chunk
    lines = bytes(data[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(parts[1]), headers, bytes(data[end + 4 :])


def _tunnel(sock: socket.socket, target: _Target, proxy_auth: str | None, proxy: str) -> None:
    lines = [f"CONNECT {target.host_port} HTTP/1.1", f"Host: {target.host_port}"]
    if proxy_auth:
        lines.append(f"Proxy-Authorization: {_basic(proxy_auth)}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    status, _headers, _rest = _read_head(sock)
    if status == 407:
        raise PermanentError(
            f"The proxy {proxy} requires authentication (HTTP 407): put the user and password "
            "in the proxy URL (http://user:password@proxy:port)."
        )
    if status != 200:
        raise TransientError(
            f"The proxy {proxy} refused to open a tunnel to {target.host_port} (HTTP {status}).",
            reason="proxy",
        )


def _open_once(
    url: str,
    headers: Mapping[str, str],
    *,
    tls: ssl.SSLContext,
    connect_timeout: float,
    read_timeout: float,
    check_address: CheckAddress | None,
) -> Response:
    target = _Target.parse(url)
    proxy = proxy_for(url)
    shown = target.authority
    request_target = target.path
    extra: list[str] = []
    try:
        if proxy is None:
            sock = _connect(target.host, target.port, connect_timeout, check_address)
        else:
            p = _Target.parse(proxy if "://" in proxy else f"http://{proxy}")
            if p.scheme != "http":
                raise PermanentError(f"Only http:// proxies are supported, not {proxy}.")
            if check_address is not None:  # the proxy resolves the target: check its name
                check_address(target.host, target.host)
            sock = _connect(p.host, p.port, connect_timeout, None)
            if target.scheme == "https":
                try:
                    _tunnel(sock, target, p.auth, f"{p.host}:{p.port}")
                except BaseException:
                    sock.close()
                    raise
            else:
                request_target = f"http://{target.authority}{target.path}"
                if p.auth:
                    extra.append(f"Proxy-Authorization: {_basic(p.auth)}")
    except socket.gaierror as exc:
        raise TransientError(
            f"Cannot resolve {target.host}: {exc.strerror}.", reason="network"
        ) from exc
    except TimeoutError as exc:
        raise TransientError(f"Timed out connecting to {shown}.", reason="network") from exc
    except OSError as exc:
        raise TransientError(
            f"Cannot connect to {shown}: {exc.strerror or exc}.", reason="network"
        ) from exc
    try:
        if target.scheme == "https":
            try:
                sock = tls.wrap_socket(sock, server_hostname=target.host)
            except (OSError, ssl.SSLError) as exc:
                refused = tls_failure(exc, shown)
                if refused is not None:
                    raise refused from exc
                raise TransientError(
                    f"TLS connection to {shown} failed: {exc}.", reason="network"
                ) from exc
        lines = [f"GET {request_target} HTTP/1.1", f"Host: {target.authority}"]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
        if target.auth and not any(k.lower() == "authorization" for k in headers):
            lines.append(f"Authorization: {_basic(target.auth)}")
        lines += [*extra, "Connection: close"]
        sock.settimeout(read_timeout)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status, response_headers, leftover = _read_head(sock)
    except TimeoutError as exc:
        sock.close()
        raise TransientError(
            f"No response from {shown} for longer than the stall timeout.", reason="stall"
        ) from exc
    except (OSError, ConnectionError) as exc:
        sock.close()
        raise TransientError(f"Network error talking to {shown}: {exc}.", reason="network") from exc
    except BaseException:
        sock.close()
        raise
    return Response(sock, status, response_headers, url, leftover)


def open_response(
    url: str,
    headers: Mapping[str, str],
    *,
    tls: ssl.SSLContext,
    connect_timeout: float = 10.0,
    read_timeout: float = 30.0,
    check_address: CheckAddress | None = None,
) -> Response:
    """GET ``url`` and return the response once its head is read, following redirects.
    Blocking. Raises TransientError / PermanentError (or NeedsHttpx, from the caller)."""
    sent = dict(headers)
    first = _Target.parse(url).origin
    for _ in range(MAX_REDIRECTS + 1):
        response = _open_once(
            url, sent, tls=tls, connect_timeout=connect_timeout, read_timeout=read_timeout,
            check_address=check_address,
        )  # fmt: skip
        location = response.headers.get("location")
        if response.status_code not in REDIRECTS or not location:
            return response
        response.close()
        url = urljoin(url, location)
        if _Target.parse(url).origin != first:  # credentials stay with their origin
            sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
    raise PermanentError(f"Too many redirects (more than {MAX_REDIRECTS}) from {url}.")

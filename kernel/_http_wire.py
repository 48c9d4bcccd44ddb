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

Connections are kept alive: a segmented download fetches a file in dozens of ranges, and on a
real network each new connection pays the TCP and TLS handshakes and TCP slow start. A body
read exactly to its Content-Length on a persistent HTTP/1.1 connection puts its socket in
``_POOL``; the next request with the same key (origin, proxy, TLS context and address checker:
a connection checked under one policy never serves another) takes it. A pooled socket the
server closed while it was idle fails before any response byte; the request is then sent
again, once, on a new connection (a GET may be repeated).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import select
import socket
import ssl
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from kernel.errors import PermanentError, TransientError
from kernel.tls import tls_failure

__all__ = ["NeedsHttpx", "Response", "close_idle_connections", "open_response", "proxy_for"]

HEAD_LIMIT = 64 * 1024
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}

CheckAddress = Callable[[str, str], None]  # (host, resolved IP) -> raises when denied

IDLE_PER_KEY = 16  # idle sockets kept per key: more than a segmented download's connections
IDLE_TOTAL = 64
IDLE_S = 15.0  # an idle socket older than this is closed, never reused


class _Pool:
    """Idle keep-alive sockets by key, newest last. Thread-safe; bounded per key, in total
    and in idle time. Expired sockets are closed whenever the pool is used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Hashable, list[tuple[float, socket.socket]]] = {}

    def take(self, key: Hashable) -> socket.socket | None:
        """The newest idle socket for ``key`` that still looks open, or None."""
        with self._lock:
            stale = self._expire(time.monotonic())
            found = None
            sockets = self._idle.get(key, [])
            while sockets and found is None:
                _, sock = sockets.pop()
                if _looks_open(sock):
                    found = sock
                else:
                    stale.append(sock)
            if not sockets:
                self._idle.pop(key, None)
        _close_all(stale)
        return found

    def give(self, key: Hashable, sock: socket.socket) -> None:
        """Keep ``sock`` for the next request with ``key`` (or close it when the pool is full)."""
        now = time.monotonic()
        with self._lock:
            stale = self._expire(now)
            sockets = self._idle.setdefault(key, [])
            if len(sockets) < IDLE_PER_KEY and self.count() < IDLE_TOTAL:
                sockets.append((now, sock))
            else:
                stale.append(sock)
        _close_all(stale)

    def count(self) -> int:
        return sum(len(sockets) for sockets in self._idle.values())

    def clear(self) -> None:
        """Close every idle socket."""
        with self._lock:
            stale = [sock for sockets in self._idle.values() for _, sock in sockets]
            self._idle.clear()
        _close_all(stale)

    def _expire(self, now: float) -> list[socket.socket]:
        """Take out the sockets idle longer than IDLE_S (lock held); the caller closes them."""
        stale: list[socket.socket] = []
        for key in list(self._idle):
            kept = [(t, s) for t, s in self._idle[key] if now - t < IDLE_S]
            stale += [s for t, s in self._idle[key] if now - t >= IDLE_S]
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        return stale


def _looks_open(sock: socket.socket) -> bool:
    """An idle connection has nothing to read: readable means the server closed it (or sent
    bytes nobody asked for). Either way it cannot carry a new request."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    poller = select.poll()  # not select(): no limit on the descriptor's number
    try:
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


_POOL = _Pool()


def close_idle_connections() -> None:
    """Close the kept-alive connections nobody uses now (at shutdown)."""
    _POOL.clear()


class _NoResponse(ConnectionError):
    """The connection ended (or was reset) before the first byte of the response head: on a
    reused connection the server closed it while it was idle, and the request may be resent."""


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


@dataclass
class _Head:
    version: str  # "HTTP/1.1"
    status: int
    headers: dict[str, str]  # lower-cased names
    rest: bytes  # what arrived after the head: the start of the body

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection open unless the server says ``Connection: close``."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        return self.version == "HTTP/1.1" and "close" not in tokens


class Response:
    """Status, headers and the body of one GET. ``close`` gives the connection back to the
    pool under ``pool_key`` when it is certainly reusable, and closes it otherwise."""

    def __init__(
        self,
        sock: socket.socket,
        head: _Head,
        url: str,
        pool_key: Hashable | None = None,
    ) -> None:
        self.sock = sock
        self.status_code = head.status
        self.headers = head.headers
        self.url = url
        self._leftover = head.rest
        length = self.headers.get("content-length", "").strip()
        self.length: int | None = int(length) if length.isdigit() else None
        self._remaining = self.length  # body bytes still to come; None = until EOF
        self._error: BaseException | None = None  # raised on the next read
        self._pool_key = pool_key  # None: the connection is not to be reused
        self._lock = threading.Lock()  # interrupt (any thread) against close
        self._closed = False
        self._spoiled = False  # a read failed or was interrupted: never reuse

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    def readinto_blocking(self, view: memoryview, flush_s: float) -> int:
        """See kernel.pump.BlockingBody. Raises OSError / TimeoutError / ssl.SSLError."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._closed:  # its socket may serve another request now
            raise ValueError("read from a closed response")
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
            self._spoiled = True
            if not filled:
                raise
            self._error = exc  # keep what arrived; the fault surfaces on the next call
        if self._remaining is not None:
            self._remaining -= filled
        return filled

    def queued(self) -> int:
        """Bytes the kernel holds for this socket, not read yet (FIONREAD): a sender faster
        than this reader keeps it full, a slow origin leaves it empty. -1 when unknown."""
        if self._closed:
            return -1
        try:
            raw = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return -1
        return int.from_bytes(raw, sys.byteorder, signed=True)

    def interrupt(self) -> None:
        """Unblock a read in another thread: shut the socket down (not the TLS layer). The
        connection is never reused after this."""
        with self._lock:
            self._spoiled = True
            if not self._closed:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    @property
    def reusable(self) -> bool:
        """The body was read exactly to its length, without a fault, on a connection the
        server keeps open: the next response on it starts at its next byte."""
        return (
            self._pool_key is not None
            and self._remaining == 0
            and not self._leftover
            and self._error is None
            and not self._spoiled
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reuse = self.reusable
        if reuse:
            _POOL.give(self._pool_key, self.sock)
        else:
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


def _read_head(sock: socket.socket) -> _Head:
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(data) >= HEAD_LIMIT:
            raise ConnectionError("the response head is larger than 64 KiB")
        try:
            chunk = sock.recv(HEAD_LIMIT)
        except TimeoutError:
            raise
        except OSError as exc:
            if data:
                raise
            raise _NoResponse(f"the connection failed before the response head ({exc})") from exc
        if not chunk:
            if data:
                raise ConnectionError("the connection closed within the response head")
            raise _NoResponse("the connection closed before the response head")
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
    return _Head(parts[0], int(parts[1]), headers, bytes(data[end + 4 :]))


def _tunnel(sock: socket.socket, target: _Target, proxy_auth: str | None, proxy: str) -> None:
    lines = [f"CONNECT {target.host_port} HTTP/1.1", f"Host: {target.host_port}"]
    if proxy_auth:
        lines.append(f"Proxy-Authorization: {_basic(proxy_auth)}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    status = _read_head(sock).status
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


class _Resend(Exception):
    """A reused connection failed before any response byte: send the request again."""


def _proxy_target(proxy: str | None) -> _Target | None:
    if proxy is None:
        return None
    p = _Target.parse(proxy if "://" in proxy else f"http://{proxy}")
    if p.scheme != "http":
        raise PermanentError(f"Only http:// proxies are supported, not {proxy}.")
    return p


def _pool_key(
    target: _Target, proxy: str | None, tls: ssl.SSLContext, check_address: CheckAddress | None
) -> Hashable | None:
    """What makes two connections interchangeable; None when it cannot be told (never pooled).
    The checker compares as itself (a bound method: by its object), so a connection checked
    under one policy is never handed to another."""
    key = (target.origin, proxy, tls, check_address)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _request(target: _Target, p: _Target | None, headers: Mapping[str, str]) -> bytes:
    """The GET, persistent (HTTP/1.1's default): absolute-form to an http proxy."""
    request_target = target.path
    lines: list[str] = []
    if p is not None and target.scheme == "http":
        request_target = f"http://{target.authority}{target.path}"
        if p.auth:
            lines.append(f"Proxy-Authorization: {_basic(p.auth)}")
    lines = [f"GET {request_target} HTTP/1.1", f"Host: {target.authority}", *lines]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
    if target.auth and not any(k.lower() == "authorization" for k in headers):
        lines.append(f"Authorization: {_basic(target.auth)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _connection(
    target: _Target,
    p: _Target | None,
    *,
    tls: ssl.SSLContext,
    connect_timeout: float,
    check_address: CheckAddress | None,
) -> socket.socket:
    """A new connection to ``target`` (through the proxy ``p``), TLS wrapped for https."""
    shown = target.authority
    try:
        if p is None:
            sock = _connect(target.host, target.port, connect_timeout, check_address)
        else:
            if check_address is not None:  # the proxy resolves the target: check its name
                check_address(target.host, target.host)
            sock = _connect(p.host, p.port, connect_timeout, None)
            if target.scheme == "https":
                try:
                    _tunnel(sock, target, p.auth, f"{p.host}:{p.port}")
                except BaseException:
                    sock.close()
                    raise
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
    if target.scheme != "https":
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=target.host)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        refused = tls_failure(exc, shown)
        if refused is not None:
            raise refused from exc
        raise TransientError(f"TLS connection to {shown} failed: {exc}.", reason="network") from exc


def _exchange(
    sock: socket.socket, request: bytes, shown: str, read_timeout: float, *, reused: bool
) -> _Head:
    """Send ``request`` and read the response head; the socket is closed on failure. On a
    reused connection, a failure before any response byte raises _Resend."""
    try:
        sock.settimeout(read_timeout)
        try:
            sock.sendall(request)
        except TimeoutError:
            raise
        except OSError as exc:
            if reused:
                raise _Resend from exc
            raise
        return _read_head(sock)
    except _NoResponse as exc:
        sock.close()
        if reused:
            raise _Resend from exc
        raise TransientError(f"Network error talking to {shown}: {exc}.", reason="network") from exc
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
    p = _proxy_target(proxy)
    key = _pool_key(target, proxy, tls, check_address)
    request = _request(target, p, headers)
    shown = target.authority
    reused = None if key is None else _POOL.take(key)
    if reused is not None:
        with contextlib.suppress(_Resend):  # the server closed it while idle: a new one
            head = _exchange(reused, request, shown, read_timeout, reused=True)
            return Response(reused, head, url, key if head.keep_alive else None)
    sock = _connection(
        target, p, tls=tls, connect_timeout=connect_timeout, check_address=check_address
    )
    head = _exchange(sock, request, shown, read_timeout, reused=False)
    return Response(sock, head, url, key if head.keep_alive else None)


def _drain(response: Response) -> None:
    """Read out a redirect's note when it came with the head, so its connection can be kept
    (a body still on its way is not waited for: the connection is closed instead)."""
    if response.length is not None and len(response._leftover) >= response.length:
        response.readinto_blocking(memoryview(bytearray(response.length)), 0.0)


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
        _drain(response)
        response.close()
        url = urljoin(url, location)
        if _Target.parse(url).origin != first:  # credentials stay with their origin
            sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
    raise PermanentError(f"Too many redirects (more than {MAX_REDIRECTS}) from {url}.")

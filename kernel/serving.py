"""The HTTP server's resource bounds: a connection cap, a deadline for each request head, the
open-file limit, and a log that a flood cannot fill.

uvicorn alone keeps a connection that never sends a request open forever, and its
``limit_concurrency`` answers 503 to everyone (``/health`` too) once idle sockets fill it. So
the server runs uvicorn's h11 protocol with two additions (``BoundedH11Protocol``):

- a connection must send a complete request head within ``server.header_timeout_s`` of opening
  (after a response, uvicorn's keep-alive timeout takes over);
- at most ``server.max_connections`` connections are open: a new one past the cap closes the
  connection that has been idle longest (one with no request in progress), or itself when
  every other connection is busy. A flood of idle sockets therefore never holds the file
  descriptors a new client, a download or the state database needs.

asyncio accepts up to ``backlog`` sockets in one go before any of them reaches the protocol
(``connection_made`` runs in a task), so the descriptors in use can exceed the cap by a few
batches; both are bounded by what the open-file limit leaves after ``FD_RESERVE``. At start
the soft limit is raised to the hard one first. The event loop's error handler logs one
repeated error (such as ``accept()`` failing with EMFILE, which asyncio reports once per
socket it tried) at most every ``LOG_EVERY_S`` seconds, with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import resource
import time
from typing import Any

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from kernel.config import ServerSettings

__all__ = [
    "FD_RESERVE",
    "BoundedH11Protocol",
    "RateLimitedErrors",
    "connection_cap",
    "raise_nofile_limit",
    "server_config",
]

log = structlog.get_logger()

FD_RESERVE = 128  # descriptors kept for downloads, the state database, logs and engines
MIN_BATCH = 8
LOG_EVERY_S = 10.0
_order = itertools.count()


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a connection cap."""

    max_connections = 1000
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = next(_order)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()
        open_now = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_now) > self.max_connections:
            self._make_room(open_now)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if not self.idle():  # a request head arrived: its deadline is met
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if self.idle() and not self.transport.is_closing():
            self._arm_head_deadline()  # the next request head is due in time too

    def idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self.close_idle)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _make_room(self, open_now: list[Any]) -> None:
        idle = [
            c for c in open_now if c is not self and isinstance(c, BoundedH11Protocol) and c.idle()
        ]
        victim = min(idle, key=lambda c: c.opened) if idle else self
        log.debug("server.connection_evicted", open=len(open_now), idle=len(idle))
        victim.close_idle()

    def close_idle(self) -> None:
        """Close a connection with no request in progress (h11 sees a clean close)."""
        self._disarm_head_deadline()
        if not self.transport.is_closing():
            self._unset_keepalive_if_required()
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one (bounded by the kernel's nr_open when
    the hard limit is unlimited); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("server.nofile_not_raised", soft=soft, hard=hard, error=str(exc))
            return int(soft)
        log.info("server.nofile_raised", previous=soft, now=target)
        return int(target)
    return int(soft) if soft != resource.RLIM_INFINITY else _nr_open()


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 20


def connection_cap(settings: ServerSettings, nofile: int) -> tuple[int, int]:
    """(connection cap, accept backlog): ``server.max_connections`` and uvicorn's 2048,
    lowered to fit what the open-file limit leaves after ``FD_RESERVE``. Sockets accepted in
    one batch reach the protocol a loop turn later and an evicted one closes a turn after
    that, so up to cap + 3 batches are open at once: the cap gets half the room, a batch an
    eighth."""
    room = max(8 * MIN_BATCH, nofile - FD_RESERVE)
    cap = min(settings.max_connections, room // 2)
    if cap < settings.max_connections:
        log.warning(
            "server.max_connections_lowered",
            configured=settings.max_connections,
            now=cap,
            nofile=nofile,
        )
    return cap, min(2048, room // 8)


def server_config(app: Any, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn Config with the bounds: ``BoundedH11Protocol`` (a subclass carrying this
    server's cap and deadline), after raising the open-file limit."""
    cap, backlog = connection_cap(settings, raise_nofile_limit())
    protocol = type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {"max_connections": cap, "header_timeout_s": settings.header_timeout_s},
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        backlog=backlog,
        timeout_keep_alive=min(5, int(settings.header_timeout_s) or 1),
        **options,
    )


class RateLimitedErrors:
    """An event-loop exception handler: each distinct message is logged at most once every
    ``every_s`` seconds; the next log line says how many were held back meanwhile."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        key = str(context.get("message", ""))[:200]
        exc = context.get("exception")
        if exc is not None:
            key += f" {type(exc).__name__}:{getattr(exc, 'errno', '')}"
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if len(self._last) > 1000:  # bounded: forget the oldest messages
            for old in sorted(self._last, key=self._last.__getitem__)[:500]:
                self._last.pop(old, None)
        if held:
            context = {**context, "message": f"{context.get('message')} ({held} more held back)"}
        with contextlib.suppress(Exception):
            loop.default_exception_handler(context)

"""``GET /v1/events``: the bus as Server-Sent Events.

Each event is one SSE frame::

    id: 42
    event: download.progress
    data: {"model_id": "...", "status": "downloading", "progress": {...}, ...}

``data`` is the detail download object (the body of ``GET /v1/downloads/{id}``) at the time of
the event; for ``download.retry`` it is ``{model_id, attempt, reason, error, delay_s}``, for
``engine.created`` ``{model_id, model_type, inference_engine}``.

A client that reconnects with ``Last-Event-ID`` (or ``?last_event_id=``) first gets every
buffered event after that id, then live ones, with no gap and no duplicate: the stream
subscribes to the bus *before* it reads the replay ring and skips ids it has already sent.
When events were lost (the ring no longer reaches back far enough, the id belongs to an earlier
server run, or this client fell behind and its bounded queue overflowed) the stream sends
``event: resync`` with ``data: {}``: refetch the list, then carry on. A comment line
(``: ping``) goes out every ``heartbeat_s`` seconds so proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import structlog
from litestar import Controller, Request, get
from litestar.params import FromQuery
from litestar.response import Stream

from kernel.api.errors import error_responses
from kernel.api.schemas import Download
from kernel.errors import InvalidRequest
from kernel.events import Envelope, EventBus
from kernel.types import (
    DownloadCreated,
    DownloadProgress,
    DownloadRetry,
    DownloadStatus,
    EngineCreated,
)
from kernel.validation import validate_model_id

__all__ = ["EVENTS_STATE_KEY", "EventStreams", "EventsController"]

log = structlog.get_logger()

EVENTS_STATE_KEY = "event_streams"  # app.state[EVENTS_STATE_KEY] is the EventStreams
PING = b": ping\n\n"
RESYNC = b"event: resync\ndata: {}\n\n"
_BATCH = 256  # frames joined into one write when a client has a backlog


class EventStreams:
    """Every open event stream of one app: settings, the shared frame cache, and shutdown.

    ``heartbeat_s`` and ``queue_size`` are plain attributes so tests can shorten them.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        queue_position: Callable[[str], int | None] | None = None,
        heartbeat_s: float = 15.0,
        queue_size: int = 1000,
        retry_ms: int = 2000,
    ) -> None:
        self.bus = bus
        self.queue_position = queue_position
        self.heartbeat_s = heartbeat_s
        self.queue_size = queue_size
        self.retry_ms = retry_ms
        self.open = 0
        self._closing = asyncio.Event()
        # One encoding per event, shared by every client (and stamped near publish time).
        self._frames: collections.OrderedDict[int, tuple[str, bytes]] = collections.OrderedDict()

    def close(self) -> None:
        """End every open stream (the server is shutting down); new streams end at once."""
        self._closing.set()

    def frame(self, envelope: Envelope) -> tuple[str, bytes]:
        """``(model_id, SSE frame bytes)`` for one envelope, encoded once and cached."""
        cached = self._frames.get(envelope.id)
        if cached is not None:
            return cached
        event = envelope.event
        name = type(event).__struct_config__.tag
        match event:
            case (
                DownloadCreated(record=rec)
                | DownloadStatus(record=rec)
                | DownloadProgress(record=rec)
            ):
                model_id = rec.model_id
                position = (
                    self.queue_position(model_id)
                    if rec.status == "queued" and self.queue_position is not None
                    else None
                )
                data = msgspec.json.encode(Download.from_record(rec, queue_position=position))
            case EngineCreated():
                model_id = event.model_id
                data = msgspec.json.encode(
                    {
                        "model_id": event.model_id,
                        "model_type": event.model_type,
                        "inference_engine": event.inference_engine,
                    }
                )
            case DownloadRetry():
                model_id = event.model_id
                data = msgspec.json.encode(msgspec.structs.asdict(event))
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (envelope.id, str(name).encode(), data)
        self._frames[envelope.id] = (model_id, frame)
        while len(self._frames) > 4096:
            self._frames.popitem(last=False)
        return model_id, frame

    async def stream(self, last_id: int | None, model_id: str | None) -> AsyncIterator[bytes]:
        """The SSE body for one client. Subscribing and reading the ring happen in one step
        (no await between), so nothing published in between is lost or sent twice."""
        bus = self.bus
        sub = bus.subscribe(self.queue_size)
        newest = bus.last_id
        resync = False
        if last_id is None or last_id > newest:
            # A fresh client, or an id from an earlier server run: live events only.
            resync = last_id is not None
            backlog, last_sent = [], newest
        else:
            backlog, last_sent = bus.since(last_id), last_id
            first = backlog[0].id if backlog else newest + 1
            # Missed events: the ring dropped some after last_id, or last_id is from an earlier
            # run (below this run's first id). 0 asks for everything still buffered.
            dropped = first > max(last_id, bus.first_id - 1) + 1
            resync = last_id != 0 and (dropped or last_id < bus.first_id - 1)
        closing: asyncio.Future[Any] = asyncio.ensure_future(self._closing.wait())
        getter: asyncio.Future[Any] | None = None
        self.open += 1
        try:
            yield b"retry: %d\n\n" % self.retry_ms + (RESYNC if resync else b"")
            chunk: list[bytes] = []
            for envelope in backlog:
                last_sent = envelope.id
                self._append(chunk, envelope, model_id)
                if len(chunk) >= _BATCH:
                    yield b"".join(chunk)
                    chunk.clear()
            if chunk:
                yield b"".join(chunk)
            while not self._closing.is_set():
                if sub.overflowed:  # this client fell behind; its queue was emptied
                    sub.overflowed = False
                    log.info("events.resync", queue_size=self.queue_size)
                    yield RESYNC
                if getter is None:
                    getter = asyncio.ensure_future(sub.get())
                done, _ = await asyncio.wait(
                    {getter, closing}, timeout=self.heartbeat_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if getter not in done:
                    if closing not in done:
                        yield PING
                    continue
                envelopes = [getter.result()]
                getter = None
                while len(envelopes) < _BATCH and not sub.queue.empty():
                    envelopes.append(sub.queue.get_nowait())
                chunk = []
                for envelope in envelopes:
                    if envelope.id > last_sent:
                        last_sent = envelope.id
                        self._append(chunk, envelope, model_id)
                if chunk:
                    yield b"".join(chunk)
        finally:
            self.open -= 1
            for future in (getter, closing):
                if future is not None:
                    future.cancel()
            sub.close()

    def _append(self, chunk: list[bytes], envelope: Envelope, model_id: str | None) -> None:
        owner, frame = self.frame(envelope)
        if model_id is None or owner == model_id:
            chunk.append(frame)


def _last_id(header: str | None, query: str | None) -> int | None:
    if query is not None and query != "":
        try:
            return max(0, int(query))
        except ValueError:
            raise InvalidRequest(
                "last_event_id must be an event id (an integer).", param="last_event_id"
            ) from None
    if header:
        try:
            return max(0, int(header.strip()))
        except ValueError:
            return None  # not one of our ids: start live, like a fresh client
    return None


class EventsController(Controller):
    path = "/events"
    tags = ["events"]  # noqa: RUF012 - Litestar's own class-attribute convention

    @get(
        "/",
        summary="Server-Sent Events: download.created, download.status, download.progress, "
        "download.retry, engine.created (reconnect with Last-Event-ID)",
        media_type="text/event-stream",
        response_description="An endless text/event-stream; see the module docstring",
        responses=error_responses(400),
    )
    async def events(
        self,
        request: Request,  # type: ignore[type-arg]
        model_id: FromQuery[str | None] = None,
        last_event_id: FromQuery[str | None] = None,
    ) -> Stream:
        if model_id is not None:
            validate_model_id(model_id, param="model_id")
        last = _last_id(request.headers.get("last-event-id"), last_event_id)
        streams: EventStreams = request.app.state[EVENTS_STATE_KEY]
        return Stream(
            streams.stream(last, model_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

"""The download state machine: every transition is checked, saved and published, in that order.

A status changes only through :meth:`Lifecycle.set_status`, synchronously in the event loop,
so two API calls can never interleave inside one. Each change is saved to the store in the
background (:class:`~kernel._saves.RecordWriter`: in order, replies wait for durability with
:meth:`Lifecycle.durable`) and published on the bus as a snapshot, which later changes to the
live record do not affect. Progress is published at most every ``PROGRESS_INTERVAL_S`` and
checkpointed to the store at least every ``CHECKPOINT_INTERVAL_S`` per download; progress held
back by the interval is published when the interval ends, so the last bytes before a quiet
spell (a stall, a retry's backoff) are never missing from the stream.

    queued -> downloading -> (creating_engine) -> completed
    any non-terminal -> cancelled;  queued / downloading / creating_engine -> failed
    downloading <-> paused (resume goes through queued when no slot is free)
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog

from kernel._saves import RecordWriter
from kernel.events import EventBus
from kernel.types import (
    TERMINAL,
    DownloadCreated,
    DownloadProgress,
    DownloadRecord,
    DownloadStatus,
    DownloadStore,
    Status,
    now_ms,
)

__all__ = ["TRANSITIONS", "Lifecycle", "check_transition", "snapshot"]

log = structlog.get_logger()

PROGRESS_INTERVAL_S = 0.25  # at most 4 progress events a second per download
CHECKPOINT_INTERVAL_S = 1.0  # progress saved to the store at least this often

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"downloading", "paused", "cancelled", "failed"}),
    "downloading": frozenset(
        {"queued", "paused", "creating_engine", "completed", "failed", "cancelled"}
    ),
    "paused": frozenset({"queued", "downloading", "cancelled"}),
    "creating_engine": frozenset({"completed", "failed", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


def check_transition(old: str, new: str) -> None:
    if new not in TRANSITIONS[old]:
        raise RuntimeError(f"Illegal download transition {old} -> {new}.")


class Lifecycle:
    """Transitions, persistence and publishing of the records one manager owns."""

    def __init__(self, store: DownloadStore, bus: EventBus) -> None:
        self._bus = bus
        self._writer = RecordWriter(store)
        self._last_progress: dict[str, float] = {}
        self._last_checkpoint: dict[str, float] = {}
        self._trailing: dict[str, asyncio.TimerHandle] = {}  # held-back progress, by model id

    def created(self, rec: DownloadRecord) -> None:
        self.persist(rec)
        self._bus.publish(DownloadCreated(snapshot(rec)))

    def set_status(self, rec: DownloadRecord, status: Status, error: str | None = None) -> None:
        previous = rec.status
        check_transition(previous, status)
        rec.status = status
        if status in TERMINAL:
            rec.end_time = now_ms()
        if error is not None:
            rec.error_message = error
        elif status in ("queued", "downloading"):
            rec.error_message = None
        self.persist(rec)
        self._bus.publish(DownloadStatus(snapshot(rec), previous))
        log.info(
            "download.status",
            model_id=rec.model_id,
            previous=previous,
            status=status,
            downloaded_bytes=rec.downloaded_bytes,
            error=error,
        )

    def fail(self, rec: DownloadRecord, message: str) -> None:
        """Fail ``rec`` unless it has already ended (a cancel won the race)."""
        if rec.status not in TERMINAL:
            self.set_status(rec, "failed", error=message)

    def progress(self, rec: DownloadRecord) -> None:
        """A transfer moved bytes: publish and checkpoint, each at most at its interval. Bytes
        inside the publish interval are published when it ends (one timer per download)."""
        now = time.monotonic()
        wait = PROGRESS_INTERVAL_S - (now - self._last_progress.get(rec.model_id, 0.0))
        if wait <= 0:
            self._publish_progress(rec, now)
        elif rec.model_id not in self._trailing:
            loop = asyncio.get_running_loop()
            self._trailing[rec.model_id] = loop.call_later(wait, self._trail, rec)
        if now - self._last_checkpoint.get(rec.model_id, 0.0) >= CHECKPOINT_INTERVAL_S:
            self._last_checkpoint[rec.model_id] = now
            self.persist(rec)

    def _publish_progress(self, rec: DownloadRecord, now: float) -> None:
        self._last_progress[rec.model_id] = now
        if (handle := self._trailing.pop(rec.model_id, None)) is not None:
            handle.cancel()
        self._bus.publish(DownloadProgress(snapshot(rec)))

    def _trail(self, rec: DownloadRecord) -> None:
        """The interval ended with progress held back: publish it, unless the run ended."""
        self._trailing.pop(rec.model_id, None)
        if rec.status == "downloading":
            self._publish_progress(rec, time.monotonic())

    def run_ended(self, model_id: str) -> None:
        """A transfer stopped (its status event carries its last numbers): nothing held back
        is published after it, and its next run publishes its first progress at once."""
        if (handle := self._trailing.pop(model_id, None)) is not None:
            handle.cancel()
        self._last_progress.pop(model_id, None)
        self._last_checkpoint.pop(model_id, None)

    def persist(self, rec: DownloadRecord) -> None:
        """Save ``rec`` as it is now, in the background; ``durable`` awaits it."""
        self._writer.save(snapshot(rec))

    def forget(self, model_id: str) -> None:
        """Delete the record from the store, after every save queued for it."""
        self._writer.delete(model_id)

    async def durable(self, model_id: str) -> None:
        """Return once every save or delete asked for ``model_id`` so far is in the store."""
        await self._writer.wait(model_id)

    async def flush(self) -> None:
        """Wait until every save asked for so far has reached the store."""
        await self._writer.drain()


def snapshot(rec: DownloadRecord) -> DownloadRecord:
    """A copy of ``rec`` that later changes to it (its file table, the segment tables a
    running transfer updates in place) never reach."""
    files = None if rec.files is None else [
        msgspec.structs.replace(f, segments=_copied(f.segments)) for f in rec.files
    ]  # fmt: skip
    return msgspec.structs.replace(rec, segments=_copied(rec.segments), files=files)


def _copied(segments: list[list[int]] | None) -> list[list[int]] | None:
    return [list(s) for s in segments] if segments else segments

"""Record saves in order, and waiting until a change is durable.

Each record has at most one write (save or delete) in flight at the store: the next one
starts when it ends, and versions asked for meanwhile collapse into the latest, so the store
always ends with the last state asked for (a save queued before a purge's delete never lands
after it). Different records are written concurrently, which lets a store batch them.
``wait(model_id)`` returns once everything asked for that record so far is in the store, so
an API reply can wait for its change to be durable.
"""

from __future__ import annotations

import asyncio

import structlog

from kernel.types import DownloadRecord, DownloadStore

__all__ = ["RecordWriter"]

log = structlog.get_logger()


class RecordWriter:
    def __init__(self, store: DownloadStore) -> None:
        self.store = store
        self._version = 0  # one counter for every record: versions only grow
        self._next: dict[str, tuple[int, DownloadRecord | None]] = {}  # None = delete
        self._asked: dict[str, int] = {}  # the latest version asked for, per record
        self._written: dict[str, int] = {}  # the latest version in the store, per record
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}

    def save(self, record: DownloadRecord) -> None:
        """Queue a save of ``record`` as it is now (the caller passes a snapshot)."""
        self._put(record.model_id, record)

    def delete(self, model_id: str) -> None:
        self._put(model_id, None)

    def _put(self, model_id: str, record: DownloadRecord | None) -> None:
        self._version += 1
        self._asked[model_id] = self._version
        self._next[model_id] = (self._version, record)
        if model_id not in self._writers:
            self._writers[model_id] = asyncio.create_task(
                self._write(model_id), name=f"save:{model_id}"
            )

    async def wait(self, model_id: str) -> None:
        """Return once every save or delete asked for ``model_id`` so far is in the store;
        raise the store's error if the last of them failed."""
        version = self._asked.get(model_id)
        if version is None or self._written.get(model_id, 0) >= version:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(model_id, []).append((version, done))
        await done

    async def drain(self) -> None:
        """Wait for every queued write to end."""
        while self._writers:
            await asyncio.wait(list(self._writers.values()))

    async def _write(self, model_id: str) -> None:
        try:
            while (item := self._next.pop(model_id, None)) is not None:
                version, record = item
                error: Exception | None = None
                try:
                    if record is None:
                        await self.store.delete(model_id)
                    else:
                        await self.store.save(record)
                except Exception as exc:
                    log.exception("store.save_failed", model_id=model_id)
                    error = exc
                self._written[model_id] = version
                self._settle(model_id, version, error)
        finally:
            del self._writers[model_id]
            if model_id not in self._next:  # nothing left: forget this record's counters
                self._asked.pop(model_id, None)
                self._written.pop(model_id, None)

    def _settle(self, model_id: str, version: int, error: Exception | None) -> None:
        waiting = self._waiters.pop(model_id, [])
        later = []
        for wanted, done in waiting:
            if wanted > version:
                later.append((wanted, done))
            elif not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)
        if later:
            self._waiters[model_id] = later

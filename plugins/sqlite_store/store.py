"""SqliteStore: download records as msgspec JSON rows in an embedded SQLite file (WAL).

Every call runs on one dedicated thread, so the event loop never waits on SQLite. Saves are
batched: records saved while a write is queued are written together in one transaction, the
latest version of each record winning. The schema carries a version (``PRAGMA user_version``)
and is brought forward by the ordered ``MIGRATIONS``; a database from a newer modelkernel is
refused with a clear message instead of being damaged.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from kernel.errors import KernelError
from kernel.types import DownloadRecord

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteStore", "StoreError"]

T = TypeVar("T")

# Migration N brings a database from version N-1 to N. Append only; never edit a shipped one.
MIGRATIONS: list[str] = [
    "CREATE TABLE downloads (model_id TEXT PRIMARY KEY, record BLOB NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(KernelError):
    """The state database cannot be used; the message says why and what to do."""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(DownloadRecord)
        self._lock = threading.Lock()
        self._pending: dict[str, bytes | None] = {}  # model id -> record, None = delete
        self._batch: asyncio.Future[None] | None = None
        self.batches_written = 0

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- connection and schema (worker thread) ------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (WAL fsynced) before the save returns, so a change the
            # API has acknowledged survives a crash or a power cut, not only a kill.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The state database {self.path} was written by a newer modelkernel "
                    f"(schema {version}; this one knows up to {SCHEMA_VERSION}). "
                    "Upgrade modelkernel, or use another --state-dir."
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(MIGRATIONS[number - 1])
                conn.execute(f"PRAGMA user_version={number}")
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(
                f"The state database {self.path} is unreadable ({exc}). Move it aside to start "
                "with an empty state, or restore it from a backup."
            ) from exc
        except StoreError:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _load_all(self) -> list[DownloadRecord]:
        rows = self._connect().execute("SELECT model_id, record FROM downloads").fetchall()
        records = []
        for model_id, blob in rows:
            try:
                records.append(self._decoder.decode(blob))
            except msgspec.DecodeError as exc:
                raise StoreError(
                    f"The record of {model_id!r} in {self.path} is unreadable ({exc})."
                ) from exc
        return records

    def _write_batch(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
            self._batch = None
        conn = self._connect()
        conn.execute("BEGIN")
        try:
            for model_id, blob in batch.items():
                if blob is None:
                    conn.execute("DELETE FROM downloads WHERE model_id = ?", (model_id,))
                else:
                    conn.execute(
                        "INSERT INTO downloads(model_id, record) VALUES (?, ?) "
                        "ON CONFLICT(model_id) DO UPDATE SET record = excluded.record",
                        (model_id, blob),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.batches_written += 1

    def _get_meta(self, key: str) -> bytes | None:
        row = self._connect().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def _put_meta(self, key: str, value: bytes) -> None:
        self._connect().execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- the DownloadStore protocol ------------------------------------------------------

    async def _enqueue(self, model_id: str, blob: bytes | None) -> None:
        with self._lock:
            self._pending[model_id] = blob
            batch = self._batch
            if batch is None:
                batch = self._batch = asyncio.get_running_loop().run_in_executor(
                    self._executor, self._write_batch
                )
        await batch

    async def load_all(self) -> list[DownloadRecord]:
        return await self._call(self._load_all)

    async def save(self, record: DownloadRecord) -> None:
        # Encode now, in the loop: the record may change while the batch waits.
        await self._enqueue(record.model_id, self._encoder.encode(record))

    async def delete(self, model_id: str) -> None:
        await self._enqueue(model_id, None)

    async def get_meta(self, key: str) -> bytes | None:
        return await self._call(self._get_meta, key)

    async def put_meta(self, key: str, value: bytes) -> None:
        await self._call(self._put_meta, key, value)

    async def close(self) -> None:
        if self._batch is not None:
            await self._batch
        await self._call(self._close)
        self._executor.shutdown(wait=True)

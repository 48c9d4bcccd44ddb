"""SqliteStore: download records as msgspec JSON rows in an embedded SQLite file (WAL).

Every call runs on one dedicated thread, so the event loop never waits on SQLite. Saves are
batched: records saved while a write is queued are written together in one transaction, the
latest version of each record winning. The schema carries a version (``PRAGMA user_version``)
and is brought forward by the ordered ``MIGRATIONS``; a database from a newer modelkernel is
refused with a clear message instead of being damaged.

Damage is never taken for an empty state: a 0-byte file, a file that is not a database, one
that fails SQLite's ``quick_check``, or a write-ahead log that SQLite would replay only in
part (``_wal.py``) is refused at start with one message (``StoreError``). A new database is
built beside its final name and renamed into place, so a crash while creating it leaves
nothing half made. One record that cannot be decoded is moved to the ``quarantine`` table
(logged, and listed in ``quarantined``), and the others load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from kernel.errors import StoreError
from kernel.types import DownloadRecord
from plugins.sqlite_store._wal import wal_damage

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteStore"]

T = TypeVar("T")

# Migration N brings a database from version N-1 to N. Append only; never edit a shipped one.
MIGRATIONS: list[str] = [
    "CREATE TABLE downloads (model_id TEXT PRIMARY KEY, record BLOB NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE quarantine (model_id TEXT, record BLOB, error TEXT, at INTEGER)",
]
SCHEMA_VERSION = len(MIGRATIONS)


log = structlog.get_logger()


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
        self.quarantined: list[str] = []  # "model id: why", for records that could not load

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- connection and schema (worker thread) ------------------------------------------

    def _unusable(self, why: str) -> StoreError:
        return StoreError(
            f"The state database {self.path} is unusable: {why}. Move it aside (with its "
            "-wal and -shm files) to start with an empty state, or restore it from a backup."
        )

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._create()
        elif self.path.is_file() and self.path.stat().st_size == 0:
            raise self._unusable("it is empty (0 bytes), not a database")
        damage = wal_damage(Path(f"{self.path}-wal"))
        if damage is not None:
            raise self._unusable(f"its write-ahead log {self.path}-wal is damaged: {damage}")
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._unusable(str(exc)) from exc
        try:
            self._prepare(conn)
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise self._unusable(f"its integrity check failed ({'; '.join(problems[:3])})")
        except sqlite3.Error as exc:
            conn.close()
            raise self._unusable(str(exc)) from exc
        except StoreError:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
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

    def _create(self) -> None:
        """A new database, built under a temporary name and renamed into place."""
        fresh = self.path.with_name(self.path.name + ".new")
        for leftover in (fresh, Path(f"{fresh}-wal"), Path(f"{fresh}-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        conn = sqlite3.connect(fresh, isolation_level=None)
        try:
            self._prepare(conn)
        finally:
            conn.close()  # checkpoints the log into the file and removes it
        with open(fresh, "rb") as f:
            os.fsync(f.fileno())
        os.replace(fresh, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _load_all(self) -> list[DownloadRecord]:
        conn = self._connect()
        try:
            rows = conn.execute("SELECT model_id, record FROM downloads").fetchall()
        except sqlite3.Error as exc:
            raise self._unusable(str(exc)) from exc
        records = []
        for model_id, blob in rows:
            try:
                record = self._decoder.decode(blob)
                if record.model_id != model_id:
                    raise msgspec.ValidationError(f"it is the record of {record.model_id!r}")
            except (msgspec.DecodeError, TypeError) as exc:
                try:
                    self._quarantine(conn, model_id, blob, str(exc))
                except sqlite3.Error as error:
                    raise self._unusable(str(error)) from error
                continue
            records.append(record)
        return records

    def _quarantine(self, conn: sqlite3.Connection, model_id: str, blob: Any, why: str) -> None:
        """Move an unreadable row aside (kept for inspection) so it never stops a start."""
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO quarantine(model_id, record, error, at) "
            "VALUES (?, ?, ?, CAST(strftime('%s','now') AS INTEGER))",
            (model_id, blob, why),
        )
        conn.execute("DELETE FROM downloads WHERE model_id = ?", (model_id,))
        conn.execute("COMMIT")
        self.quarantined.append(f"{model_id}: {why}")
        log.error("store.record_quarantined", model_id=model_id, error=why, db=str(self.path))

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
        try:
            return await self._call(self._get_meta, key)
        except sqlite3.Error as exc:
            raise self._unusable(str(exc)) from exc

    async def put_meta(self, key: str, value: bytes) -> None:
        await self._call(self._put_meta, key, value)

    async def close(self) -> None:
        if self._batch is not None:
            await self._batch
        await self._call(self._close)
        self._executor.shutdown(wait=True)

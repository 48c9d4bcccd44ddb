"""SqliteStore: download records as msgspec JSON rows, written by one worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import msgspec

from kernel.errors import KernelError
from kernel.types import DownloadRecord

__all__ = ["SCHEMA_VERSION", "SqliteStore", "StoreError"]

T = TypeVar("T")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS downloads (
    model_id TEXT PRIMARY KEY,
    record   BLOB NOT NULL
);
"""


class StoreError(KernelError):
    """The state database cannot be used; the message says why and what to do."""


class SqliteStore:
    """Every call runs on one dedicated thread, so the event loop never waits on SQLite."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(DownloadRecord)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"The state database {self.path} was written by a newer modelkernel "
                        f"(schema {version}, this one knows {SCHEMA_VERSION}); upgrade modelkernel."
                    )
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except sqlite3.DatabaseError as exc:
                raise StoreError(
                    f"The state database {self.path} cannot be opened ({exc}); move it aside "
                    "to start with an empty state."
                ) from exc
            self._conn = conn
        return self._conn

    def _load_all(self) -> list[DownloadRecord]:
        rows = self._connect().execute("SELECT record FROM downloads").fetchall()
        return [self._decoder.decode(row[0]) for row in rows]

    def _save(self, blob: bytes, model_id: str) -> None:
        self._connect().execute(
            "INSERT INTO downloads(model_id, record) VALUES (?, ?) "
            "ON CONFLICT(model_id) DO UPDATE SET record = excluded.record",
            (model_id, blob),
        )

    def _delete(self, model_id: str) -> None:
        self._connect().execute("DELETE FROM downloads WHERE model_id = ?", (model_id,))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def load_all(self) -> list[DownloadRecord]:
        return await self._call(self._load_all)

    async def save(self, record: DownloadRecord) -> None:
        # Encode in the loop: the record may change while the thread waits.
        await self._call(self._save, self._encoder.encode(record), record.model_id)

    async def delete(self, model_id: str) -> None:
        await self._call(self._delete, model_id)

    async def close(self) -> None:
        await self._call(self._close)
        self._executor.shutdown(wait=True)

"""PgStore: each node's download records in a shared PostgreSQL database.

Rows are keyed by (node id, model id) with the msgspec-encoded record as ``jsonb``, so every
node sees only its own records through the ``DownloadStore`` protocol (its Downloads API is
unchanged) while an operator, or the cluster view, can read them all. The schema is brought
forward by the ordered ``MIGRATIONS`` (table ``mk_schema_migrations`` lists the applied ones);
nodes starting at once serialise on a transaction-scoped lock while migrating, and a database
migrated by a newer modelkernel is refused with a clear message.

A record that cannot be decoded is moved to ``mk_quarantine`` (logged, listed in
``quarantined``) and the others load. Saves are batched like the SQLite store's: records saved
while a write is in flight go together in one transaction, the latest version of each winning;
``save`` returns once its batch is committed (durable: PostgreSQL's commit). When the database
is unreachable the save raises ``StoreError`` and the batch is kept, so the next save (or the
retry a second later) writes it: a database restart loses no record.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import psycopg
import structlog

from kernel.errors import StoreError
from kernel.types import DownloadRecord, LeaseBoard

if TYPE_CHECKING:
    from kernel.config import FleetSettings

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PgStore", "default_node_id"]

log = structlog.get_logger()
T = TypeVar("T")

# Migration N brings a database from version N-1 to N. Append only; never edit a shipped one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE mk_downloads (
        node_id text NOT NULL,
        model_id text NOT NULL,
        record jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node_id, model_id)
    );
    CREATE TABLE mk_meta (
        node_id text NOT NULL,
        key text NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (node_id, key)
    );
    CREATE TABLE mk_nodes (
        node_id text PRIMARY KEY,
        api_url text,
        state text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    """
    CREATE TABLE mk_leases (
        file_key text PRIMARY KEY,
        holder text,
        token bigint NOT NULL DEFAULT 0,
        lease_until timestamptz NOT NULL DEFAULT now(),
        size bigint,
        done bigint NOT NULL DEFAULT 0,
        state text NOT NULL DEFAULT 'fetching',
        info jsonb NOT NULL DEFAULT '{}'::jsonb,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE mk_lease_wants (
        file_key text NOT NULL,
        node_id text NOT NULL,
        model_id text NOT NULL,
        PRIMARY KEY (file_key, node_id, model_id)
    );
    """,
    """
    CREATE FUNCTION mk_lease_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('mk_lease', NEW.file_key);
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER mk_lease_changed AFTER INSERT OR UPDATE ON mk_leases
        FOR EACH ROW EXECUTE FUNCTION mk_lease_notify();
    """,
    """
    CREATE TABLE mk_quarantine (
        node_id text NOT NULL,
        model_id text NOT NULL,
        record text NOT NULL,
        error text NOT NULL,
        at timestamptz NOT NULL DEFAULT now()
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
# Any constant: serialises concurrent migrations of one database (DDL only, never leases).
_MIGRATION_LOCK = 0x6D6B5F6D69677261


def default_node_id() -> str:
    return socket.gethostname() or "node"


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Bring the database to ``SCHEMA_VERSION``; returns the version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS mk_schema_migrations ("
            " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM mk_schema_migrations")
        row = await cur.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"The shared database was migrated by a newer modelkernel (schema {found}; "
                f"this one knows up to {SCHEMA_VERSION}). Upgrade this node."
            )
        for number in range(found + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[number - 1].encode())
            await conn.execute("INSERT INTO mk_schema_migrations(version) VALUES (%s)", (number,))
    return found


class PgStore:
    """A ``DownloadStore`` and a ``LeasingStore``: the fleet's leases live in the same
    database (``leases.py``)."""

    def __init__(self, dsn: str, node_id: str, *, api_url: str | None = None) -> None:
        self.dsn = dsn
        self.node_id = node_id
        self.api_url = api_url
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._conn_lock = asyncio.Lock()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(DownloadRecord)
        self._pending: dict[str, bytes | None] = {}  # model id -> record, None = delete
        self._batch: asyncio.Future[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._migrated = False
        self.batches_written = 0
        self.quarantined: list[str] = []  # "model id: why", for records that could not load

    def leases(self, fleet: FleetSettings) -> LeaseBoard:
        from plugins.pg_store.leases import LeaseManager

        return LeaseManager(
            self.dsn,
            self.node_id,
            lease_s=fleet.lease_s,
            heartbeat_s=fleet.heartbeat_s,
            poll_s=fleet.poll_s,
            listen=fleet.listen,
        )

    # --- connection ----------------------------------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=5, application_name="modelkernel"
            )
        except psycopg.Error as exc:
            raise StoreError(f"Cannot connect to the shared database: {exc}") from exc
        if not self._migrated:
            try:
                await migrate(conn)
            except BaseException:
                await conn.close()
                raise
            self._migrated = True
        self._conn = conn
        return conn

    async def run(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``work`` on this store's connection (one at a time), reconnecting once when
        the connection was lost; a database that stays unreachable raises StoreError."""
        async with self._conn_lock:
            for attempt in (1, 2):
                conn = await self._connection()
                try:
                    return await work(conn)
                except psycopg.OperationalError as exc:
                    await self._drop()
                    if attempt == 2:
                        raise StoreError(f"The shared database is unreachable: {exc}") from exc
            raise AssertionError("unreachable")

    async def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None

    # --- the DownloadStore protocol ------------------------------------------------------

    async def load_all(self) -> list[DownloadRecord]:
        async def work(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
            await conn.execute(
                "INSERT INTO mk_nodes(node_id, api_url, state) VALUES (%s, %s, 'up')"
                " ON CONFLICT (node_id) DO UPDATE SET api_url = excluded.api_url,"
                " state = 'up', started_at = now(), heartbeat_at = now()",
                (self.node_id, self.api_url),
            )
            cur = await conn.execute(
                "SELECT model_id, record::text FROM mk_downloads WHERE node_id = %s",
                (self.node_id,),
            )
            return [(str(row[0]), str(row[1])) for row in await cur.fetchall()]

        records = []
        for model_id, text in await self.run(work):
            try:
                records.append(self._decoder.decode(text))
            except msgspec.DecodeError as exc:
                # One unreadable row never stops the node: it is set aside and reported.
                await self._quarantine(model_id, text, str(exc))
        return records

    async def _quarantine(self, model_id: str, text: str, why: str) -> None:
        """Move one record that cannot be decoded to ``mk_quarantine`` (the same contract as
        the SQLite store: logged, listed in ``quarantined``, the others load)."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO mk_quarantine(node_id, model_id, record, error)"
                    " VALUES (%s, %s, %s, %s)",
                    (self.node_id, model_id, text, why),
                )
                await conn.execute(
                    "DELETE FROM mk_downloads WHERE node_id = %s AND model_id = %s",
                    (self.node_id, model_id),
                )

        await self.run(work)
        self.quarantined.append(f"{model_id}: {why}")
        log.error("store.record_quarantined", model_id=model_id, error=why, node_id=self.node_id)

    async def save(self, record: DownloadRecord) -> None:
        await self._enqueue(record.model_id, self._encoder.encode(record))

    async def delete(self, model_id: str) -> None:
        await self._enqueue(model_id, None)

    async def _enqueue(self, model_id: str, blob: bytes | None) -> None:
        self._pending[model_id] = blob
        if self._batch is None:
            self._batch = asyncio.ensure_future(self._write_batch())
        await asyncio.shield(self._batch)

    async def _write_batch(self) -> None:
        await asyncio.sleep(0)  # let saves made in the same loop turn join this batch
        batch, self._pending = self._pending, {}
        self._batch = None

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                for model_id, blob in batch.items():
                    if blob is None:
                        await conn.execute(
                            "DELETE FROM mk_downloads WHERE node_id = %s AND model_id = %s",
                            (self.node_id, model_id),
                        )
                    else:
                        await conn.execute(
                            "INSERT INTO mk_downloads(node_id, model_id, record)"
                            " VALUES (%s, %s, %s::jsonb) ON CONFLICT (node_id, model_id)"
                            " DO UPDATE SET record = excluded.record, updated_at = now()",
                            (self.node_id, model_id, blob.decode()),
                        )

        try:
            await self.run(work)
        except BaseException:
            for model_id, blob in batch.items():  # keep them; a newer save wins
                self._pending.setdefault(model_id, blob)
            self._schedule_retry()
            raise
        self.batches_written += 1

    def _schedule_retry(self) -> None:
        if self._retry is not None:
            return

        def retry() -> None:
            self._retry = None
            if self._pending and self._batch is None:
                self._batch = asyncio.ensure_future(self._write_batch())
                self._batch.add_done_callback(lambda f: f.cancelled() or f.exception())

        self._retry = asyncio.get_running_loop().call_later(1.0, retry)

    async def get_meta(self, key: str) -> bytes | None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> bytes | None:
            cur = await conn.execute(
                "SELECT value FROM mk_meta WHERE node_id = %s AND key = %s", (self.node_id, key)
            )
            row = await cur.fetchone()
            return bytes(row[0]) if row else None

        return await self.run(work)

    async def put_meta(self, key: str, value: bytes) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                "INSERT INTO mk_meta(node_id, key, value) VALUES (%s, %s, %s)"
                " ON CONFLICT (node_id, key) DO UPDATE SET value = excluded.value",
                (self.node_id, key, value),
            )

        await self.run(work)

    async def heartbeat(self, state: str = "up") -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                "INSERT INTO mk_nodes(node_id, api_url, state) VALUES (%s, %s, %s)"
                " ON CONFLICT (node_id) DO UPDATE SET state = excluded.state,"
                " heartbeat_at = now()",
                (self.node_id, self.api_url, state),
            )

        await self.run(work)

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._batch is not None:
            with contextlib.suppress(Exception):
                await self._batch
        if self._pending:
            with contextlib.suppress(Exception):
                await self._write_batch()
        with contextlib.suppress(Exception):
            await self.heartbeat("stopped")
        await self._drop()

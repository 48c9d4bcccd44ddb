"""Leases with fencing: exactly one node of a fleet fetches a given file from the origin.

``LeaseManager`` is this store's ``LeaseBoard`` (``kernel.types``; ``PgStore.leases`` makes
one). A lease row per file key (the caller's: the S3 cache uses the sha256 when known, else the
URL and validator) in ``mk_leases`` holds the holder's node id, a monotonic ``token``,
``lease_until`` (database time, so node clocks never matter), the bytes done and a small
``info`` document (the S3 upload id, the validator...). A node claims a file with one
conditional statement: it wins only when nobody holds a live lease and the file is not
complete, and every win increments the token.

Every write of the holder (heartbeat, progress, completion) names its token and changes
nothing when the token moved on: a holder that was frozen past its lease (SIGSTOP, a long GC
pause, a partition) finds out at its next write, gets ``LeaseLost`` and must stop writing. A
holder that cannot reach the database stops on its own once its lease has run out by its own
clock (``Lease.valid``), since another node may have taken over by then.

Waiting nodes are woken by ``LISTEN``/``NOTIFY`` (a trigger notifies channel ``mk_lease`` with
the file key on every change) and also look every ``poll_s`` seconds, so a lost notification
or a broken listener only delays them by one poll. Not advisory locks, not file locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg
import structlog

from kernel.errors import LeaseLost, StoreError
from kernel.types import LeaseState
from plugins.pg_store.store import migrate

__all__ = ["Lease", "LeaseManager"]

log = structlog.get_logger()
CHANNEL = "mk_lease"

_COLUMNS = (
    "file_key, holder, token, lease_until > now(), size, done, state, info::text,"
    " greatest(extract(epoch FROM lease_until - now()), 0)::float8"
)


def _state(row: Any) -> LeaseState:
    return LeaseState(
        file_key=row[0],
        holder=row[1],
        token=int(row[2]),
        live=bool(row[3]),
        size=row[4],
        done=int(row[5]),
        state=row[6],
        info=msgspec.json.decode(row[7]),
        seconds_left=float(row[8]),
    )


class LeaseManager:
    """One node's view of the leases: claims, reads, waits. ``start()`` before use."""

    def __init__(
        self,
        dsn: str,
        node_id: str,
        *,
        lease_s: float = 15.0,
        heartbeat_s: float = 3.0,
        poll_s: float = 1.0,
        listen: bool = True,
    ) -> None:
        self.dsn = dsn
        self.node_id = node_id
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.listen = listen  # False: waiters only poll (a test turns LISTEN off this way)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # LISTEN is in place (polling covers the gaps)
        self.notifications = 0

    # --- connections ---------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=5, application_name="modelkernel-lease"
            )
        except psycopg.Error as exc:
            raise StoreError(f"Cannot connect to the shared database: {exc}") from exc

    async def start(self) -> None:
        conn = await self._connect()
        try:
            await migrate(conn)
        finally:
            await conn.close()
        if self.listen:
            self._listener = asyncio.create_task(self._listen(), name="lease-listen")
            with contextlib.suppress(TimeoutError):  # polling covers a slow start
                async with asyncio.timeout(5):
                    await self.listening.wait()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        async with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await self._conn.close()
                self._conn = None

    async def _execute(self, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """One statement on the command connection; reconnects once when it was lost."""
        async with self._lock:
            for attempt in (1, 2):
                if self._conn is None or self._conn.closed:
                    self._conn = await self._connect()
                try:
                    cur = await self._conn.execute(query.encode(), params)
                    return await cur.fetchall() if cur.description else []
                except psycopg.OperationalError as exc:
                    with contextlib.suppress(psycopg.Error):
                        await self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise StoreError(f"The shared database is unreachable: {exc}") from exc
            raise AssertionError("unreachable")

    async def _listen(self) -> None:
        """Wake waiters on NOTIFY; reconnect, backing off, when the connection drops (the
        waiters poll meanwhile, and are all woken once it is back: they may have missed one)."""
        failures = 0
        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(f"LISTEN {CHANNEL}".encode())
                    self.listening.set()
                    failures = 0
                    for key in list(self._waiters):
                        self._wake(key)
                    async for note in conn.notifies():
                        self.notifications += 1
                        self._wake(note.payload)
                finally:
                    self.listening.clear()
                    with contextlib.suppress(psycopg.Error):
                        await conn.close()
            except (psycopg.Error, StoreError) as exc:
                if failures == 0:
                    log.warning("lease.listen_lost", error=str(exc))
                failures += 1
            await asyncio.sleep(min(self.poll_s * 2 ** min(failures, 6), 10.0))

    def _wake(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    # --- reading and waiting ---------------------------------------------------------------

    async def read(self, key: str) -> LeaseState | None:
        query = f"SELECT {_COLUMNS} FROM mk_leases WHERE file_key = %s"  # noqa: S608 (constant)
        rows = await self._execute(query, (key,))
        return _state(rows[0]) if rows else None

    async def wait_change(self, key: str, wait_s: float | None = None) -> bool:
        """Return when the lease of ``key`` changes (True: notified) or after ``wait_s``
        seconds (default ``poll_s``; False). The caller reads the lease again either way."""
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            async with asyncio.timeout(self.poll_s if wait_s is None else wait_s):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[key]

    # --- claiming ------------------------------------------------------------------------

    async def claim(
        self, key: str, *, size: int | None = None, info: dict[str, Any] | None = None
    ) -> Lease | None:
        """Take the lease of ``key`` when nobody holds a live one and the file is not
        complete: a new Lease with the next token. None: someone else holds it, or it is done.
        ``info`` is merged into the row's (a takeover keeps the upload id it finds there)."""
        rows = await self._execute(
            "INSERT INTO mk_leases AS l (file_key, holder, token, lease_until, size, done, info)"
            " VALUES (%s, %s, 1, now() + make_interval(secs => %s), %s, 0, %s::jsonb)"
            " ON CONFLICT (file_key) DO UPDATE SET holder = excluded.holder,"
            " token = l.token + 1, lease_until = excluded.lease_until,"
            " size = coalesce(l.size, excluded.size), state = 'fetching',"
            " info = l.info || excluded.info, updated_at = now()"
            " WHERE l.state <> 'complete'"
            " AND (l.holder IS NULL OR l.lease_until <= now() OR l.holder = excluded.holder)"
            " RETURNING token, done, info::text",
            (key, self.node_id, self.lease_s, size, msgspec.json.encode(info or {}).decode()),
        )
        if not rows:
            return None
        token, done, info_text = rows[0]
        lease = Lease(self, key, int(token), done=int(done), info=msgspec.json.decode(info_text))
        log.info("lease.claimed", file_key=key, token=lease.token, done=lease.done)
        return lease

    async def reset(self, key: str, *, state: str = "fetching") -> None:
        """Forget the fetch of ``key`` (no holder, no upload, 0 bytes) unless it is complete:
        ``aborted`` when the last node that wanted it cancelled, ``fetching`` when a complete
        file's object went missing and must be fetched again (then even a complete one)."""
        await self._execute(
            "UPDATE mk_leases SET state = %s, holder = NULL, lease_until = now(), done = 0,"
            " info = info - 'upload_id', updated_at = now()"
            " WHERE file_key = %s AND (state <> 'complete' OR %s = 'fetching')",
            (state, key, state),
        )

    # --- who wants a file --------------------------------------------------------------------

    async def want(self, key: str, model_id: str) -> None:
        await self._execute(
            "INSERT INTO mk_lease_wants(file_key, node_id, model_id) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (key, self.node_id, model_id),
        )

    async def unwant(self, key: str, model_id: str) -> int:
        """This node's download no longer wants the file; returns how many still do."""
        rows = await self._execute(
            "WITH gone AS (DELETE FROM mk_lease_wants WHERE file_key = %s AND node_id = %s"
            " AND model_id = %s) SELECT count(*) FROM mk_lease_wants WHERE file_key = %s"
            " AND NOT (node_id = %s AND model_id = %s)",
            (key, self.node_id, model_id, key, self.node_id, model_id),
        )
        return int(rows[0][0])


class Lease:
    """A lease this node holds. Every write is fenced by ``token``."""

    def __init__(
        self, manager: LeaseManager, key: str, token: int, *, done: int, info: dict[str, Any]
    ) -> None:
        self.manager = manager
        self.key = key
        self.token = token
        self.done = done  # bytes done when claimed (a takeover continues from here)
        self.info = info
        self.lost = asyncio.Event()
        self._renewed_at = time.monotonic()  # by our clock, when the last renewal succeeded
        self._heartbeat: asyncio.Task[None] | None = None
        self.on_lost: Callable[[], None] = lambda: None

    @property
    def valid(self) -> bool:
        """Still ours as far as this node can tell: not fenced off, and renewed within the
        lease time by our own clock (so a node cut off from the database stops in time)."""
        return not self.lost.is_set() and (
            time.monotonic() - self._renewed_at < self.manager.lease_s
        )

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ``valid`` (the holder must stop)."""
        if not self.valid:
            self._lose("not renewed within the lease time")
            raise LeaseLost(f"The lease of {self.key} was lost.")

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            log.warning("lease.lost", file_key=self.key, token=self.token, why=why)
            self.lost.set()
            self.on_lost()

    async def write(
        self,
        *,
        done: int | None = None,
        size: int | None = None,
        info: dict[str, Any] | None = None,
        state: str | None = None,
        renew: bool = True,
    ) -> None:
        """Renew the lease and record progress, only while ``token`` is still the row's.
        Raises LeaseLost when it is not (the write changed nothing), StoreError when the
        database cannot be reached (the lease may still be ours: ``valid`` says how long)."""
        if self.lost.is_set():
            raise LeaseLost(f"The lease of {self.key} was lost.")
        started = time.monotonic()
        rows = await self.manager._execute(
            "UPDATE mk_leases SET"
            " lease_until = CASE WHEN %s THEN now() + make_interval(secs => %s)"
            " ELSE lease_until END,"
            " done = coalesce(%s, done), size = coalesce(%s, size),"
            " info = info || %s::jsonb, state = coalesce(%s, state), updated_at = now()"
            " WHERE file_key = %s AND token = %s AND holder = %s RETURNING token",
            (
                renew,
                self.manager.lease_s,
                done,
                size,
                msgspec.json.encode(info or {}).decode(),
                state,
                self.key,
                self.token,
                self.manager.node_id,
            ),
        )
        if not rows:
            self._lose("token moved on")
            raise LeaseLost(f"The lease of {self.key} was taken over by another node.")
        if renew:
            self._renewed_at = started
        if done is not None:
            self.done = done
        if info:
            self.info.update(info)

    async def complete(self, *, size: int, info: dict[str, Any] | None = None) -> None:
        """The file is whole in the cache: nobody needs to claim it again."""
        await self.write(done=size, size=size, info=info, state="complete", renew=False)
        await self.stop_heartbeat()

    async def release(self, *, state: str | None = None) -> None:
        """Give the lease up now (paused, cancelled, shutting down) so another node can claim
        it at once, without waiting for it to run out."""
        await self.stop_heartbeat()
        if self.lost.is_set():
            return
        with contextlib.suppress(StoreError):
            await self.manager._execute(
                "UPDATE mk_leases SET holder = NULL, lease_until = now(),"
                " state = coalesce(%s, state), updated_at = now()"
                " WHERE file_key = %s AND token = %s AND holder = %s",
                (state, self.key, self.token, self.manager.node_id),
            )

    def start_heartbeat(self, progress: Callable[[], int | None] = lambda: None) -> None:
        """Renew every ``heartbeat_s`` with the bytes ``progress()`` reports; on LeaseLost
        (or a lease run out while the database was away) ``on_lost`` is called once."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.manager.heartbeat_s)
                try:
                    await self.write(done=progress())
                except LeaseLost:
                    return
                except StoreError as exc:
                    log.warning("lease.renew_failed", file_key=self.key, error=exc.message)
                    if not self.valid:
                        self._lose("not renewed within the lease time")
                        return

        self._heartbeat = asyncio.create_task(beat(), name=f"lease:{self.key}")

    async def stop_heartbeat(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

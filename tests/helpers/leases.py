"""A fleet's leases without PostgreSQL: a small real ``LeaseBoard`` over a table in memory.

:class:`LeaseTable` is what a shared database would be (one per test, shared by every node in
the process); :class:`MemoryLeases` is one node's board on it and :class:`MemoryLease` a lease
that node holds, with the contract of ``kernel.types``: one winner per claim, fencing by token,
leases that run out unless renewed, wake-ups on every change. :class:`LeasingStorePlugin`
gives a node a ``MemoryStore`` that is also a ``LeasingStore`` on a table, so the S3 cache runs
on it exactly as it does on ``pg_store``'s leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from kernel import hookimpl
from kernel.config import FleetSettings, Settings
from kernel.errors import LeaseLost
from kernel.types import DownloadStore, LeaseBoard, LeaseState
from tests.helpers.fakes import MemoryStore

__all__ = ["LeaseTable", "LeasingMemoryStore", "LeasingStorePlugin", "MemoryLease", "MemoryLeases"]


@dataclass
class _Row:
    holder: str | None = None
    token: int = 0
    until: float = 0.0  # time.monotonic(): the table's clock, the only one
    size: int | None = None
    done: int = 0
    state: str = "fetching"
    info: dict[str, Any] = field(default_factory=dict)


class LeaseTable:
    """The fleet's shared lease rows, who wants each file, and the boards to wake."""

    def __init__(self) -> None:
        self.rows: dict[str, _Row] = {}
        self.wants: set[tuple[str, str, str]] = set()  # (file key, node id, model id)
        self.boards: list[MemoryLeases] = []
        self.claims = 0

    def changed(self, key: str) -> None:
        for board in self.boards:
            board.wake(key)


class MemoryLeases:
    """One node's ``LeaseBoard`` on a LeaseTable."""

    def __init__(self, table: LeaseTable, node_id: str, fleet: FleetSettings) -> None:
        self.table = table
        self.node_id = node_id
        self.lease_s = fleet.lease_s
        self.heartbeat_s = fleet.heartbeat_s
        self.poll_s = fleet.poll_s
        self.started = self.closed = False
        self._waiters: dict[str, set[asyncio.Event]] = {}

    async def start(self) -> None:
        self.started = True
        self.table.boards.append(self)

    async def close(self) -> None:
        self.closed = True
        if self in self.table.boards:
            self.table.boards.remove(self)

    def wake(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    async def read(self, key: str) -> LeaseState | None:
        row = self.table.rows.get(key)
        if row is None:
            return None
        left = row.until - time.monotonic()
        return LeaseState(
            file_key=key,
            holder=row.holder,
            token=row.token,
            live=left > 0,
            size=row.size,
            done=row.done,
            state=row.state,
            info=dict(row.info),
            seconds_left=max(left, 0.0),
        )

    async def wait_change(self, key: str, wait_s: float | None = None) -> bool:
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            async with asyncio.timeout(self.poll_s if wait_s is None else wait_s):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters[key].discard(event)

    async def claim(
        self, key: str, *, size: int | None = None, info: dict[str, Any] | None = None
    ) -> MemoryLease | None:
        row = self.table.rows.setdefault(key, _Row())
        now = time.monotonic()
        if row.state == "complete":
            return None
        if row.holder not in (None, self.node_id) and row.until > now:
            return None
        row.holder, row.token, row.until = self.node_id, row.token + 1, now + self.lease_s
        row.size = row.size if row.size is not None else size
        row.state = "fetching"
        row.info.update(info or {})
        self.table.claims += 1
        self.table.changed(key)
        return MemoryLease(self, key, row.token, done=row.done, info=dict(row.info))

    async def reset(self, key: str, *, state: str = "fetching") -> None:
        row = self.table.rows.get(key)
        if row is None or (row.state == "complete" and state != "fetching"):
            return
        row.state, row.holder, row.until, row.done = state, None, time.monotonic(), 0
        row.info.pop("upload_id", None)
        self.table.changed(key)

    async def want(self, key: str, model_id: str) -> None:
        self.table.wants.add((key, self.node_id, model_id))

    async def unwant(self, key: str, model_id: str) -> int:
        self.table.wants.discard((key, self.node_id, model_id))
        return sum(1 for want in self.table.wants if want[0] == key)


class MemoryLease:
    """A lease a MemoryLeases board holds; every write is fenced by ``token``."""

    def __init__(
        self, board: MemoryLeases, key: str, token: int, *, done: int, info: dict[str, Any]
    ) -> None:
        self.board = board
        self.key = key
        self.token = token
        self.done = done
        self.info = info
        self.lost = False
        self._renewed_at = time.monotonic()
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def valid(self) -> bool:
        return not self.lost and time.monotonic() - self._renewed_at < self.board.lease_s

    def check(self) -> None:
        if not self.valid:
            self.lost = True
            raise LeaseLost(f"The lease of {self.key} was lost.")

    def _row(self) -> _Row:
        row = self.board.table.rows[self.key]
        if self.lost or row.token != self.token or row.holder != self.board.node_id:
            self.lost = True
            raise LeaseLost(f"The lease of {self.key} was taken over by another node.")
        return row

    async def write(
        self,
        *,
        done: int | None = None,
        size: int | None = None,
        info: dict[str, Any] | None = None,
        state: str | None = None,
        renew: bool = True,
    ) -> None:
        row = self._row()
        if renew:
            self._renewed_at = time.monotonic()
            row.until = self._renewed_at + self.board.lease_s
        row.done = row.done if done is None else done
        row.size = row.size if size is None else size
        row.state = row.state if state is None else state
        row.info.update(info or {})
        self.info.update(info or {})
        self.board.table.changed(self.key)

    async def complete(self, *, size: int, info: dict[str, Any] | None = None) -> None:
        await self.write(done=size, size=size, info=info, state="complete", renew=False)
        await self.stop_heartbeat()

    async def release(self, *, state: str | None = None) -> None:
        await self.stop_heartbeat()
        with contextlib.suppress(LeaseLost):
            row = self._row()
            row.holder, row.until = None, time.monotonic()
            row.state = row.state if state is None else state
            self.board.table.changed(self.key)

    def start_heartbeat(self) -> None:
        async def beat() -> None:
            while True:
                await asyncio.sleep(self.board.heartbeat_s)  # a period, not a synchronisation
                try:
                    await self.write()
                except LeaseLost:
                    return

        self._heartbeat = asyncio.create_task(beat(), name=f"memory-lease:{self.key}")

    async def stop_heartbeat(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LeasingMemoryStore(MemoryStore):
    """A MemoryStore that is also a ``LeasingStore``: its boards are on ``table``."""

    def __init__(self, table: LeaseTable, node_id: str) -> None:
        super().__init__()
        self.table = table
        self.node_id = node_id
        self.boards: list[MemoryLeases] = []

    def leases(self, fleet: FleetSettings) -> LeaseBoard:
        board = MemoryLeases(self.table, self.node_id, fleet)
        self.boards.append(board)
        return board


class LeasingStorePlugin:
    """Provides one LeasingMemoryStore, replacing the builtin (``trylast``) sqlite_store."""

    def __init__(self, table: LeaseTable, node_id: str) -> None:
        self.store = LeasingMemoryStore(table, node_id)

    @hookimpl
    def open_store(self, settings: Settings) -> DownloadStore | None:
        return self.store

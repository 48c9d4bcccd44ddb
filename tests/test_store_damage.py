"""A damaged state database is refused with one clear message, never taken for an empty
state; one unreadable record is quarantined and the rest load (issue 13 item 6)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kernel.errors import StoreError
from kernel.types import DownloadRecord
from plugins.sqlite_store import SqliteStore
from tests.helpers.server import ServerProcess


def record(i: int) -> DownloadRecord:
    return DownloadRecord(model_id=f"m{i}", url=f"http://127.0.0.1:9/m{i}.bin",
                          local_path=f"/models/m{i}/m{i}.bin", status="paused", seq=i)  # fmt: skip


def crashed_copy(tmp_path: Path, saves: int = 6) -> Path:
    """A database as a crash leaves it: records committed one per transaction, all still in
    the write-ahead log (copied while the store was open, before any checkpoint)."""

    async def fill() -> None:
        store = SqliteStore(tmp_path / "live" / "modelkernel.db")
        for i in range(saves):
            await store.save(record(i))
        for name in ("modelkernel.db", "modelkernel.db-wal"):
            shutil.copy(tmp_path / "live" / name, tmp_path / "state" / name)
        await store.close()

    (tmp_path / "state").mkdir()
    asyncio.run(fill())
    return tmp_path / "state" / "modelkernel.db"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def serve(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernel.cli", "serve", "--port", "1",
         "--models-dir", str(tmp_path / "models"), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def valid_db(db: Path) -> None:
    asyncio.run(_save_and_close(db, 20))


async def _save_and_close(db: Path, n: int) -> None:
    store = SqliteStore(db)
    for i in range(n):
        await store.save(record(i))
    await store.close()


def truncate_half(db: Path) -> None:
    valid_db(db)
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def damage_a_page(db: Path) -> None:
    valid_db(db)
    size = db.stat().st_size
    data = bytearray(db.read_bytes())
    data[size - 3000 : size - 2000] = b"\xa5" * 1000  # inside the last b-tree page
    db.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "empty file": (lambda db: db.write_bytes(b""), "empty (0 bytes)"),
    "not a database": (lambda db: db.write_bytes(b"this is not a database" * 100), "unusable"),
    "truncated": (truncate_half, "unusable"),
    "damaged page": (damage_a_page, "unusable"),
    "a directory": (lambda db: db.mkdir(), "unusable"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_database_is_refused_with_one_clear_message(tmp_path: Path, kind: str) -> None:
    damage, words = DAMAGE[kind]
    (tmp_path / "state").mkdir()
    damage(tmp_path / "state" / "modelkernel.db")
    result = serve(tmp_path)
    assert result.returncode == 1, result.stderr
    assert words in result.stderr and "Move it aside" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_healthy_write_ahead_log_from_a_crash_is_replayed_in_full(tmp_path: Path) -> None:
    db = crashed_copy(tmp_path)
    assert (tmp_path / "state" / "modelkernel.db-wal").stat().st_size > 32

    async def load() -> list[DownloadRecord]:
        store = SqliteStore(db)
        try:
            return await store.load_all()
        finally:
            await store.close()

    assert sorted(r.model_id for r in asyncio.run(load())) == [f"m{i}" for i in range(6)]


@pytest.mark.parametrize("where", ["header", "first frame"])
def test_a_damaged_write_ahead_log_is_refused_not_cut_short(tmp_path: Path, where: str) -> None:
    db = crashed_copy(tmp_path)
    wal = Path(f"{db}-wal")
    flip(wal, 20 if where == "header" else 32 + 24 + 100)  # a salt; a byte of page data

    async def load() -> None:
        store = SqliteStore(db)
        try:
            await store.load_all()
        finally:
            await store.close()

    with pytest.raises(StoreError, match="write-ahead log") as info:
        asyncio.run(load())
    assert "Move it aside" in info.value.message
    result = serve(tmp_path)
    assert result.returncode == 1 and "write-ahead log" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_crash_while_creating_the_database_leaves_nothing_half_made(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "modelkernel.db.new").write_bytes(b"")  # what a crash mid-creation leaves
    asyncio.run(_save_and_close(state / "modelkernel.db", 1))
    assert (state / "modelkernel.db").stat().st_size > 0
    assert not (state / "modelkernel.db.new").exists()


def test_one_unreadable_record_is_quarantined_and_the_others_load(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "modelkernel.db"
    valid_db(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE downloads SET record = ? WHERE model_id = 'm3'", (b'{"model_id": 3',))
        conn.execute("UPDATE downloads SET record = ? WHERE model_id = 'm4'",
                     (b'{"model_id": "m4", "url": "u", "local_path": "p", "status": "bogus"}',))  # fmt: skip
    conn.close()
    with ServerProcess(tmp_path) as server:
        listing = httpx.get(f"{server.url}/v1/downloads?status=all", timeout=10).json()
        ids = sorted(d["model_id"] for d in listing["active_downloads"])
        assert ids == sorted(f"m{i}" for i in range(20) if i not in (3, 4))
        ready = httpx.get(f"{server.url}/health/ready", timeout=10)
        assert ready.status_code == 200
        records = ready.json()["checks"]["records"]
        assert "2 unreadable record(s) quarantined" in records and "m3" in records and "m4" in records
    assert "store.record_quarantined" in server.output()
    with sqlite3.connect(db) as conn:
        kept = sorted(row[0] for row in conn.execute("SELECT model_id FROM quarantine"))
    conn.close()
    assert kept == ["m3", "m4"]  # set aside for inspection, not deleted

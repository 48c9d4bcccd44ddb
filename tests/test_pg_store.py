"""The store contract on both stores (embedded SQLite and shared PostgreSQL), then what only
the PostgreSQL store does: one database shared by nodes, versioned migrations, unreadable rows,
a database restart, and a kernel configured with ``store: {kind: postgres}``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernel.config import FleetSettings, Settings, StoreSettings, load_settings
from kernel.core import Kernel
from kernel.errors import KernelError, StoreError
from kernel.types import DownloadRecord
from tests.conftest import make_settings
from tests.helpers.origin import Origin
from tests.helpers.pg import PgCluster, find_pg_bin

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")

from plugins.pg_store import store_dsn  # noqa: E402
from plugins.pg_store.store import SCHEMA_VERSION, PgStore  # noqa: E402
from plugins.sqlite_store.store import SqliteStore  # noqa: E402


def rec(model_id: str, **fields: Any) -> DownloadRecord:
    return DownloadRecord(
        model_id=model_id,
        url="https://example.org/f.bin",
        local_path=f"/m/{model_id}/f.bin",
        **fields,
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        opened: Any = SqliteStore(tmp_path / "state" / "modelkernel.db")
    else:
        opened = PgStore(request.getfixturevalue("pg_dsn"), "node-a")
    try:
        yield opened
    finally:
        await opened.close()


def reopen(store: Any) -> Any:
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path)
    return PgStore(store.dsn, store.node_id)


# --- the contract, on both stores ------------------------------------------------------------


async def test_saved_records_come_back_after_reopening(store: Any) -> None:
    await store.save(rec("a", downloaded_bytes=5, status="downloading"))
    await store.save(rec("b", segments=[[0, 9, 3]]))
    await store.save(rec("a", downloaded_bytes=7, status="paused"))  # the latest wins
    await store.delete("b")
    await store.save(rec("c", expected_sha256="ab" * 32))
    again = reopen(store)
    try:
        loaded = {r.model_id: r for r in await again.load_all()}
    finally:
        await again.close()
    assert sorted(loaded) == ["a", "c"]
    assert (loaded["a"].downloaded_bytes, loaded["a"].status) == (7, "paused")
    assert loaded["c"] == rec("c", expected_sha256="ab" * 32)


async def test_saves_made_together_are_written_in_fewer_batches(store: Any) -> None:
    await store.save(rec("warm"))
    before = store.batches_written
    await asyncio.gather(*(store.save(rec(f"m{i}", downloaded_bytes=i)) for i in range(50)))
    assert store.batches_written - before < 50
    assert len(await store.load_all()) == 51


async def test_meta_values_round_trip(store: Any) -> None:
    assert await store.get_meta("settings.downloads") is None
    await store.put_meta("settings.downloads", b'{"max_concurrent":2}')
    await store.put_meta("settings.downloads", b'{"max_concurrent":3}')
    assert await store.get_meta("settings.downloads") == b'{"max_concurrent":3}'


# --- PostgreSQL only ------------------------------------------------------------------------------


async def test_nodes_sharing_a_database_each_see_their_own_records(pg_dsn: str) -> None:
    a, b = PgStore(pg_dsn, "node-a"), PgStore(pg_dsn, "node-b")
    try:
        await a.save(rec("same-id", downloaded_bytes=1))
        await b.save(rec("same-id", downloaded_bytes=2))
        await b.save(rec("only-b"))
        await a.put_meta("k", b"a")
        assert [r.downloaded_bytes for r in await a.load_all()] == [1]
        assert sorted(r.model_id for r in await b.load_all()) == ["only-b", "same-id"]
        assert await b.get_meta("k") is None
    finally:
        await a.close()
        await b.close()
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT node_id, record->>'downloaded_bytes' FROM mk_downloads"
            " WHERE model_id = 'same-id' ORDER BY node_id"
        ).fetchall()
        nodes = conn.execute("SELECT node_id, state FROM mk_nodes ORDER BY node_id").fetchall()
    assert rows == [("node-a", "1"), ("node-b", "2")]  # jsonb: queryable by an operator
    assert nodes == [("node-a", "stopped"), ("node-b", "stopped")]


async def test_migrations_are_recorded_and_a_newer_schema_is_refused(pg_dsn: str) -> None:
    stores = [PgStore(pg_dsn, f"n{i}") for i in range(3)]
    try:  # three nodes starting at once migrate the new database once
        await asyncio.gather(*(s.load_all() for s in stores))
    finally:
        for s in stores:
            await s.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM mk_schema_migrations")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        conn.execute("INSERT INTO mk_schema_migrations(version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    newer = PgStore(pg_dsn, "n0")
    with pytest.raises(StoreError, match="newer modelkernel"):
        await newer.load_all()
    await newer.close()


async def test_an_unreadable_row_is_quarantined_and_the_others_load(pg_dsn: str) -> None:
    store = PgStore(pg_dsn, "node-a")
    try:
        await store.save(rec("good"))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO mk_downloads(node_id, model_id, record)"
                " VALUES ('node-a', 'bad', '{\"model_id\": 5}')"
            )
        assert [r.model_id for r in await store.load_all()] == ["good"]
        assert len(store.quarantined) == 1
        assert store.quarantined[0].startswith("bad: ")
    finally:
        await store.close()
    with psycopg.connect(pg_dsn) as conn:
        kept = conn.execute("SELECT node_id, model_id, record FROM mk_quarantine").fetchall()
        left = conn.execute("SELECT model_id FROM mk_downloads ORDER BY model_id").fetchall()
    assert kept == [("node-a", "bad", '{"model_id": 5}')]  # set aside, not lost
    assert left == [("good",)]
    again = PgStore(pg_dsn, "node-a")  # the next start is clean
    try:
        assert [r.model_id for r in await again.load_all()] == ["good"]
        assert again.quarantined == []
    finally:
        await again.close()


async def test_a_save_during_a_database_restart_is_written_once_it_is_back() -> None:
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed")
    cluster = PgCluster()
    store = PgStore(cluster.dsn, "node-a")
    try:
        await store.save(rec("a", downloaded_bytes=1))
        await asyncio.to_thread(cluster.stop_server)
        with pytest.raises(StoreError):
            await store.save(rec("a", downloaded_bytes=2))
        await asyncio.to_thread(cluster.start)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # the kept batch is retried without another save
            with psycopg.connect(cluster.dsn) as conn:
                row = conn.execute(
                    "SELECT record->>'downloaded_bytes' FROM mk_downloads"
                ).fetchone()
            if row == ("2",) or loop.time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert row == ("2",)
        await store.save(rec("b"))  # the connection is back too
        assert sorted(r.model_id for r in await store.load_all()) == ["a", "b"]
    finally:
        await store.close()
        await asyncio.to_thread(cluster.stop)


# --- configuration and a whole kernel ----------------------------------------------------------


def test_the_postgres_store_is_configured_by_file_or_env(tmp_path: Path) -> None:
    assert store_dsn(Settings()) is None  # the default: SQLite, nothing new needed
    env = {"MODELKERNEL_STORE__KIND": "postgres", "MODELKERNEL_STORE_DSN": "postgresql://x/db"}
    monkey = pytest.MonkeyPatch()
    try:
        monkey.setenv("MODELKERNEL_STORE_DSN", "postgresql://x/db")
        settings = load_settings(environ=env)
        assert store_dsn(settings) == "postgresql://x/db"
        monkey.delenv("MODELKERNEL_STORE_DSN")
        with pytest.raises(KernelError, match="no DSN"):
            store_dsn(settings)
    finally:
        monkey.undo()
    config = tmp_path / "c.yaml"
    config.write_text("store: {kind: postgres, dsn: 'postgresql://h/d'}\nfleet: {node_id: gpu-7}\n")
    settings = load_settings(config, environ={})
    assert (store_dsn(settings), settings.fleet.node_id) == ("postgresql://h/d", "gpu-7")


async def test_a_kernel_on_postgres_keeps_downloads_across_restarts(
    tmp_path: Path, pg_dsn: str, origin: Origin
) -> None:
    url = origin.add_file("pg-f.bin", b"x" * 300_000)
    settings = make_settings(tmp_path)
    settings.store = StoreSettings(kind="postgres", dsn=pg_dsn)
    settings.fleet = FleetSettings(node_id="gpu-1", heartbeat_s=0.05)
    kernel = Kernel(settings, load_entrypoints=False)
    await kernel.start()
    try:
        assert isinstance(kernel.store, PgStore)
        await kernel.downloads.create(model_id="m", url=url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while kernel.downloads.get("m").status != "completed" and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert kernel.downloads.get("m").status == "completed"
        with psycopg.connect(pg_dsn) as conn:
            first = conn.execute("SELECT heartbeat_at FROM mk_nodes").fetchone()
        while loop.time() < deadline:  # the node's heartbeat moves while it runs
            with psycopg.connect(pg_dsn) as conn:
                beat = conn.execute("SELECT heartbeat_at, state FROM mk_nodes").fetchone()
            if beat is not None and first is not None and beat[0] > first[0]:
                break
            await asyncio.sleep(0.05)
        assert beat is not None
        assert first is not None
        assert (beat[0] > first[0], beat[1]) == (True, "up")
    finally:
        await kernel.stop()
    again = Kernel(settings, load_entrypoints=False)
    await again.start()
    try:
        assert again.downloads.get("m").status == "completed"
        assert again.downloads.get("m").downloaded_bytes == 300_000
    finally:
        await again.stop()


async def test_the_s3_cache_without_the_shared_store_stops_the_start(tmp_path: Path) -> None:
    from kernel.config import CacheSettings, S3CacheSettings

    settings = make_settings(tmp_path)
    settings.cache = CacheSettings(s3=S3CacheSettings(endpoint="http://127.0.0.1:9", bucket="b"))
    kernel = Kernel(settings, load_entrypoints=False)
    with pytest.raises(KernelError, match=r"cache.s3 needs a store that keeps the fleet's leases"):
        await kernel.start()
    assert not kernel.started

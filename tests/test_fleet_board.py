"""The S3 cache depends on the declared lease contract only (``LeasingStore``, ``LeaseBoard``
and ``Lease`` in kernel.types), not on pg_store: on another store's board (in memory here, no
PostgreSQL at all) two nodes share one origin fetch through a real SeaweedFS bucket. And each
kernel keeps one Fleet across settings changes (the kernel replaces its Settings whole)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import plugins.s3_cache
from kernel.config import CacheSettings, ConfigError, FleetSettings, S3CacheSettings, Settings
from kernel.core import Kernel
from plugins.s3_cache.client import S3Client
from plugins.s3_cache.fleet import file_key
from tests.conftest import make_settings
from tests.helpers.fleet import until
from tests.helpers.leases import LeaseTable, LeasingStorePlugin
from tests.helpers.origin import Origin
from tests.helpers.s3 import ACCESS_KEY, SECRET_KEY, Seaweed

MiB = 1 << 20


@pytest.fixture
def bucket_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def node(
    tmp_path: Path, table: LeaseTable, node_id: str, endpoint: str, bucket: str
) -> tuple[Kernel, LeasingStorePlugin]:
    settings: Settings = make_settings(tmp_path / node_id)  # store.kind stays sqlite
    settings.fleet = FleetSettings(lease_s=30, heartbeat_s=0.5, poll_s=0.2)
    settings.cache = CacheSettings(
        s3=S3CacheSettings(endpoint=endpoint, bucket=bucket, part_size=5 * MiB)
    )
    plugin = LeasingStorePlugin(table, node_id)
    return Kernel(settings, load_entrypoints=False, extra_plugins=[plugin]), plugin



def test_the_file_key_prefers_the_digest() -> None:
    assert file_key("https://a/x", "e1", "AB" * 32) == "sha256:" + "ab" * 32
    assert file_key("https://b/y", None, "ab" * 32) == file_key("https://a/x", "e", "ab" * 32)
    assert file_key("https://a/x", '"e1"', None) != file_key("https://a/x", '"e2"', None)


@pytest.mark.usefixtures("bucket_keys")
async def test_two_nodes_share_one_fetch_on_another_stores_lease_board(
    tmp_path: Path, seaweed: Seaweed, s3_bucket: S3Client, origin: Origin
) -> None:
    data = os.urandom(12 * MiB)
    url = origin.add_file("board-shared.bin", data)
    origin.faults.throttle_bps = 8 * MiB  # the second node arrives while the first fetches
    table = LeaseTable()
    a, store_a = node(tmp_path, table, "a", seaweed.endpoint, s3_bucket.bucket)
    b, store_b = node(tmp_path, table, "b", seaweed.endpoint, s3_bucket.bucket)
    await a.start()
    await b.start()
    try:
        await a.downloads.create(model_id="m", url=url)
        await until(lambda: any(row.holder == "a" for row in table.rows.values()))
        await b.downloads.create(model_id="m", url=url)
        await until(
            lambda: all(k.downloads.get("m").status in ("completed", "failed") for k in (a, b))
        )
        for kernel in (a, b):
            rec = kernel.downloads.get("m")
            assert rec.status == "completed", rec.error_message
            got = hashlib.sha256(Path(rec.local_path).read_bytes()).hexdigest()
            assert got == hashlib.sha256(data).hexdigest()
    finally:
        origin.faults.throttle_bps = None
        await a.stop()
        await b.stop()
    assert origin.body_bytes["board-shared.bin"] == len(data)  # once, for both nodes
    ((key, row),) = table.rows.items()
    assert (row.state, row.holder, row.token) == ("complete", "a", 1)
    assert table.claims == 1
    assert await s3_bucket.get_bytes(str(row.info["object"])) == data
    for store in (store_a, store_b):  # each node's board came from its own store
        (board,) = store.store.boards
        assert board.started
        assert board.closed  # the kernel's stop closed it
    assert key.startswith("url:")


@pytest.mark.usefixtures("bucket_keys")
async def test_one_fleet_per_kernel_across_settings_changes(tmp_path: Path) -> None:
    """PATCH /v1/settings replaces the kernel's Settings object; the resolve_source wrapper,
    which sees only settings, still finds the same Fleet, and the stop closes that one."""
    kernel, plugin = node(tmp_path, LeaseTable(), "n", "http://127.0.0.1:9", "b")
    await kernel.start()
    try:
        before = kernel.settings
        fleet = plugins.s3_cache.fleet_of(before)
        assert fleet is not None
        assert fleet.leases is plugin.store.boards[0]
        await kernel.update_download_settings({"max_concurrent": 2})
        assert kernel.settings is not before
        assert plugins.s3_cache.fleet_of(kernel.settings) is fleet
        assert len(plugin.store.boards) == 1
    finally:
        await kernel.stop()
    assert plugins.s3_cache.fleet_of(kernel.settings) is None
    assert fleet.s3._http.is_closed


async def test_the_cache_without_a_leasing_store_stops_the_start(tmp_path: Path) -> None:
    from tests.helpers.fakes import MemoryStorePlugin

    settings = make_settings(tmp_path)
    settings.cache = CacheSettings(s3=S3CacheSettings(endpoint="http://127.0.0.1:9", bucket="b"))
    plugin = MemoryStorePlugin()  # a store, but not one that keeps leases
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[plugin])
    with pytest.raises(ConfigError, match=r"cache.s3 needs a store that keeps the fleet's leases"):
        await kernel.start()
    assert not kernel.started
    assert plugin.store.closed

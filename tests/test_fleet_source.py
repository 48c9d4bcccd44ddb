"""Pause, resume and cancel stay per node while the fetch is shared: two kernels in this
process on a real PostgreSQL and SeaweedFS. A paused holder hands the fetch over at once; the
upload survives while any node still wants the file; the last cancel aborts it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from kernel.config import (
    CacheSettings,
    FleetSettings,
    S3CacheSettings,
    Settings,
    StoreSettings,
)
from kernel.core import Kernel
from plugins.s3_cache.client import S3Client, S3Error
from tests.conftest import make_settings
from tests.helpers.fleet import until
from tests.helpers.origin import Origin
from tests.helpers.s3 import ACCESS_KEY, SECRET_KEY, Seaweed

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")

MiB = 1 << 20


def node(tmp_path: Path, dsn: str, seaweed: Seaweed, bucket: str, node_id: str) -> Kernel:
    settings: Settings = make_settings(tmp_path / node_id)
    settings.store = StoreSettings(kind="postgres", dsn=dsn)
    settings.fleet = FleetSettings(node_id=node_id, lease_s=30, heartbeat_s=0.5, poll_s=0.2)
    settings.cache = CacheSettings(
        s3=S3CacheSettings(endpoint=seaweed.endpoint, bucket=bucket, part_size=5 * MiB)
    )
    return Kernel(settings, load_entrypoints=False)


def lease(dsn: str) -> tuple[object, ...] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT holder, state, info->>'upload_id', info->>'object' FROM mk_leases"
        ).fetchone()



async def test_pause_hands_over_and_the_last_cancel_aborts_the_upload(
    tmp_path: Path,
    pg_dsn: str,
    seaweed: Seaweed,
    s3_bucket: S3Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    url = origin.add_file("fleet-cancel.bin", os.urandom(24 * MiB))
    origin.faults.throttle_bps = 4 * MiB
    a = node(tmp_path, pg_dsn, seaweed, s3_bucket.bucket, "a")
    b = node(tmp_path, pg_dsn, seaweed, s3_bucket.bucket, "b")
    await a.start()
    await b.start()
    try:
        await a.downloads.create(model_id="m", url=url)
        await until(lambda: (lease(pg_dsn) or (None,))[0] == "a")
        await b.downloads.create(model_id="m", url=url)
        await until(lambda: origin.body_bytes.get("fleet-cancel.bin", 0) > 6 * MiB)
        loop = asyncio.get_running_loop()
        paused_at = loop.time()
        await a.downloads.pause("m")
        await until(lambda: (lease(pg_dsn) or (None,))[0] == "b", 10)  # not the 30 s lease
        handover = loop.time() - paused_at
        assert handover < 10
        row = lease(pg_dsn)
        assert row is not None
        upload_id, obj = str(row[2]), str(row[3])
        await until(lambda: origin.body_bytes.get("fleet-cancel.bin", 0) > 11 * MiB)
        await b.downloads.cancel("m")  # a (paused) still wants it: the upload stays
        await b.downloads.flush()
        await asyncio.sleep(0)  # let the cancel's observer run
        await until(lambda: (lease(pg_dsn) or (None,))[0] is None)
        parts = await s3_bucket.list_parts(obj, upload_id)
        assert parts
        assert parts[0].size == 5 * MiB
        await a.downloads.cancel("m")  # the last one: the shared fetch stops for good

        async def aborted() -> bool:
            try:
                await s3_bucket.list_parts(obj, upload_id)
            except S3Error as exc:
                return exc.status == 404
            return False

        deadline = loop.time() + 30
        while not await aborted():
            assert loop.time() < deadline, "the upload was not aborted"
            await asyncio.sleep(0.05)
        await until(lambda: (lease(pg_dsn) or (None, None))[1] == "aborted")
    finally:
        origin.faults.throttle_bps = None
        await a.stop()
        await b.stop()


async def test_a_file_in_the_cache_is_never_fetched_from_the_origin_again(
    tmp_path: Path,
    pg_dsn: str,
    seaweed: Seaweed,
    s3_bucket: S3Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    data = os.urandom(7 * MiB)
    url = origin.add_file("fleet-again.bin", data)
    first = node(tmp_path, pg_dsn, seaweed, s3_bucket.bucket, "first")
    await first.start()
    try:
        await first.downloads.create(model_id="m", url=url)
        await until(lambda: first.downloads.get("m").status == "completed")
    finally:
        await first.stop()
    sent = origin.body_bytes["fleet-again.bin"]
    assert sent == len(data)
    later = node(tmp_path, pg_dsn, seaweed, s3_bucket.bucket, "later")
    await later.start()
    try:
        await later.downloads.create(model_id="m2", url=url)
        await until(lambda: later.downloads.get("m2").status in ("completed", "failed"))
        rec = later.downloads.get("m2")
        assert rec.status == "completed", rec.error_message
    finally:
        await later.stop()
    assert origin.body_bytes["fleet-again.bin"] == sent  # read from the bucket only
    got = hashlib.sha256(Path(rec.local_path).read_bytes()).hexdigest()
    assert got == hashlib.sha256(data).hexdigest()


async def test_a_cached_object_deleted_by_hand_is_fetched_again(
    tmp_path: Path,
    pg_dsn: str,
    seaweed: Seaweed,
    s3_bucket: S3Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    data = os.urandom(6 * MiB)
    url = origin.add_file("fleet-deleted.bin", data)
    kernel = node(tmp_path, pg_dsn, seaweed, s3_bucket.bucket, "n")
    await kernel.start()
    try:
        await kernel.downloads.create(model_id="m1", url=url)
        await until(lambda: kernel.downloads.get("m1").status == "completed")
        row = lease(pg_dsn)
        assert row is not None
        await s3_bucket.delete(str(row[3]))  # a lifecycle rule, an operator...
        await kernel.downloads.create(model_id="m2", url=url)
        await until(lambda: kernel.downloads.get("m2").status in ("completed", "failed"))
        rec = kernel.downloads.get("m2")
        assert rec.status == "completed", rec.error_message
    finally:
        await kernel.stop()
    assert origin.body_bytes["fleet-deleted.bin"] == 2 * len(data)  # fetched again, once
    assert await s3_bucket.get_bytes(str(row[3])) == data  # and cached again
    assert Path(rec.local_path).read_bytes() == data


async def test_a_body_closed_before_it_is_read_gives_the_lease_back(
    pg_dsn: str,
    seaweed: Seaweed,
    s3_bucket: S3Client,
    origin: Origin,
    tmp_path: Path,
) -> None:
    """A pause right after the open: the holder's heartbeat must not keep the lease alive."""
    from kernel.httpclient import HttpSource
    from plugins.pg_store.store import PgStore
    from plugins.s3_cache.fleet import Fleet, FleetSource

    url = origin.add_file("fleet-unread.bin", os.urandom(2 * MiB))
    settings = node(tmp_path, pg_dsn, seaweed, s3_bucket.bucket, "n").settings
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    fleet = Fleet(settings, PgStore(pg_dsn, "n").leases(settings.fleet), env)
    source = FleetSource(HttpSource(url), fleet, "m")
    try:
        await source.probe()
        body = await source.open(0, None)
        assert (lease(pg_dsn) or (None,))[0] == "n"
        await body.aclose()
        assert (lease(pg_dsn) or ("?",))[0] is None  # released at once
        await asyncio.sleep(settings.fleet.heartbeat_s * 2)  # no heartbeat claims it back
        assert (lease(pg_dsn) or ("?",))[0] is None
    finally:
        await source.aclose()
        await fleet.close()


async def test_the_same_bytes_under_two_hub_references_are_fetched_once(
    tmp_path: Path,
    pg_dsn: str,
    seaweed: Seaweed,
    s3_bucket: S3Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub gives the sha256: the file key is the digest, whatever the reference."""
    from kernel.config import HubSettings, SourcesSettings
    from tests.helpers.hub import Hub, gguf_blob

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    data = gguf_blob(6 * MiB, 7)
    digest = hashlib.sha256(data).hexdigest()
    with Hub(cdn=origin) as hub:
        hub.add_repo("owner/one", {"model.gguf": data})
        hub.add_repo("other/two", {"copy.gguf": data})
        kernels = []
        for node_id in ("a", "b"):
            kernel = node(tmp_path, pg_dsn, seaweed, s3_bucket.bucket, node_id)
            kernel.settings.sources = SourcesSettings(huggingface=HubSettings(endpoint=hub.base_url))
            kernels.append(kernel)
        a, b = kernels
        await a.start()
        await b.start()
        try:
            await a.downloads.create(model_id="m", url="hf://owner/one/model.gguf")
            await until(lambda: a.downloads.get("m").status in ("completed", "failed"))
            await b.downloads.create(model_id="m", url="hf://other/two/copy.gguf")
            await until(lambda: b.downloads.get("m").status in ("completed", "failed"))
            for kernel in kernels:
                rec = kernel.downloads.get("m")
                assert rec.status == "completed", rec.error_message
                assert rec.sha256 == digest
        finally:
            await a.stop()
            await b.stop()
    assert origin.body_bytes[Hub.blob_name(data)] == len(data)  # the CDN sent it once
    assert await s3_bucket.get_bytes(f"modelkernel/sha256/{digest}") == data


async def test_an_unreachable_bucket_is_bypassed_not_fatal(
    tmp_path: Path, pg_dsn: str, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    data = os.urandom(3 * MiB)
    url = origin.add_file("fleet-nobucket.bin", data)
    settings = make_settings(tmp_path)
    settings.store = StoreSettings(kind="postgres", dsn=pg_dsn)
    settings.fleet = FleetSettings(node_id="n", heartbeat_s=0.5, poll_s=0.2)
    settings.cache = CacheSettings(
        s3=S3CacheSettings(endpoint="http://127.0.0.1:9", bucket="gone", part_size=5 * MiB)
    )
    kernel = Kernel(settings, load_entrypoints=False)
    await kernel.start()
    try:
        await kernel.downloads.create(model_id="m", url=url)
        await until(lambda: kernel.downloads.get("m").status in ("completed", "failed"))
        rec = kernel.downloads.get("m")
        assert rec.status == "completed", rec.error_message
    finally:
        await kernel.stop()
    assert Path(rec.local_path).read_bytes() == data
    assert origin.body_bytes["fleet-nobucket.bin"] == len(data)
    assert (lease(pg_dsn) or ("?",))[0] is None  # nobody holds the file's lease

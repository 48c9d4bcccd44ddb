"""A segmented download's sha256 is computed while its ranges arrive (kernel/prefix_hash.py):
the contiguous prefix is hashed from the ``.part`` as segments complete it, so the end has only
the rest to hash. Driven end to end against the loopback origin, whose per-connection throttle
makes the download split, and whose ``corrupt_at`` fault flips one byte of a range."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

import kernel.segments
from kernel.api.app import create_app
from kernel.core import Kernel
from kernel.prefix_hash import PrefixHash
from kernel.segments import contiguous, cut_segment
from kernel.types import DownloadRecord
from tests.conftest import make_settings
from tests.helpers.api import wait_for, wait_status
from tests.helpers.data import blob
from tests.helpers.origin import Origin

MiB = 1 << 20


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 256 KiB (not 4 MiB), so a few MiB at a few MiB/s can be split."""
    monkeypatch.setattr(kernel.segments, "MIN_PIECE", 256 << 10)


def segmented(tmp_path: Path) -> AsyncTestClient:  # type: ignore[type-arg]
    settings = make_settings(tmp_path, connections=4, segment_min_bytes=MiB)
    return AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False)))


def ranged_gets(origin: Origin, name: str) -> int:
    return sum(1 for r in origin.requests_for(name) if r.method == "GET" and "range" in r.headers)


async def start(client: Any, model_id: str, url: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    body = {"model_id": model_id, "url": url, "sha256": digest}
    response = await client.post("/v1/downloads", json=body)
    assert response.status_code == 202, response.text
    return digest


def hashed_logs(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "download.sha256"]


def hash_threads() -> list[threading.Thread]:
    """Hashing threads still running a moment later (a stopped one has returned its result
    to the loop and is only leaving: it gets a short deadline to exit)."""
    threads = [t for t in threading.enumerate() if t.name == "modelkernel-hash"]
    for thread in threads:
        thread.join(2)
    return [t for t in threads if t.is_alive()]


# -- the parts --------------------------------------------------------------------------------


def test_the_prefix_ends_at_the_first_incomplete_segment_and_survives_a_cut() -> None:
    rec = DownloadRecord(model_id="m", url="u", local_path="p", total_bytes=10 * MiB)
    rec.segments = [[0, 4 * MiB, 4 * MiB], [4 * MiB, 10 * MiB, MiB]]
    assert contiguous(rec.segments) == 5 * MiB
    # the running segment is cut: the rest is inserted after it, not yet started
    new = cut_segment(rec, rec.segments[1], lambda at: at, 5 * MiB, 2)
    assert new == [[rec.segments[1][1], 10 * MiB, 0]]
    assert contiguous(rec.segments) == 5 * MiB
    rec.segments[1][2] = rec.segments[1][1] - 4 * MiB  # the cut segment completes
    assert contiguous(rec.segments) == new[0][0]
    new[0][2] = 10 * MiB - new[0][0]
    assert contiguous(rec.segments) == 10 * MiB


async def test_the_digest_follows_the_prefix_and_a_stop_leaves_no_thread(tmp_path: Path) -> None:
    data = blob(10 * MiB + 5, 11)
    path = tmp_path / "f.part"
    path.write_bytes(data)
    prefix = PrefixHash(str(path))
    prefix.start()
    prefix.advance(6 * MiB + 1)
    async with asyncio.timeout(10):
        while prefix.hashed < 6 * MiB + 1:  # noqa: ASYNC110 - a counter moved by its thread
            await asyncio.sleep(0.005)
    assert prefix.hashed == 6 * MiB + 1  # never past what it was told is on disk
    await prefix.stop()
    assert not hash_threads()
    prefix.ended(len(data))
    assert prefix.hashed_before_end == 6 * MiB + 1
    assert await prefix.digest(len(data)) == hashlib.sha256(data).hexdigest()
    assert not hash_threads()


async def test_a_cancelled_digest_stops_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "f.part"
    path.write_bytes(blob(MiB, 12))
    prefix = PrefixHash(str(path))
    waiting = asyncio.create_task(prefix.digest(2 * MiB))  # never reached: the file is shorter
    prefix.start()
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not hash_threads()


# -- end to end -------------------------------------------------------------------------------


async def test_a_split_download_hashes_most_of_the_file_before_its_last_byte(
    tmp_path: Path, origin: Origin
) -> None:
    data = blob(6 * MiB + 123, 13)
    url = origin.add_file("ph.bin", data)
    origin.faults.throttle_bps = MiB  # per connection: the download splits into 4
    async with segmented(tmp_path) as client:
        with capture_logs() as logs:
            digest = await start(client, "ph", url, data)
            done = await wait_status(client, "ph", "completed", timeout=60)
    assert done["sha256"] == digest
    assert Path(done["local_path"]).read_bytes() == data
    assert ranged_gets(origin, "ph.bin") == 4  # split: the ranges landed out of order
    [hashed] = hashed_logs(logs)
    assert hashed["bytes"] == len(data)
    assert hashed["hashed_before_end"] > 0
    assert not hash_threads()


@pytest.mark.parametrize("where", ["early", "late"])
async def test_a_corrupted_byte_in_one_range_fails_the_checksum(
    tmp_path: Path, origin: Origin, where: str
) -> None:
    data = blob(6 * MiB, 14)
    url = origin.add_file("phbad.bin", data)
    origin.faults.throttle_bps = MiB
    # early: inside the prefix hashed while the download runs; late: in the last range
    origin.faults.corrupt_at = 1000 if where == "early" else len(data) - 1000
    async with segmented(tmp_path) as client:
        digest = await start(client, "phbad", url, data)
        failed = await wait_status(client, "phbad", "failed", timeout=60)
    assert ranged_gets(origin, "phbad.bin") == 4
    assert failed["error_message"] == (
        f"Checksum mismatch: the file's sha256 is not the expected {digest}; "
        "the partial file was removed."
    )
    assert "sha256" not in failed
    assert not list((tmp_path / "models").rglob("*.part"))
    assert not hash_threads()


async def test_pause_and_resume_in_the_middle_still_give_the_right_digest(
    tmp_path: Path, origin: Origin
) -> None:
    data = blob(6 * MiB, 15)
    url = origin.add_file("phpause.bin", data)
    origin.faults.throttle_bps = MiB
    async with segmented(tmp_path) as client:
        digest = await start(client, "phpause", url, data)
        await wait_for(client, "phpause", lambda _b: ranged_gets(origin, "phpause.bin") == 4, 30)
        await wait_for(client, "phpause", lambda b: b["progress"]["downloaded_bytes"] > 3 * MiB, 30)
        await client.post("/v1/downloads/phpause/pause")
        assert not hash_threads()  # the paused transfer left nothing reading its .part
        origin.faults.throttle_bps = 2 * MiB
        with capture_logs() as logs:
            await client.post("/v1/downloads/phpause/resume")
            done = await wait_status(client, "phpause", "completed", timeout=60)
    assert done["sha256"] == digest
    assert Path(done["local_path"]).read_bytes() == data
    [hashed] = hashed_logs(logs)  # the resumed run hashed what was on disk as the rest came
    assert hashed["hashed_before_end"] > 0


async def test_a_retried_range_keeps_the_digest_right(tmp_path: Path, origin: Origin) -> None:
    data = blob(6 * MiB, 16)
    url = origin.add_file("phdrop.bin", data)
    origin.faults.throttle_bps = MiB
    origin.faults.drop_after = 3 * MiB // 4  # one body is cut once: that range is fetched again
    async with segmented(tmp_path) as client:
        with capture_logs() as logs:
            digest = await start(client, "phdrop", url, data)
            done = await wait_status(client, "phdrop", "completed", timeout=60)
    assert any(e["event"] == "download.retry" for e in logs)
    assert done["sha256"] == digest
    assert Path(done["local_path"]).read_bytes() == data
    assert len(hashed_logs(logs)) == 1

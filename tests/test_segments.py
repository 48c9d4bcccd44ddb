"""Segmented downloads: several ranged connections into one .part, resumable per segment,
split adaptively: one connection first, more only when one is slow (a per-connection-limited
origin, simulated by the origin's per-response throttle)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

import kernel.segments
import kernel.transfer
from kernel.api.app import create_app
from kernel.core import Kernel
from kernel.segments import plan_segments
from tests.conftest import make_settings
from tests.helpers.api import wait_for, wait_status
from tests.helpers.data import blob
from tests.helpers.origin import Origin

MiB = 1 << 20


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 256 KiB (not 4 MiB), so a few MiB at a few MiB/s can be split."""
    monkeypatch.setattr(kernel.segments, "MIN_PIECE", 256 << 10)


def segmented(tmp_path: Path, connections: int = 4) -> AsyncTestClient:  # type: ignore[type-arg]
    settings = make_settings(tmp_path, connections=connections, segment_min_bytes=MiB)
    return AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False)))


def ranges(origin: Origin, name: str) -> list[str]:
    return sorted(r.headers.get("range", "") for r in origin.requests_for(name) if r.method == "GET")


def assert_split_into_pieces(spans: list[tuple[int, int]], size: int, connections: int) -> None:
    """``spans`` (first, last byte of each range asked for, sorted) are one connection over
    the whole file, cut, then pieces in file order covering the rest exactly: at least one
    per added connection, none under MIN_PIECE, shrinking towards the end (the last may be
    larger: it keeps the sliver a cut would have left)."""
    assert spans[0] == (0, size - 1)
    pieces = spans[1:]
    assert len(pieces) >= connections - 1
    assert pieces[-1][1] == size - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(pieces, pieces[1:], strict=False))
    sizes = [last + 1 - first for first, last in pieces]
    assert min(sizes) >= kernel.segments.MIN_PIECE
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)


def spans(found: list[str]) -> list[tuple[int, int]]:
    pairs = [r.removeprefix("bytes=").split("-") for r in found]
    return sorted((int(first), int(last)) for first, last in pairs)


async def start(client: Any, model_id: str, url: str) -> None:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url})
    assert response.status_code == 202, response.text


def test_plan_covers_the_file_exactly() -> None:
    assert plan_segments(10, 4) == [[0, 3, 0], [3, 6, 0], [6, 9, 0], [9, 10, 0]]
    assert plan_segments(8 * MiB, 4)[-1][1] == 8 * MiB


async def test_a_slow_connection_is_split_over_several_ranges(tmp_path: Path, origin: Origin) -> None:
    data = blob(6 * MiB + 123, 1)
    url = origin.add_file("seg.bin", data)
    origin.faults.throttle_bps = MiB  # per connection, like a CDN
    async with segmented(tmp_path) as client:
        await start(client, "seg", url)
        done = await wait_status(client, "seg", "completed", timeout=60)
    assert Path(done["local_path"]).read_bytes() == data
    found = ranges(origin, "seg.bin")
    # one connection over the whole file first; then, as that one was slow and idle, pieces
    # over `connections` (4)
    assert_split_into_pieces(spans(found), len(data), 4)
    assert all(r.headers.get("if-range") for r in origin.requests_for("seg.bin") if r.method == "GET")


async def test_a_fast_connection_is_never_split(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel.transfer, "SPLIT_BELOW_BPS", 1)  # whatever it does is fast
    data = blob(3 * MiB, 7)
    url = origin.add_file("fast.bin", data)
    origin.faults.throttle_bps = MiB
    async with segmented(tmp_path) as client:
        await start(client, "fast", url)
        done = await wait_status(client, "fast", "completed", timeout=60)
    assert Path(done["local_path"]).read_bytes() == data
    assert ranges(origin, "fast.bin") == [f"bytes=0-{len(data) - 1}"]


async def test_a_connection_that_looks_cpu_bound_is_never_split(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as if the socket were found full after every block and the thread always busy
    monkeypatch.setattr(kernel.transfer, "SPLIT_DRAINED", 2.0)
    monkeypatch.setattr(kernel.transfer, "SPLIT_BUSY", 0.0)
    data = blob(3 * MiB, 8)
    url = origin.add_file("busy.bin", data)
    origin.faults.throttle_bps = MiB
    async with segmented(tmp_path) as client:
        await start(client, "busy", url)
        done = await wait_status(client, "busy", "completed", timeout=60)
    assert Path(done["local_path"]).read_bytes() == data
    assert ranges(origin, "busy.bin") == [f"bytes=0-{len(data) - 1}"]


async def test_one_probe_that_looks_cpu_bound_does_not_decide_for_good(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a loaded machine can make one probe of a slow connection look CPU-bound; the next
    # probe, seeing it wait on the network, still splits it
    probes: list[int] = []

    async def probe(self: kernel.transfer.Transfer, seconds: float) -> tuple[float, float, float]:
        await asyncio.sleep(seconds)
        probes.append(1)
        return (1.0, 1.0, 0.0) if len(probes) == 1 else (1.0, 0.0, 1.0)

    monkeypatch.setattr(kernel.transfer.Transfer, "_probe", probe)
    data = blob(3 * MiB, 9)
    url = origin.add_file("noisy.bin", data)
    origin.faults.throttle_bps = MiB
    async with segmented(tmp_path) as client:
        await start(client, "noisy", url)
        done = await wait_status(client, "noisy", "completed", timeout=60)
    assert Path(done["local_path"]).read_bytes() == data
    assert len(probes) == 2
    assert_split_into_pieces(spans(ranges(origin, "noisy.bin")), len(data), 4)


async def test_small_files_stay_on_one_connection(tmp_path: Path, origin: Origin) -> None:
    url = origin.add_file("small.bin", blob(MiB - 1, 2))
    async with segmented(tmp_path) as client:
        await start(client, "small", url)
        await wait_status(client, "small", "completed")
    assert ranges(origin, "small.bin") == [""]


async def test_pause_and_resume_continue_every_segment(tmp_path: Path, origin: Origin) -> None:
    data = blob(6 * MiB, 3)
    url = origin.add_file("segpause.bin", data)
    origin.faults.throttle_bps = MiB
    async with segmented(tmp_path) as client:
        await start(client, "segpause", url)
        # split by now: one connection, then four
        await wait_for(client, "segpause", lambda _b: len(ranges(origin, "segpause.bin")) == 4, 30)
        await wait_for(client, "segpause", lambda b: b["progress"]["downloaded_bytes"] > 3 * MiB, 30)
        await client.post("/v1/downloads/segpause/pause")
        paused = (await client.get("/v1/downloads/segpause")).json()
        kept = {r.client for r in origin.requests}  # connections from before the pause
        origin.requests.clear()
        origin.faults.throttle_bps = None
        await client.post("/v1/downloads/segpause/resume")
        done = await wait_status(client, "segpause", "completed")
    assert Path(done["local_path"]).read_bytes() == data
    # A piece asked for on a kept-alive connection just as the pause came may reach the log
    # after it was cleared; the resume asks for that piece again: count it once.
    gets = [r for r in origin.requests_for("segpause.bin") if r.method == "GET"]
    asked = [r.headers.get("range", "") for r in gets]
    resumed = sorted(
        asked[i] for i, r in enumerate(gets) if not (r.client in kept and asked.count(asked[i]) > 1)
    )
    assert len(resumed) >= 2 and all(r.startswith("bytes=") for r in resumed)
    starts = sorted(int(r[6:].split("-")[0]) for r in resumed)
    assert starts[0] > 0  # no segment started over from its beginning
    moved = sum(int(r[6:].split("-")[1]) + 1 - int(r[6:].split("-")[0]) for r in resumed)
    assert moved == len(data) - paused["progress"]["downloaded_bytes"]


async def test_a_changed_file_restarts_all_segments_from_zero(tmp_path: Path, origin: Origin) -> None:
    old, new = blob(4 * MiB, 4), blob(4 * MiB, 5)
    url = origin.add_file("segchange.bin", old)
    origin.faults.throttle_bps = 2 * MiB
    async with segmented(tmp_path) as client:
        await start(client, "segchange", url)
        await wait_for(client, "segchange", lambda b: b["progress"]["downloaded_bytes"] > MiB)
        await client.post("/v1/downloads/segchange/pause")
        origin.replace_file("segchange.bin", new)
        origin.faults.throttle_bps = None
        await client.post("/v1/downloads/segchange/resume")
        done = await wait_status(client, "segchange", "completed")
    assert Path(done["local_path"]).read_bytes() == new


async def test_an_origin_ignoring_ranges_falls_back_to_one_stream(tmp_path: Path, origin: Origin) -> None:
    data = blob(3 * MiB, 6)
    url = origin.add_file("segnorange.bin", data)
    origin.faults.ignore_range = True
    async with segmented(tmp_path) as client:
        await start(client, "segnorange", url)
        done = await wait_status(client, "segnorange", "completed")
    assert Path(done["local_path"]).read_bytes() == data

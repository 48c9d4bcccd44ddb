"""hf_source as a RangedSource: a large hub file over several connections to the CDN.

The hub and its CDN are emulated over HTTPS on loopback (tests/helpers/hub.py; the CDN is
another host, ``localhost``), the CDN limiting each connection's rate the way real CDNs do
(the origin's per-response throttle). The split opens share one answer of the hub; a CDN
location that expires is asked for again through the hub.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

import kernel.segments
from kernel.api.app import create_app
from kernel.config import HubSettings, NetworkSettings, SourcesSettings
from kernel.core import Kernel
from kernel.errors import PermanentError
from plugins.hf_source import source as hub_source
from tests.conftest import make_settings
from tests.helpers.api import wait_for, wait_status
from tests.helpers.hub import Hub, gguf_blob
from tests.helpers.origin import RequestLog
from tests.helpers.tls import TestCA
from tests.test_segments import assert_split_into_pieces
from tests.test_hf_source import (  # noqa: F401 - the fixtures of the emulated hub over TLS
    AUTH,
    TOKEN,
    create,
    hf_environment,
    sha,
    test_ca,
    tls_cdn_server,
    tls_hub,
    tls_hub_server,
    tls_source,
)

MiB = 1 << 20
CONNECTIONS = 4


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 256 KiB (not 4 MiB), so a few MiB at a few MiB/s can be split."""
    monkeypatch.setattr(kernel.segments, "MIN_PIECE", 256 << 10)


@pytest.fixture
def hub(tls_hub: Hub) -> Hub:
    """An https hub knowing TOKEN, whose CDN is another host, https://localhost."""
    return tls_hub


@pytest.fixture
def client(tmp_path: Path, hub: Hub, test_ca: TestCA) -> AsyncTestClient:  # type: ignore[type-arg]
    settings = msgspec.structs.replace(
        make_settings(tmp_path, connections=CONNECTIONS, segment_min_bytes=MiB),
        sources=SourcesSettings(huggingface=HubSettings(endpoint=hub.base_url, token=TOKEN)),
        network=NetworkSettings(ca_bundle=str(test_ca.ca_file)),
    )
    return AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False)))


def cdn_gets(hub: Hub, data: bytes) -> list[RequestLog]:
    return [r for r in hub.cdn.requests_for(Hub.blob_name(data)) if r.method == "GET"]


def ranges(requests: list[RequestLog]) -> list[tuple[int, int]]:
    """The (first, last) byte of each Range asked for."""
    spans = [r.headers["range"].removeprefix("bytes=").split("-") for r in requests]
    return sorted((int(first), int(last)) for first, last in spans)


def hub_heads(hub: Hub) -> list[str]:
    return [r.path for r in hub.requests if r.method == "HEAD"]


async def test_a_hub_file_from_a_per_connection_limited_cdn_comes_over_several_ranges(
    client: Any, hub: Hub
) -> None:
    data = gguf_blob(6 * MiB + 123, 60)
    commit = hub.add_repo("owner/repo", {"model.gguf": data})
    hub.cdn.faults.throttle_bps = MiB  # per connection, like a CDN
    async with client:
        await create(client, "big", "hf://owner/repo/model.gguf")
        done = await wait_status(client, "big", "completed", "failed", timeout=60)
    assert done["status"] == "completed", done
    assert done["sha256"] == sha(data)
    assert Path(done["local_path"]).read_bytes() == data
    gets = cdn_gets(hub, data)
    # one connection over the whole file first; then, as it was slow, pieces over `connections`
    assert_split_into_pieces(ranges(gets), len(data), CONNECTIONS)
    assert all("authorization" not in r.headers for r in gets)  # the token stays on the hub
    cdn_etag = hub.cdn._files[Hub.blob_name(data)].etag
    assert [r.headers.get("if-range") for r in gets[1:]] == [cdn_etag] * (len(gets) - 1)
    # The split opens reused the location the first open got: two HEADs, not one per range.
    assert hub_heads(hub) == [
        "/owner/repo/resolve/main/model.gguf",  # probe: the revision -> commit
        f"/owner/repo/resolve/{commit}/model.gguf",  # the opens: pinned to the commit
    ]
    assert all(r.headers["authorization"] == AUTH for r in hub.requests)


async def test_pause_and_resume_continue_every_range_of_a_hub_file(client: Any, hub: Hub) -> None:
    data = gguf_blob(6 * MiB, 61)
    hub.add_repo("owner/repo", {"model.gguf": data})
    blob = Hub.blob_name(data)
    hub.cdn.faults.throttle_bps = MiB
    async with client:
        await create(client, "paused", "hf://owner/repo/model.gguf")
        await wait_for(client, "paused", lambda _b: len(cdn_gets(hub, data)) == CONNECTIONS, 30)
        await wait_for(client, "paused", lambda b: b["progress"]["downloaded_bytes"] > 3 * MiB, 30)
        assert (await client.post("/v1/downloads/paused/pause")).status_code == 200
        paused = (await client.get("/v1/downloads/paused")).json()
        hub.cdn.requests.clear()
        hub.requests.clear()
        hub.cdn.faults.throttle_bps = None
        await client.post("/v1/downloads/paused/resume")
        done = await wait_status(client, "paused", "completed", "failed", timeout=30)
    assert done["status"] == "completed", done
    assert Path(done["local_path"]).read_bytes() == data
    resumed = ranges(cdn_gets(hub, data))
    assert len(resumed) >= 2  # the unfinished ranges, each on its own connection
    assert resumed[0][0] > 0  # no range started over from its beginning
    confirmed = paused["progress"]["downloaded_bytes"]
    assert sum(last + 1 - first for first, last in resumed) == len(data) - confirmed
    # In all, the CDN sent the file and what was in flight at the pause, nothing more.
    assert len(data) <= hub.cdn.body_bytes[blob] <= len(data) + CONNECTIONS * (256 << 10)
    assert len(hub_heads(hub)) == 2  # a new run: its probe, and one HEAD for every range


async def test_an_expired_cdn_location_is_asked_for_again_through_the_hub(
    client: Any, hub: Hub
) -> None:
    data = gguf_blob(6 * MiB, 62)
    commit = hub.add_repo("owner/repo", {"model.gguf": data})
    hub.cdn.faults.throttle_bps = MiB
    async with client:
        await create(client, "expiring", "hf://owner/repo/model.gguf")
        await wait_for(client, "expiring", lambda _b: len(cdn_gets(hub, data)) == CONNECTIONS, 30)
        assert hub.expire_locations() == 2  # the probe's, and the one the ranges were opened with
        hub.cdn.faults.drop_after = 1  # one connection breaks: every range is opened again
        done = await wait_status(client, "expiring", "completed", "failed", timeout=60)
    assert done["status"] == "completed", done
    assert done["sha256"] == sha(data)
    assert Path(done["local_path"]).read_bytes() == data
    reopened = cdn_gets(hub, data)[CONNECTIONS:]
    assert len(hub.signed) == 3  # the probe's, the ranges' first location and its successor
    # The reopened ranges met the expired signature (403) first, then used the new one.
    assert {r.query for r in reopened} == set(hub.signed[1:])
    pinned = f"/owner/repo/resolve/{commit}/model.gguf"
    # One HEAD asked for the new location, for all of the refused ranges together.
    assert hub_heads(hub) == ["/owner/repo/resolve/main/model.gguf", pinned, pinned]


# --- the source itself ---------------------------------------------------------------------


async def read_range(source: Any, offset: int, end: int | None) -> bytes:
    body = await source.open(offset, None, end)
    try:
        return b"".join([chunk async for chunk in body.chunks()])
    finally:
        await body.aclose()


async def test_concurrent_range_opens_share_one_hub_answer(hub: Hub, test_ca: TestCA) -> None:
    data = gguf_blob(64 << 10, 63)
    hub.add_repo("owner/repo", {"model.gguf": data})
    source = tls_source(hub, test_ca)
    assert source.supports_segments
    cuts = [(0, 9_999), (10_000, 39_999), (40_000, len(data) - 1)]
    try:
        await source.probe()
        parts = await asyncio.gather(*(read_range(source, a, b) for a, b in cuts))
    finally:
        await source.aclose()
    assert b"".join(parts) == data
    assert ranges(cdn_gets(hub, data)) == cuts
    assert len(hub_heads(hub)) == 2  # the probe, and one HEAD for the three opens


async def test_a_stale_location_is_asked_for_again_and_a_refusal_of_a_fresh_one_fails(
    hub: Hub, test_ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = gguf_blob(64 << 10, 64)
    hub.add_repo("owner/repo", {"model.gguf": data})
    source = tls_source(hub, test_ca)
    try:
        await source.probe()
        assert await read_range(source, 0, 99) == data[:100]
        monkeypatch.setattr(hub_source, "LOCATION_REUSE_S", 0.0)  # every answer is stale now
        assert await read_range(source, 100, 199) == data[100:200]
        assert len(hub_heads(hub)) == 3
        monkeypatch.setattr(hub_source, "LOCATION_REUSE_S", 60.0)
        hub.cdn.faults.fail_statuses = [403, 403]  # the reused location, then the new one
        with pytest.raises(PermanentError) as excinfo:
            await read_range(source, 200, 299)
    finally:
        await source.aclose()
    assert len(hub_heads(hub)) == 4  # asked again once, not in a loop
    assert "X-Amz-Signature" not in excinfo.value.message


async def test_a_small_file_from_the_hub_answers_a_range(hub: Hub, test_ca: TestCA) -> None:
    config = b'{"architectures": ["X"]}\n' * 40
    commit = hub.add_repo("owner/repo", {"config.json": config})
    source = tls_source(hub, test_ca, "hf://owner/repo/config.json")
    try:
        probe = await source.probe()
        assert await read_range(source, 10, 109) == config[10:110]
        assert await read_range(source, 0, 9) == config[:10]
    finally:
        await source.aclose()
    gets = [r for r in hub.requests if r.method == "GET"]
    assert [r.path for r in gets] == [f"/owner/repo/resolve/{commit}/config.json"] * 2
    assert [r.headers["range"] for r in gets] == ["bytes=10-109", "bytes=0-9"]
    assert all(r.headers["if-range"] == probe.validator for r in gets)  # the git blob id
    assert all(r.headers["authorization"] == AUTH for r in gets)

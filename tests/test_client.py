"""kernel.client against the real app, served by uvicorn in the test's loop.

The async client runs in the loop; the sync client runs in a worker thread (``to_thread``), so
the loop keeps serving while it blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kernel.api.app import create_app
from kernel.api.schemas import (
    ActionResult,
    BulkCancelResult,
    CancelResult,
    Download,
    DownloadList,
    Health,
    PurgeResult,
)
from kernel.client import ApiConnectionError, ApiError, AsyncClient, Client, StreamEvent
from kernel.config import AuthSettings, Settings
from kernel.core import Kernel
from tests.conftest import make_settings
from tests.helpers.origin import Origin
from tests.helpers.server import AppServer, free_port


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[AppServer]:
    kernel = Kernel(settings, load_entrypoints=False)
    async with AppServer(create_app(kernel)) as running:
        yield running


def slow_file(origin: Origin, name: str, size: int = 400_000, bps: int = 200_000) -> str:
    origin.faults.throttle_bps = bps
    return origin.add_file(name, name.encode()[:1] * size)


async def test_async_client_drives_every_downloads_endpoint(
    server: AppServer, origin: Origin
) -> None:
    async with AsyncClient(server.url) as mk:
        assert isinstance(await mk.health(), Health)
        created = await mk.create(
            "tour", slow_file(origin, "tour.bin"), priority=3, model_type="embedding", sha256=None
        )
        assert isinstance(created, Download)
        assert created.type == "embedding"
        assert created.priority == 3
        assert isinstance(await mk.get("tour"), Download)
        listing = await mk.list()
        assert isinstance(listing, DownloadList)
        assert [d.model_id for d in listing.active_downloads] == ["tour"]
        assert listing.summary.embedding_model_downloads == 1
        assert (await mk.set_priority("tour", 9)).priority == 9
        assert (await mk.set_limit("tour", 100_000)).max_bytes_per_second == 100_000
        paused = await mk.pause("tour")
        assert paused == ActionResult(
            success=True, message="Download paused successfully", model_id="tour"
        )
        assert (await mk.get("tour")).status == "paused"
        assert (await mk.resume("tour")).message == "Download resumed successfully"
        cancelled = await mk.cancel("tour")
        assert isinstance(cancelled, CancelResult)
        assert cancelled.model_id == "tour"
        assert (await mk.list()).active_downloads == []
        assert [d.status for d in (await mk.list(all=True)).active_downloads] == ["cancelled"]
        assert [d.model_id for d in (await mk.list(status="cancelled")).active_downloads] == [
            "tour"
        ]
        purged = await mk.purge("tour")
        assert isinstance(purged, PurgeResult)
        assert purged.previous_status == "cancelled"
        await mk.create("bulk", slow_file(origin, "bulk.bin"))
        bulk = await mk.cancel_all()
        assert isinstance(bulk, BulkCancelResult)
        assert [c.model_id for c in bulk.cancelled_downloads] == ["bulk"]


async def test_watch_yields_typed_events_and_wait_returns_the_final_download(
    server: AppServer, origin: Origin
) -> None:
    url = slow_file(origin, "watched.bin", size=300_000, bps=600_000)
    async with AsyncClient(server.url) as mk:
        seen: list[StreamEvent] = []

        async def watch() -> None:
            async for event in mk.watch(model_id="watched"):
                seen.append(event)
                if (
                    event.event == "download.status"
                    and event.download
                    and event.download.status == "completed"
                ):
                    return

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.2)  # subscribed
        await mk.create("watched", url)
        done = await mk.wait("watched", timeout=10)
        await asyncio.wait_for(watcher, 5)
    assert done.status == "completed"
    assert done.progress.percentage == 100.0
    assert Path(done.local_path).stat().st_size == 300_000
    assert seen[0].event == "download.created"
    assert isinstance(seen[0].data, Download)
    assert {e.event for e in seen} >= {"download.created", "download.status", "download.progress"}
    assert [int(e.id or 0) for e in seen] == sorted(int(e.id or 0) for e in seen)
    # Resuming from an id replays what came after it.
    async with AsyncClient(server.url) as mk:
        replay = mk.watch(last_event_id=seen[-2].id)
        assert (await anext(replay)).id == seen[-1].id
        await replay.aclose()


async def test_sync_client_drives_the_same_endpoints(server: AppServer, origin: Origin) -> None:
    url = slow_file(origin, "sync.bin", size=300_000, bps=600_000)

    def script() -> tuple[Download, list[str], BulkCancelResult]:
        with Client(server.url) as mk:
            assert mk.health().status == "ok"
            mk.create("sync", url)
            assert mk.pause("sync").success
            assert mk.get("sync").status == "paused"
            assert mk.resume("sync").success
            states = [d.status for d in mk.follow("sync", timeout=10)]
            done = mk.wait("sync", timeout=10)  # already ended: returns at once
            mk.create("other", slow_file(origin, "other.bin"))
            assert [d.model_id for d in mk.list().active_downloads] == ["other"]
            assert mk.set_priority("other", 2).priority == 2
            assert mk.set_limit("other", 0).max_bytes_per_second is msgspec.UNSET
            assert mk.cancel("other").previous_status in ("downloading", "queued")
            assert mk.purge("other").file_deleted is False
            # The replay from the start; a progress event may come before the pause's status
            # (how many bytes arrive before it depends on the machine), so only the first two.
            events = [e.event for e in _first(mk.watch(last_event_id=0), 3)]
            assert events[:2] == ["download.created", "download.status"]
            assert events[2] in ("download.status", "download.progress")
            return done, states, mk.cancel_all()

    done, states, bulk = await asyncio.to_thread(script)
    assert done.status == "completed"
    assert states[-1] == "completed"
    assert "downloading" in states
    assert bulk.summary.total_downloads == 0


def _first(events: Any, n: int) -> list[StreamEvent]:
    out = []
    for event in events:
        out.append(event)
        if len(out) == n:
            break
    events.close()
    return out


async def test_errors_are_one_exception_type_carrying_the_api_body(
    server: AppServer, origin: Origin
) -> None:
    async with AsyncClient(server.url) as mk:
        with pytest.raises(ApiError) as missing:
            await mk.get("ghost")
        assert missing.value.status == 404
        assert (missing.value.type, missing.value.code, missing.value.param) == (
            "not_found_error",
            "download_not_found",
            "model_id",
        )
        assert missing.value.message == "No download found for model ID: ghost"
        assert missing.value.body == {
            "error": {
                "message": "No download found for model ID: ghost",
                "type": "not_found_error",
                "param": "model_id",
                "code": "download_not_found",
            }
        }
        with pytest.raises(ApiError) as bad:
            await mk.create("bad id!", "http://example.com/x")
        assert (bad.value.status, bad.value.param) == (400, "model_id")
        await mk.create("twice", slow_file(origin, "twice.bin"))
        with pytest.raises(ApiError) as exists:
            await mk.create("twice", slow_file(origin, "twice.bin"))
        assert (exists.value.status, exists.value.code) == (409, "download_exists")
        with pytest.raises(ApiError) as ended:
            await mk.resume("twice")
        assert ended.value.status == 400
        assert "downloading" in ended.value.message
        with pytest.raises(TimeoutError):
            await mk.wait("twice", timeout=0.3)
        await mk.cancel("twice")

    def sync_errors() -> ApiError:
        with Client(server.url) as mk, pytest.raises(ApiError) as caught:
            mk.pause("ghost")
        return caught.value

    sync = await asyncio.to_thread(sync_errors)
    assert (sync.status, sync.type, sync.code) == (404, "not_found_error", None)

    nowhere = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(nowhere) as mk:
        with pytest.raises(ApiConnectionError) as refused:
            await mk.list()
    assert isinstance(refused.value, ApiError)
    assert refused.value.status == 0
    assert nowhere in refused.value.message


async def test_wait_polls_when_the_server_has_no_event_stream(
    settings: Settings, origin: Origin
) -> None:
    app = create_app(Kernel(settings, load_entrypoints=False))

    async def without_events(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/events"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not here"})
            return
        await app(scope, receive, send)

    url = slow_file(origin, "polled.bin", size=100_000, bps=500_000)
    async with AppServer(without_events) as old, AsyncClient(old.url) as mk:
        await mk.create("polled", url)
        done = await mk.wait("polled", timeout=10)

        def follow() -> list[str]:
            with Client(old.url) as sync:
                return [d.status for d in sync.follow("polled")]

        states = await asyncio.to_thread(follow)
    assert done.status == "completed"
    assert states == ["completed"]


async def test_the_api_key_goes_in_every_request_and_the_stream(
    tmp_path: Path, origin: Origin
) -> None:
    settings = make_settings(tmp_path)
    settings.auth = AuthSettings(require_api_key=True, api_keys=["s3cret"])
    async with AppServer(create_app(Kernel(settings, load_entrypoints=False))) as secured:
        async with AsyncClient(secured.url) as anonymous:
            with pytest.raises(ApiError) as denied:
                await anonymous.list()
            assert (denied.value.status, denied.value.code) == (401, "invalid_api_key")
            with pytest.raises(ApiError):
                await anext(anonymous.watch())
        async with AsyncClient(secured.url, api_key="s3cret") as mk:
            await mk.create("keyed", origin.add_file("keyed.bin", b"k" * 1000))
            assert (await mk.wait("keyed", timeout=10)).status == "completed"
            async with contextlib.aclosing(mk.watch(last_event_id=0)) as events:
                assert (await anext(events)).event == "download.created"

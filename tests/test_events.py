"""GET /v1/events: Server-Sent Events over a real kernel, served by uvicorn in the test's loop.

The Litestar test client buffers whole responses, so it cannot read an endless stream: these
tests run the app under uvicorn on a loopback port (``AppServer``) and read it with httpx.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from kernel.api.app import create_app
from kernel.api.events import EventStreams
from kernel.config import Settings
from kernel.core import Kernel
from kernel.events import EventBus
from kernel.types import DownloadProgress, DownloadRecord, DownloadRetry
from tests.helpers.fakes import EchoPlugin
from tests.helpers.origin import Origin
from tests.helpers.server import AppServer


@dataclass
class Live:
    kernel: Kernel
    streams: EventStreams
    url: str
    http: httpx.AsyncClient

    async def create(self, model_id: str, url: str, **extra: Any) -> dict[str, Any]:
        response = await self.http.post(
            "/v1/downloads", json={"model_id": model_id, "url": url, **extra}
        )
        assert response.status_code == 202, response.text
        return response.json()


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[Live]:
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[EchoPlugin()])
    app = create_app(kernel)
    async with AppServer(app) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        yield Live(kernel, app.state.event_streams, server.url, http)


@dataclass
class Frame:
    id: int | None
    event: str
    data: Any


async def frames(lines: AsyncIterator[str]) -> AsyncIterator[Frame]:
    """Parse an SSE body the way a browser does (id, event, data; blank line ends one)."""
    fields: dict[str, str] = {}
    async for line in lines:
        if line.startswith(":"):
            continue
        if line == "":
            if "data" in fields:
                ident = fields.get("id")
                yield Frame(
                    int(ident) if ident else None,
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            fields = {}
        else:
            name, _, value = line.partition(": ")
            fields[name] = value


async def collect(
    source: httpx.Response | AsyncIterator[str],
    until: Callable[[Frame], bool],
    within: float = 10.0,
) -> list[Frame]:
    """Frames from a response (or its line iterator) up to the first one ``until`` accepts."""
    lines = source.aiter_lines() if isinstance(source, httpx.Response) else source
    seen: list[Frame] = []
    async with asyncio.timeout(within):
        async for frame in frames(lines):
            seen.append(frame)
            if until(frame):
                return seen
    raise AssertionError(f"the stream ended first: {seen}")


def ended(model_id: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f.event == "download.status"
        and f.data["model_id"] == model_id
        and f.data["status"] in ("completed", "failed", "cancelled")
    )


async def test_a_client_sees_created_status_and_progress_in_order(
    live: Live, origin: Origin
) -> None:
    origin.faults.throttle_bps = 500_000
    url = origin.add_file("order.bin", b"o" * 300_000)
    async with live.http.stream("GET", "/v1/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        lines = response.aiter_lines()
        assert await anext(lines) == "retry: 2000"  # sent once subscribed
        started = time.monotonic()
        await live.create("order", url)
        seen = await collect(lines, ended("order"))
        took = time.monotonic() - started
    names = [f.event for f in seen]
    assert names[:2] == ["download.created", "download.status"]
    assert [f.data["status"] for f in seen[:2]] == ["queued", "downloading"]
    assert names[-1] == "download.status"
    assert seen[-1].data["status"] == "completed"
    progress = [
        f.data["progress"]["downloaded_bytes"] for f in seen if f.event == "download.progress"
    ]
    assert 1 <= len(progress) <= 4 * took + 1  # at most 4 a second
    assert progress == sorted(progress)
    ids = [f.id for f in seen]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # consecutive: nothing lost
    detail = (await live.http.get("/v1/downloads/order")).json()
    assert set(seen[-1].data) == set(detail)  # data is the detail download object
    assert seen[-1].data["progress"]["percentage"] == 100.0


async def test_reconnecting_with_last_event_id_gets_the_missed_events(
    live: Live, origin: Origin
) -> None:
    origin.faults.throttle_bps = 500_000
    url = origin.add_file("gap.bin", b"g" * 400_000)
    async with live.http.stream("GET", "/v1/events") as response:
        await live.create("gap", url)
        seen = await collect(response, lambda f: f.event == "download.progress")
    # Disconnected while the download carries on; reconnect as a browser does (the header) ...
    await asyncio.sleep(0.3)
    headers = {"Last-Event-ID": str(seen[-1].id)}
    async with live.http.stream("GET", "/v1/events", headers=headers) as response:
        seen += await collect(response, lambda f: f.event == "download.progress")
    # ... and as a script may (the query parameter), until the end.
    await asyncio.sleep(0.2)
    params = {"last_event_id": str(seen[-1].id)}
    async with live.http.stream("GET", "/v1/events", params=params) as response:
        seen += await collect(response, ended("gap"))
    ids = [f.id for f in seen]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap, no duplicate
    assert ids == [e.id for e in live.kernel.bus.since(ids[0] - 1)][: len(ids)]
    assert seen[-1].data["status"] == "completed"
    await _until(lambda: not live.kernel.bus._subscribers)  # a disconnect unsubscribes


async def test_an_id_from_an_earlier_server_run_asks_for_a_resync(live: Live) -> None:
    async with live.http.stream(
        "GET", "/v1/events", headers={"Last-Event-ID": "987654"}
    ) as response:
        seen = await collect(response, lambda f: True)
    assert seen[0].event == "resync"
    assert seen[0].data == {}
    assert seen[0].id is None


async def test_a_replay_older_than_the_ring_asks_for_a_resync() -> None:
    bus = EventBus(ring_size=4)
    streams = EventStreams(bus, heartbeat_s=0.05)
    ids = [
        bus.publish(
            DownloadProgress(DownloadRecord(model_id=f"m{n}", url="http://x/y", local_path="/m"))
        ).id
        for n in range(10)
    ]
    stream = streams.stream(last_id=ids[1], model_id=None)
    first = await anext(stream)
    assert first.startswith(b"retry: ")
    assert b"event: resync" in first
    replay = await anext(stream)
    replayed = [int(line.split()[1]) for line in replay.split(b"\n") if line.startswith(b"id:")]
    assert replayed == ids[6:]
    await stream.aclose()
    assert not bus._subscribers  # closing the stream unsubscribes


async def test_model_id_filter_sends_only_that_download(live: Live, origin: Origin) -> None:
    one, two = origin.add_file("f1.bin", b"1" * 1000), origin.add_file("f2.bin", b"2" * 1000)
    async with live.http.stream("GET", "/v1/events", params={"model_id": "two"}) as response:
        await live.create("one", one)
        await live.create("two", two)
        seen = await collect(response, ended("two"))
    assert {f.data["model_id"] for f in seen} == {"two"}


async def test_a_transient_fault_is_a_retry_event_on_the_stream(
    live: Live, origin: Origin
) -> None:
    url = origin.add_file("flaky.bin", b"r" * 300_000)
    origin.faults.fail_statuses = [503]
    async with live.http.stream("GET", "/v1/events", params={"model_id": "flaky"}) as response:
        await live.create("flaky", url)
        seen = await collect(response, ended("flaky"))
    retries = [f for f in seen if f.event == "download.retry"]
    assert len(retries) == 1
    retry = retries[0].data
    assert set(retry) == {"model_id", "attempt", "reason", "error", "delay_s"}
    assert (retry["model_id"], retry["attempt"], retry["reason"]) == ("flaky", 1, "http_503")
    assert "503" in retry["error"] and retry["delay_s"] >= 0
    assert seen[-1].data["status"] == "completed"
    # The bus carries the same Struct for plugins' on_event observers.
    assert any(
        isinstance(e.event, DownloadRetry) and e.event.model_id == "flaky"
        for e in live.kernel.bus.since(0)
    )


async def test_bad_filter_is_a_400_naming_the_param(live: Live) -> None:
    response = await live.http.get("/v1/events", params={"model_id": "bad id!"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model_id"


async def test_heartbeat_comments_keep_the_stream_open(live: Live) -> None:
    live.streams.heartbeat_s = 0.05
    pings = 0
    async with live.http.stream("GET", "/events") as response:  # the unprefixed path too
        async with asyncio.timeout(5):
            async for line in response.aiter_lines():
                pings += line == ": ping"
                if pings == 2:
                    break
    assert pings == 2


async def test_engine_created_event_carries_the_engine(live: Live, origin: Origin) -> None:
    url = origin.add_file("engine.bin", b"e" * 2000)  # .gguf would be checked as GGUF
    engine = {"inference_engine": "echo", "load_immediately": True, "main_gpu_id": 0}
    async with live.http.stream("GET", "/v1/events?model_id=eng") as response:
        await live.create("eng", url, model_type="embedding", engine_creation=engine)
        seen = await collect(response, ended("eng"))
    created = [f for f in seen if f.event == "engine.created"]
    assert [f.data for f in created] == [
        {"model_id": "eng", "model_type": "embedding", "inference_engine": "echo"}
    ]
    statuses = [f.data["status"] for f in seen if f.event == "download.status"]
    assert statuses[-2:] == ["creating_engine", "completed"]


async def test_a_stalled_client_never_delays_a_transfer(live: Live, origin: Origin) -> None:
    bus = live.kernel.bus
    host, port = live.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
    stalled.setblocking(False)
    live.streams.queue_size = 16  # for the stalled client only
    await loop.sock_connect(stalled, (host, int(port)))
    await loop.sock_sendall(stalled, f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        await _until(lambda: len(bus._subscribers) == 1)
        live.streams.queue_size = 1000
        # ~4 KB events until the stalled client's socket buffers are full and its queue
        # overflowed: from here on its stream is blocked in send().
        noise = DownloadRecord(
            model_id="noise",
            url="http://noise.invalid/" + "n" * 4000,
            local_path="/noise",
            status="downloading",
        )
        async with asyncio.timeout(10):
            while not any(sub.overflowed for sub in bus._subscribers):
                for _ in range(20):
                    bus.publish(DownloadProgress(noise))
                await asyncio.sleep(0.002)
        origin.faults.throttle_bps = 1_000_000
        url = origin.add_file("timed.bin", b"t" * 500_000)
        async with live.http.stream("GET", "/v1/events?model_id=timed") as response:
            started = time.monotonic()
            await live.create("timed", url)
            seen = await collect(response, ended("timed"))
            took = time.monotonic() - started
        assert seen[-1].data["status"] == "completed"
        # A publisher blocked by the stalled client would hold the transfer until that client
        # reads again, which it does only after this; the bound is loose for loaded machines.
        assert took < 8, f"0.5 s of throttled transfer took {took:.2f}s"
        assert max(sub.queue.qsize() for sub in bus._subscribers) <= 16  # bounded memory
        # Once it reads again, the stalled client is told to resync instead of getting a gap.
        received = b""
        async with asyncio.timeout(5):
            while b"event: resync" not in received:
                received = received[-64:] + await loop.sock_recv(stalled, 1 << 20)
    finally:
        stalled.close()


async def _until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll kernel state that has no event of its own (subscriber counts), with a deadline."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await asyncio.sleep(0.01)

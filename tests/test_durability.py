"""An acknowledged change is durable: the reply waits for the store, and saves of one record
land in the order they were made (issue 13 item 5)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from kernel.api.app import create_app
from kernel.core import Kernel
from kernel.types import DownloadRecord
from tests.conftest import make_settings
from tests.helpers.api import wait_for
from tests.helpers.data import blob
from tests.helpers.fakes import MemoryStore, MemoryStorePlugin
from tests.helpers.origin import Origin
from tests.helpers.server import AppServer, ServerProcess


class GatedStore(MemoryStore):
    """A MemoryStore whose writes wait at a gate the test opens (a slow disk, on demand)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.blocked = asyncio.Event()

    async def _pass(self) -> None:
        if not self.gate.is_set():
            self.blocked.set()
            await self.gate.wait()

    async def save(self, record: DownloadRecord) -> None:
        await self._pass()
        await super().save(record)

    async def delete(self, model_id: str) -> None:
        await self._pass()
        await super().delete(model_id)


async def start(client: Any, model_id: str, url: str) -> None:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url})
    assert response.status_code == 202, response.text


# action -> (prepare: "running" | "paused" | None, method, path, json, what the store then holds)
ACTIONS: dict[str, tuple[str | None, str, str, Any, Any]] = {
    "create": (None, "POST", "/v1/downloads", "CREATE", lambda r: r is not None),
    "pause": ("running", "POST", "/v1/downloads/d/pause", None, lambda r: r.status == "paused"),
    "resume": ("paused", "POST", "/v1/downloads/d/resume", None,
               lambda r: r.status in ("queued", "downloading")),
    "cancel": ("running", "DELETE", "/v1/downloads/d", None, lambda r: r.status == "cancelled"),
    "cancel_all": ("running", "POST", "/v1/downloads", {"action": "cancel_all"},
                   lambda r: r.status == "cancelled"),
    "purge": ("running", "DELETE", "/v1/downloads/d?purge=true", None, lambda r: r is None),
    "priority": ("running", "POST", "/v1/downloads/d/priority", {"priority": 7},
                 lambda r: r.priority == 7),
}  # fmt: skip


@pytest.mark.parametrize("action", ACTIONS)
async def test_the_reply_waits_until_the_change_is_in_the_store(
    tmp_path: Path, origin: Origin, action: str
) -> None:
    prepare, method, path, body, saved = ACTIONS[action]
    url = origin.add_file(f"gated-{action}.bin", blob(400_000, 1))
    origin.faults.throttle_bps = 50_000
    store = GatedStore()
    kernel = Kernel(
        make_settings(tmp_path), load_entrypoints=False, extra_plugins=[MemoryStorePlugin(store)]
    )
    # A real server in this loop (the test client would run the app in another thread).
    async with AppServer(create_app(kernel)) as server, httpx.AsyncClient(base_url=server.url) as client:
        if prepare is not None:
            await start(client, "d", url)
            await wait_for(client, "d", lambda b: b["progress"]["downloaded_bytes"] > 0)
        if prepare == "paused":
            assert (await client.post("/v1/downloads/d/pause")).status_code == 200
        store.gate.clear()
        store.blocked.clear()
        if body == "CREATE":
            body = {"model_id": "d", "url": url}
        request = asyncio.ensure_future(client.request(method, path, json=body))
        try:
            async with asyncio.timeout(10):
                await store.blocked.wait()
            # The write is held at the gate: no reply may have gone out. (Waiting a while
            # here cannot make a correct server fail; it gives a wrong one time to answer.)
            finished, _ = await asyncio.wait({request}, timeout=1.0)
            assert not finished, f"{action} was acknowledged before its change was saved"
        finally:
            store.gate.set()  # also on failure: shutting down saves everything first
        response = await request
        assert response.status_code in (200, 202), response.text
        assert saved(store.get("d"))  # the acknowledged state is what the store holds


async def test_a_purged_running_download_stays_gone_after_a_restart(
    tmp_path: Path, origin: Origin
) -> None:
    url = origin.add_file("purged.bin", blob(400_000, 2))
    origin.faults.throttle_bps = 50_000
    for _ in range(3):
        kernel = Kernel(make_settings(tmp_path), load_entrypoints=False)
        async with AsyncTestClient(app=create_app(kernel)) as client:
            assert (await client.get("/v1/downloads/purged")).status_code == 404
            await start(client, "purged", url)
            await wait_for(client, "purged", lambda b: b["progress"]["downloaded_bytes"] > 0)
            response = await client.delete("/v1/downloads/purged?purge=true")
            assert response.status_code == 200, response.text
    kernel = Kernel(make_settings(tmp_path), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        assert (await client.get("/v1/downloads/purged")).status_code == 404


def _get(server: ServerProcess, model_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/downloads/{model_id}", timeout=10)


def _wait_bytes(server: ServerProcess, model_id: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response = _get(server, model_id)
        if response.status_code == 200 and response.json()["progress"]["downloaded_bytes"] > 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"{model_id} never moved: {response.text}")


def test_an_acknowledged_change_survives_kill_9_right_after_the_reply(
    tmp_path: Path, origin: Origin
) -> None:
    url = origin.add_file("acked.bin", blob(2 << 20, 3))
    origin.faults.throttle_bps = 50_000
    steps: list[tuple[str, str, Any, Any]] = [
        ("POST", "/v1/downloads", {"model_id": "a", "url": url},
         lambda r: r.status_code == 200),
        ("POST", "/v1/downloads/a/pause", None, lambda r: r.json()["status"] == "paused"),
        ("POST", "/v1/downloads/a/resume", None,
         lambda r: r.json()["status"] in ("queued", "downloading")),
        ("POST", "/v1/downloads/a/priority", {"priority": 3}, lambda r: r.json()["priority"] == 3),
        ("DELETE", "/v1/downloads/a", None, lambda r: r.json()["status"] == "cancelled"),
        ("DELETE", "/v1/downloads/a?purge=true", None, lambda r: r.status_code == 404),
    ]  # fmt: skip
    server = ServerProcess(tmp_path)
    server.start()
    try:
        for method, path, body, holds in steps:
            if method == "POST" and path.endswith(("/pause", "/priority")):
                _wait_bytes(server, "a")
            response = httpx.request(method, f"{server.url}{path}", json=body, timeout=10)
            assert response.status_code in (200, 202), response.text
            server.kill()  # at once: the reply is all the client has
            server.start()
            after = _get(server, "a")
            assert holds(after), f"{method} {path} was acknowledged, then lost: {after.text}"
    finally:
        server.stop()

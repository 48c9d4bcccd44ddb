"""Queue control, throttling, runtime settings, metrics and readiness (issue 9)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from kernel.api.app import create_app
from kernel.core import RUNTIME_SETTINGS_KEY, Kernel
from plugins.sqlite_store import SqliteStore
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_for, wait_status
from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess

MiB = 1 << 20


def app_client(tmp_path: Path, **downloads: Any) -> AsyncTestClient:  # type: ignore[type-arg]
    kernel = Kernel(make_settings(tmp_path, **downloads), load_entrypoints=False)
    client = AsyncTestClient(app=create_app(kernel))
    client.kernel = kernel  # type: ignore[attr-defined]
    return client


async def start(client: Any, model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url, **extra})
    assert response.status_code == 202, response.text
    return response.json()


async def measured_rate(client: Any, model_id: str, seconds: float) -> float:
    """Bytes per second over a window of ``seconds`` (a measurement, not synchronisation)."""
    first = (await client.get(f"/v1/downloads/{model_id}")).json()["progress"]["downloaded_bytes"]
    began = time.monotonic()
    await asyncio.sleep(seconds)
    last = (await client.get(f"/v1/downloads/{model_id}")).json()["progress"]["downloaded_bytes"]
    return (last - first) / (time.monotonic() - began)


async def test_queue_starts_in_priority_then_fifo_order_and_reorders(tmp_path: Path, origin: Origin) -> None:
    origin.faults.throttle_bps = 200_000
    async with app_client(tmp_path, max_concurrent=1) as client:
        await start(client, "blocker", origin.add_file("blocker.bin", b"b" * 300_000))
        for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 1)]:
            body = await start(client, name, origin.add_file(f"{name}.bin", b"x" * 1000), priority=priority)
            assert body["status"] == "queued"
        positions = {m: (await client.get(f"/v1/downloads/{m}")).json()["queue_position"] for m in "abcde"}
        assert positions == {"b": 1, "d": 2, "e": 3, "a": 4, "c": 5}
        moved = await client.post("/v1/downloads/c/priority", json={"priority": 9})
        assert moved.status_code == 200 and moved.json()["priority"] == 9
        assert moved.json()["queue_position"] == 1
        assert_error(await client.post("/v1/downloads/c/priority", json={"priority": "hi"}),
                     400, "invalid_request_error", param="priority")
        origin.faults.throttle_bps = None
        for name in "abcde":
            await wait_status(client, name, "completed")
    order = [r.path.strip("/").removesuffix(".bin") for r in origin.requests if r.method == "GET"]
    assert order[1:] == ["c", "b", "d", "e", "a"]


async def test_per_download_cap_holds_within_15_percent(tmp_path: Path, origin: Origin) -> None:
    async with app_client(tmp_path) as client:
        await start(client, "capped", origin.add_file("capped.bin", b"c" * (8 * MiB)),
                    max_bytes_per_second=MiB)
        await wait_for(client, "capped", lambda b: b["progress"]["downloaded_bytes"] > 0)
        rate = await measured_rate(client, "capped", 3.0)
        assert 0.85 * MiB <= rate <= 1.15 * MiB, rate
        await client.delete("/v1/downloads/capped")


async def test_global_cap_is_shared_by_two_transfers(tmp_path: Path, origin: Origin) -> None:
    async with app_client(tmp_path, max_bytes_per_second=MiB) as client:
        for name in ("g1", "g2"):
            await start(client, name, origin.add_file(f"{name}.bin", b"g" * (8 * MiB)))
            await wait_for(client, name, lambda b: b["progress"]["downloaded_bytes"] > 0)
        rates = await asyncio.gather(measured_rate(client, "g1", 2.5), measured_rate(client, "g2", 2.5))
        assert 0.85 * MiB <= sum(rates) <= 1.15 * MiB, rates
        assert min(rates) >= 0.3 * MiB, rates  # shared, not starved
        await client.delete("/v1/downloads")


async def test_changing_the_cap_at_run_time_takes_effect_within_a_second(tmp_path: Path, origin: Origin) -> None:
    async with app_client(tmp_path) as client:
        await start(client, "live", origin.add_file("live.bin", b"l" * (16 * MiB)),
                    max_bytes_per_second=256 * 1024)
        await wait_for(client, "live", lambda b: b["progress"]["downloaded_bytes"] > 0)
        response = await client.post("/v1/downloads/live/limit", json={"max_bytes_per_second": 4 * MiB})
        assert response.json()["max_bytes_per_second"] == 4 * MiB
        await asyncio.sleep(0.5)  # let the new cap settle before measuring
        rate = await measured_rate(client, "live", 1.0)
        assert rate > 2 * MiB, rate
        assert_error(await client.post("/v1/downloads/live/limit", json={"max_bytes_per_second": -1}),
                     400, "invalid_request_error", param="max_bytes_per_second")
        await client.delete("/v1/downloads/live")


async def test_a_global_cap_patched_at_run_time_reaches_a_running_transfer(
    tmp_path: Path, origin: Origin
) -> None:
    async with app_client(tmp_path, max_bytes_per_second=256 * 1024) as client:
        await start(client, "global", origin.add_file("global.bin", b"g" * (16 * MiB)))
        await wait_for(client, "global", lambda b: b["progress"]["downloaded_bytes"] > 0)
        old = client.kernel.settings.downloads
        patch = {"downloads": {"max_bytes_per_second": 4 * MiB}}
        response = await client.patch("/v1/settings", json=patch)
        assert response.json()["downloads"]["max_bytes_per_second"] == 4 * MiB
        got = (await client.get("/v1/settings")).json()["downloads"]
        assert got["max_bytes_per_second"] == 4 * MiB
        # Replaced, never changed in place: the object handed out before keeps its values.
        assert old.max_bytes_per_second == 256 * 1024
        assert client.kernel.settings.downloads is not old
        await asyncio.sleep(0.5)  # let the new cap settle before measuring
        rate = await measured_rate(client, "global", 1.0)
        assert rate > 2 * MiB, rate  # the transfer started under the old cap obeys the new one
        await client.delete("/v1/downloads/global")


async def test_patching_max_concurrent_starts_queued_downloads_and_survives_restart(
    tmp_path: Path, origin: Origin
) -> None:
    origin.faults.throttle_bps = 100_000
    async with app_client(tmp_path, max_concurrent=1) as client:
        for i in range(3):
            await start(client, f"s{i}", origin.add_file(f"s{i}.bin", b"s" * 400_000))
        statuses = [(await client.get(f"/v1/downloads/s{i}")).json()["status"] for i in range(3)]
        assert statuses == ["downloading", "queued", "queued"]
        response = await client.patch("/v1/settings", json={"downloads": {"max_concurrent": 3}})
        assert response.status_code == 200 and response.json()["downloads"]["max_concurrent"] == 3
        statuses = [(await client.get(f"/v1/downloads/s{i}")).json()["status"] for i in range(3)]
        assert statuses == ["downloading"] * 3
        assert_error(await client.patch("/v1/settings", json={"downloads": {"max_concurrent": 0}}),
                     400, "invalid_request_error", param="max_concurrent")
        assert_error(await client.patch("/v1/settings", json={"downloads": {"retry": {"attempts": "x"}}}),
                     400, "invalid_request_error", param="retry.attempts")
        assert_error(await client.patch("/v1/settings", json={"server": {"port": 1}}),
                     400, "invalid_request_error", param="server")
        await client.delete("/v1/downloads")
    async with app_client(tmp_path, max_concurrent=1) as client:
        settings = (await client.get("/v1/settings")).json()["downloads"]
        assert settings["max_concurrent"] == 3
        reset = await client.delete("/v1/settings")
        assert reset.status_code == 200 and reset.json()["downloads"]["max_concurrent"] == 1
    async with app_client(tmp_path, max_concurrent=1) as client:
        settings = (await client.get("/v1/settings")).json()["downloads"]
        assert settings["max_concurrent"] == 1  # the reset outlives a restart too


async def test_a_huge_bandwidth_cap_is_refused_naming_the_field(client: Any, origin: Origin) -> None:
    huge = 2**62
    assert_error(await client.patch("/v1/settings", json={"downloads": {"max_bytes_per_second": huge}}),
                 400, "invalid_request_error", param="max_bytes_per_second")
    assert (await client.get("/v1/settings")).json()["downloads"]["max_bytes_per_second"] == 0
    url = origin.add_file("huge-cap.bin", b"h" * 1000)
    response = await client.post("/v1/downloads", json={"model_id": "huge", "url": url, "max_bytes_per_second": huge})
    assert_error(response, 400, "invalid_request_error", param="max_bytes_per_second")
    await start(client, "huge", url)
    response = await client.post("/v1/downloads/huge/limit", json={"max_bytes_per_second": huge})
    assert_error(response, 400, "invalid_request_error", param="max_bytes_per_second")


async def test_a_huge_cap_saved_by_an_older_server_is_ignored_at_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = SqliteStore(Path(settings.storage.state_dir) / "modelkernel.db")
    await store.put_meta(RUNTIME_SETTINGS_KEY, msgspec.json.encode({"max_bytes_per_second": 2**62}))
    await store.close()
    async with app_client(tmp_path) as client:
        assert (await client.get("/v1/settings")).json()["downloads"]["max_bytes_per_second"] == 0


def test_a_large_cap_never_sizes_a_large_buffer(tmp_path: Path, origin: Origin) -> None:
    # The read block once followed the cap (a quarter second of it): 1e9 bytes/s made
    # 250 MB blocks, two per download. Now it is bounded whatever the cap.
    with ServerProcess(tmp_path) as server:
        for i in range(2):
            url = origin.add_file(f"bigcap{i}.bin", bytes([i]) * (2 * MiB))
            body = {"model_id": f"bigcap{i}", "url": url, "max_bytes_per_second": 1_000_000_000}
            assert httpx.post(f"{server.url}/v1/downloads", json=body, timeout=10).status_code == 202
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = httpx.get(f"{server.url}/v1/downloads?status=all", timeout=10).json()["active_downloads"]
            if [r["status"] for r in rows] == ["completed"] * 2:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"downloads did not complete: {rows}")
        assert server.process is not None
        status = Path(f"/proc/{server.process.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert peak_kib < 300 * 1024, f"server peak RSS {peak_kib // 1024} MiB"


async def test_metrics_count_a_completed_download_and_parse(client: Any, origin: Origin) -> None:
    data = b"m" * 123_456
    await start(client, "metered", origin.add_file("metered.bin", data))
    await wait_status(client, "metered", "completed")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    received = [s.value for s in families["modelkernel_bytes_received"].samples if s.name.endswith("_total")]
    assert received == [len(data)]
    by_status = {s.labels["status"]: s.value for s in families["modelkernel_downloads"].samples}
    assert by_status["completed"] == 1 and by_status["downloading"] == 0
    durations = families["modelkernel_download_duration_seconds"].samples
    assert any(s.name.endswith("_count") and s.value == 1 for s in durations)
    routes = {s.labels.get("route") for s in families["modelkernel_http_request_duration_seconds"].samples}
    assert "/v1/downloads/{model_id}" in routes


async def test_metrics_count_a_retry_and_every_byte_once_across_a_resume(
    client: Any, origin: Origin
) -> None:
    # The body is cut after 200 000 bytes: one retry, which resumes from the .part, so each
    # byte of the file lands once (the counters follow the bus, not the transfer).
    data = b"r" * 500_000
    origin.faults.short_body = 200_000
    await start(client, "resumed", origin.add_file("resumed.bin", data))
    await wait_status(client, "resumed", "completed")
    families = {f.name: f for f in text_string_to_metric_families((await client.get("/metrics")).text)}
    received = [s.value for s in families["modelkernel_bytes_received"].samples if s.name.endswith("_total")]
    assert received == [len(data)]
    retries = [s for s in families["modelkernel_retries"].samples if s.name.endswith("_total")]
    assert [s.value for s in retries] == [1]


async def test_metrics_need_a_key_unless_public(tmp_path: Path) -> None:
    from kernel.config import AuthSettings, Settings

    base = make_settings(tmp_path)
    for public, expected in ((False, 401), (True, 200)):
        settings = Settings(storage=base.storage, auth=AuthSettings(
            require_api_key=True, api_keys=["k"], metrics_public=public))
        async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as client:
            assert (await client.get("/metrics")).status_code == expected


async def test_readiness_reports_each_check(client: Any, tmp_path: Path) -> None:
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"store": "ok", "models_dir": "ok", "disk": "ok", "records": "ok"}}
    (tmp_path / "models").chmod(0o500)
    try:
        if not __import__("os").access(tmp_path / "models", __import__("os").W_OK):
            not_ready = await client.get("/health/ready")
            assert not_ready.status_code == 503
            assert "not writable" in not_ready.json()["checks"]["models_dir"]
    finally:
        (tmp_path / "models").chmod(0o755)

"""Faults never corrupt a file, never restart a resumable download, never wedge the server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

import kernel._files
import kernel.transfer
from kernel.api.app import create_app
from kernel.config import AuthSettings, RateLimitSettings, Settings
from kernel.core import Kernel
from kernel.types import TERMINAL
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_for, wait_status
from tests.helpers.data import blob
from tests.helpers.disk import fill_disk_after
from tests.helpers.origin import Origin


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def start(client: Any, model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def gets(origin: Origin, name: str) -> list[Any]:
    return [r for r in origin.requests_for(name) if r.method == "GET"]


async def test_a_stall_longer_than_the_timeout_is_retried_with_a_range(tmp_path: Path, origin: Origin) -> None:
    data = blob(400_000, 1)
    url = origin.add_file("stall.bin", data)
    origin.faults.stall_after = 150_000
    kernel = Kernel(make_settings(tmp_path, stall_timeout_s=0.5), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        await start(client, "stall", url)
        retrying = await wait_for(client, "stall", lambda b: "attempts" in b or b["status"] == "completed")
        done = await wait_status(client, "stall", "completed")
    if "attempts" in retrying:
        assert retrying["attempts"] >= 1 and "stall" in retrying["last_error"]
    assert digest(Path(done["local_path"]).read_bytes()) == digest(data)
    requests = gets(origin, "stall.bin")
    assert len(requests) == 2 and requests[1].headers["range"] == "bytes=150000-"


async def test_a_short_body_resumes_from_where_it_ended(client: Any, origin: Origin) -> None:
    data = blob(500_000, 2)
    url = origin.add_file("short.bin", data)
    origin.faults.short_body = 200_000
    await start(client, "short", url)
    done = await wait_status(client, "short", "completed")
    assert digest(Path(done["local_path"]).read_bytes()) == digest(data)
    assert gets(origin, "short.bin")[1].headers["range"] == "bytes=200000-"


async def test_429_with_retry_after_is_honoured(client: Any, origin: Origin) -> None:
    data = blob(10_000, 3)
    url = origin.add_file("busy.bin", data)
    origin.faults.fail_statuses = [429]
    origin.faults.retry_after = 1
    loop = asyncio.get_running_loop()
    began = loop.time()
    await start(client, "busy", url)
    done = await wait_status(client, "busy", "completed")
    assert loop.time() - began >= 0.9  # waited for Retry-After, not the 20 ms backoff
    assert Path(done["local_path"]).read_bytes() == data


@pytest.mark.parametrize(("status", "words"), [(401, "Access denied"), (404, "Not found")])
async def test_client_errors_fail_fast_without_retrying(
    client: Any, origin: Origin, status: int, words: str
) -> None:
    url = origin.add_file(f"e{status}.bin", b"x" * 100)
    origin.faults.fail_statuses = [status] * 5
    await start(client, f"e{status}", url)
    failed = await wait_status(client, f"e{status}", "failed")
    assert words in failed["error_message"] and str(status) in failed["error_message"]
    assert len(origin.requests_for(f"e{status}.bin")) == 1
    assert not Path(failed["local_path"]).exists()


async def test_persistent_5xx_fails_after_the_configured_attempts(client: Any, origin: Origin) -> None:
    url = origin.add_file("down.bin", b"x" * 100)
    origin.faults.fail_statuses = [503] * 10
    await start(client, "down", url)
    failed = await wait_status(client, "down", "failed")
    assert "after 4 attempts" in failed["error_message"] and "503" in failed["error_message"]
    assert len(origin.requests_for("down.bin")) == 4  # first try + 3 retries


async def test_an_origin_that_cuts_every_try_at_the_same_byte_runs_out_of_attempts(
    client: Any, origin: Origin
) -> None:
    # No ranges, so every try starts again at byte 0 and is cut at the same 1 MiB: bytes
    # arrive each time, but the file never gets further than it already had.
    url = origin.add_file("cut-every.bin", blob(2 << 20, 31))
    origin.faults.ignore_range = True
    origin.faults.cut_every_after = 1 << 20
    await start(client, "cut-every", url)
    failed = await wait_status(client, "cut-every", "failed", timeout=30)
    assert "attempts" in failed["error_message"]
    assert 4 <= len(gets(origin, "cut-every.bin")) <= 6  # first try + 3 retries (+ slack)


async def test_a_link_that_drops_now_and_then_still_completes(client: Any, origin: Origin) -> None:
    # Ranges honoured: each try gets further than the last, so the count starts again.
    data = blob(1 << 20, 32)
    url = origin.add_file("drops.bin", data)
    origin.faults.cut_every_after = 150_000
    await start(client, "drops", url)
    done = await wait_status(client, "drops", "completed", timeout=30)
    assert digest(Path(done["local_path"]).read_bytes()) == digest(data)
    assert len(gets(origin, "drops.bin")) >= 7  # more tries than retry.attempts allows in a row


async def test_enospc_fails_keeps_the_part_and_a_later_create_resumes(
    client: Any, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob(3 << 20, 4)
    url = origin.add_file("full.bin", data)
    fill_disk_after(monkeypatch, 1 << 20)
    origin.faults.throttle_bps = 4 << 20
    await start(client, "full", url)
    failed = await wait_status(client, "full", "failed")
    assert "disk is full" in failed["error_message"]
    part = Path(failed["local_path"] + ".part")
    kept = part.stat().st_size
    assert kept >= 1 << 20 and not Path(failed["local_path"]).exists()

    monkeypatch.setattr(kernel._files, "_pwrite", os.pwrite)  # the disk has room again
    origin.faults.throttle_bps = None
    origin.requests.clear()
    await start(client, "full", url)
    done = await wait_status(client, "full", "completed")
    assert digest(Path(done["local_path"]).read_bytes()) == digest(data)
    assert gets(origin, "full.bin")[0].headers["range"] == f"bytes={kept}-"


async def test_not_enough_free_space_fails_early_saying_how_much(
    client: Any, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(kernel.transfer, "_disk_usage", lambda _path: usage(10**9, 10**9 - 1000, 1000))
    url = origin.add_file("huge.bin", b"h" * 50_000)
    await start(client, "huge", url)
    failed = await wait_status(client, "huge", "failed")
    assert "Not enough disk space" in failed["error_message"] and "49000 missing" in failed["error_message"]
    assert gets(origin, "huge.bin") == []


async def test_a_part_from_another_url_is_never_spliced(client: Any, origin: Origin, tmp_path: Path) -> None:
    data = blob(100_000, 5)
    url = origin.add_file("clean.bin", data)
    stale = tmp_path / "models" / "clean" / "clean.bin.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"garbage from some other download" * 100)
    await start(client, "clean", url)
    done = await wait_status(client, "clean", "completed")
    assert Path(done["local_path"]).read_bytes() == data
    assert gets(origin, "clean.bin")[0].headers.get("range") is None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("http://127.0.0.1/a\x00b", "control"), ("http://127.0.0.1/a\nb", "control"),
     ("http://127.0.0.1/" + "a" * 9000, "8192"), ("file:///etc/passwd", "No loaded source plugin"),
     ("javascript:alert(1)", "No loaded source plugin")],
)
async def test_hostile_urls_are_rejected(client: Any, url: str, fragment: str) -> None:
    error = assert_error(await client.post("/v1/downloads", json={"model_id": "h", "url": url}),
                         400, "invalid_request_error", param="url")
    assert fragment in error["message"]


async def test_oversized_body_is_rejected_in_the_error_shape(client: Any) -> None:
    body = {"model_id": "big", "url": "http://127.0.0.1/x", "filename": "a" * (2 << 20)}
    response = await client.post("/v1/downloads", json=body)
    assert_error(response, 413, "invalid_request_error")


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    base = make_settings(tmp_path)
    settings = Settings(storage=base.storage, auth=AuthSettings(
        rate_limit=RateLimitSettings(max_requests=3, window_s=30)))
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as client:
        for _ in range(3):
            assert (await client.get("/v1/downloads")).status_code == 200
        limited = await client.get("/v1/downloads")
        assert_error(limited, 429, "rate_limit_error", code="rate_limit_exceeded")
        assert 1 <= int(limited.headers["retry-after"]) <= 30
        assert (await client.get("/health")).status_code == 200  # liveness is never limited


async def test_random_interleavings_leave_legal_states_and_whole_files(
    tmp_path: Path, origin: Origin
) -> None:
    """A bounded, seeded storm of pause/resume/cancel/cancel-all/create on a few ids."""
    rng = random.Random(20261124)
    files = {f"storm{i}": blob(300_000, 100 + i) for i in range(4)}
    urls = {m: origin.add_file(f"{m}.bin", data) for m, data in files.items()}
    origin.faults.throttle_bps = 3_000_000
    kernel = Kernel(make_settings(tmp_path, max_concurrent=2), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:

        async def act(model_id: str) -> int:
            action = rng.choice(["create", "create", "pause", "resume", "cancel", "get", "cancel_all"])
            if action == "create":
                r = await client.post("/v1/downloads", json={"model_id": model_id, "url": urls[model_id]})
            elif action == "cancel_all":
                r = await client.delete("/v1/downloads")
            elif action == "get":
                r = await client.get(f"/v1/downloads/{model_id}")
            elif action == "cancel":
                r = await client.delete(f"/v1/downloads/{model_id}")
            else:
                r = await client.post(f"/v1/downloads/{model_id}/{action}")
            return r.status_code

        for _ in range(25):
            codes = await asyncio.gather(*(act(rng.choice(list(files))) for _ in range(8)))
            assert all(code < 500 for code in codes), codes
        origin.faults.throttle_bps = None
        for model_id in files:
            body = (await client.get(f"/v1/downloads/{model_id}")).json()
            if body.get("status") == "paused":
                await client.post(f"/v1/downloads/{model_id}/resume")
        for model_id in files:
            response = await client.get(f"/v1/downloads/{model_id}")
            if response.status_code == 404:
                continue
            body = await wait_for(client, model_id, lambda b: b["status"] in TERMINAL, timeout=20)
            final, part = Path(body["local_path"]), Path(body["local_path"] + ".part")
            if body["status"] == "completed":
                assert final.read_bytes() == files[model_id]
                assert not part.exists()
            else:
                assert body["status"] == "cancelled", body
                assert not part.exists()
                if final.exists():  # completed by an earlier create, then replaced and cancelled
                    assert final.read_bytes() == files[model_id]

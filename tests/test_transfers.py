"""End to end through the API: real bytes from the loopback origin into real files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from kernel.api.app import create_app
from kernel.core import Kernel
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_for, wait_status
from tests.helpers.data import blob
from tests.helpers.origin import Origin


async def create(client: Any, model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def test_create_downloads_a_byte_identical_file(client: Any, origin: Origin, tmp_path: Path) -> None:
    data = blob(3 << 20)
    url = origin.add_file("plain.bin", data)
    created = await create(client, "plain", url)
    assert created["status"] in ("downloading", "queued")
    assert created["local_path"] == str(tmp_path / "models" / "plain" / "plain.bin")
    done = await wait_status(client, "plain", "completed")
    assert sha(done["local_path"]) == hashlib.sha256(data).hexdigest()
    assert not os.path.exists(done["local_path"] + ".part")
    assert done["progress"] == {
        "downloaded_bytes": len(data), "total_bytes": len(data), "percentage": 100.0,
        "download_speed_bps": done["progress"]["download_speed_bps"],
    }
    assert "end_time" in done["timing"] and "estimated_remaining_seconds" not in done["timing"]


async def test_pause_stops_bytes_and_resume_sends_range_with_if_range(client: Any, origin: Origin) -> None:
    data = blob(600_000, 1)
    url = origin.add_file("pausable.bin", data)
    origin.faults.throttle_bps = 400_000
    await create(client, "pausable", url)
    await wait_for(client, "pausable", lambda b: b["progress"]["downloaded_bytes"] > 0)
    # Pause answers once the transfer has stopped: the record and the .part agree below.
    response = await client.post("/v1/downloads/pausable/pause")
    assert response.json() == {"success": True, "message": "Download paused successfully", "model_id": "pausable"}
    paused = (await client.get("/v1/downloads/pausable")).json()
    assert paused["status"] == "paused"
    part = Path(paused["local_path"] + ".part")
    size_at_pause = part.stat().st_size
    assert 0 < size_at_pause < len(data)
    assert paused["progress"]["downloaded_bytes"] == size_at_pause
    requests_at_pause = len(origin.requests_for("pausable.bin"))

    origin.faults.throttle_bps = None
    response = await client.post("/v1/downloads/pausable/resume")
    assert response.json() == {"success": True, "message": "Download resumed successfully", "model_id": "pausable"}
    done = await wait_status(client, "pausable", "completed")
    assert sha(done["local_path"]) == hashlib.sha256(data).hexdigest()
    resumed = origin.requests_for("pausable.bin")[requests_at_pause:]
    ranged = [r for r in resumed if r.method == "GET"]
    assert ranged[-1].headers["range"] == f"bytes={size_at_pause}-"
    assert ranged[-1].headers["if-range"] == origin._files["pausable.bin"].etag


async def test_resume_restarts_from_zero_when_origin_ignores_range(client: Any, origin: Origin) -> None:
    data = blob(500_000, 2)
    url = origin.add_file("norange.bin", data)
    origin.faults.throttle_bps = 300_000
    await create(client, "norange", url)
    await wait_for(client, "norange", lambda b: b["progress"]["downloaded_bytes"] > 0)
    await client.post("/v1/downloads/norange/pause")
    origin.faults.throttle_bps = None
    origin.faults.ignore_range = True
    await client.post("/v1/downloads/norange/resume")
    done = await wait_status(client, "norange", "completed")
    assert sha(done["local_path"]) == hashlib.sha256(data).hexdigest()


async def test_resume_restarts_from_zero_when_etag_changes(client: Any, origin: Origin) -> None:
    old, new = blob(500_000, 3), blob(500_000, 4)
    url = origin.add_file("changing.bin", old)
    origin.faults.throttle_bps = 300_000
    await create(client, "changing", url)
    await wait_for(client, "changing", lambda b: b["progress"]["downloaded_bytes"] > 0)
    await client.post("/v1/downloads/changing/pause")
    origin.replace_file("changing.bin", new)
    origin.faults.throttle_bps = None
    await client.post("/v1/downloads/changing/resume")
    done = await wait_status(client, "changing", "completed")
    assert sha(done["local_path"]) == hashlib.sha256(new).hexdigest()  # never spliced


async def test_cancel_removes_the_part_file_and_keeps_the_record(client: Any, origin: Origin) -> None:
    url = origin.add_file("cancel.bin", blob(500_000, 5))
    origin.faults.throttle_bps = 200_000
    await create(client, "cancelme", url)
    body = await wait_for(client, "cancelme", lambda b: b["progress"]["downloaded_bytes"] > 0)
    # Cancel answers once the transfer has stopped: no .part is left behind below.
    response = await client.delete("/v1/downloads/cancelme")
    result = response.json()
    assert response.status_code == 200
    assert result["success"] is True and result["message"] == "Download cancelled successfully"
    assert result["previous_status"] == "downloading" and result["download_type"] == "regular"
    assert isinstance(result["timestamp"], int) and "engine_creation" not in result
    assert not os.path.exists(body["local_path"] + ".part")
    assert not os.path.exists(body["local_path"])
    ended = (await client.get("/v1/downloads/cancelme")).json()
    assert ended["status"] == "cancelled" and "end_time" in ended["timing"]
    assert_error(await client.post("/v1/downloads/cancelme/cancel"), 400, "invalid_request_error")


async def test_cancel_never_touches_a_completed_file(client: Any, origin: Origin) -> None:
    url = origin.add_file("keep.bin", blob(1000, 6))
    await create(client, "keep", url)
    done = await wait_status(client, "keep", "completed")
    error = assert_error(await client.delete("/v1/downloads/keep"), 400, "invalid_request_error")
    assert "completed" in error["message"]
    assert os.path.exists(done["local_path"])


async def test_cancel_all_counts_cancelled_and_skips_ended(client: Any, origin: Origin) -> None:
    origin.faults.throttle_bps = 50_000
    for i in range(3):
        await create(client, f"bulk{i}", origin.add_file(f"bulk{i}.bin", blob(400_000, 10 + i)))
    response = await client.post("/v1/downloads", json={"action": "cancel_all"})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["message"] == "Bulk download cancellation completed"
    assert body["summary"] == {
        "total_downloads": 3, "successful_cancellations": 3, "failed_cancellations": 0,
        "startup_cancellations": 0, "regular_cancellations": 3,
    }
    assert sorted(d["model_id"] for d in body["cancelled_downloads"]) == ["bulk0", "bulk1", "bulk2"]
    assert all(isinstance(d["cancelled_at"], int) for d in body["cancelled_downloads"])
    assert body["failed_cancellations"] == []
    listing = (await client.get("/v1/downloads")).json()
    assert listing["active_downloads"] == [] and listing["summary"]["total_active"] == 0
    again = (await client.delete("/v1/downloads")).json()
    assert again["summary"]["total_downloads"] == 0


@pytest.mark.parametrize("how", ["delete", "post_action"])
async def test_cancel_all_never_starts_what_it_is_about_to_cancel(
    tmp_path: Path, origin: Origin, how: str
) -> None:
    origin.faults.throttle_bps = 50_000
    kernel = Kernel(make_settings(tmp_path, max_concurrent=1), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        for i in range(4):
            await create(client, f"held{i}", origin.add_file(f"held{how}{i}.bin", blob(400_000, 40 + i)))
        await wait_for(client, "held0", lambda b: b["progress"]["downloaded_bytes"] > 0)
        if how == "delete":
            response = await client.delete("/v1/downloads")
        else:
            response = await client.post("/v1/downloads", json={"action": "cancel_all"})
        assert response.status_code == 200
        previous = {d["model_id"]: d["previous_status"] for d in response.json()["cancelled_downloads"]}
        assert previous == {"held0": "downloading", "held1": "queued", "held2": "queued", "held3": "queued"}
        for i in (1, 2, 3):  # the origin never saw a connection for the queued ones
            assert origin.requests_for(f"held{how}{i}.bin") == []
        # the queue works again afterwards
        await create(client, "after", origin.add_file(f"after{how}.bin", b"a" * 1000))
        await wait_status(client, "after", "completed")


async def test_duplicate_active_id_is_409_and_terminal_one_is_replaced(client: Any, origin: Origin) -> None:
    origin.faults.throttle_bps = 100_000
    url = origin.add_file("dup.bin", blob(300_000, 20))
    await create(client, "dup", url)
    response = await client.post("/v1/downloads", json={"model_id": "dup", "url": url})
    assert_error(response, 409, "invalid_request_error", code="download_exists", param="model_id")
    await client.delete("/v1/downloads/dup")
    origin.faults.throttle_bps = None
    replaced = await create(client, "dup", url)
    assert replaced["status"] in ("downloading", "queued")
    await wait_status(client, "dup", "completed")


async def test_existing_verified_file_completes_without_transfer(client: Any, origin: Origin) -> None:
    data = blob(200_000, 21)
    url = origin.add_file("present.bin", data)
    await create(client, "present", url, sha256=hashlib.sha256(data).hexdigest())
    await wait_status(client, "present", "completed")
    origin.requests.clear()
    await create(client, "present", url, sha256=hashlib.sha256(data).hexdigest())
    done = await wait_status(client, "present", "completed")
    assert done["sha256"] == hashlib.sha256(data).hexdigest()
    assert [r.method for r in origin.requests_for("present.bin")] == ["HEAD"]


async def test_an_unchanged_remote_file_is_not_fetched_again(client: Any, origin: Origin) -> None:
    data = blob(200_000, 24)
    url = origin.add_file("unchanged.bin", data)
    await create(client, "unchanged", url)
    await wait_status(client, "unchanged", "completed")
    origin.requests.clear()
    await create(client, "unchanged", url)
    await wait_status(client, "unchanged", "completed")
    assert [r.method for r in origin.requests_for("unchanged.bin")] == ["HEAD"]


async def test_a_same_size_file_is_fetched_again_when_the_remote_changed(client: Any, origin: Origin) -> None:
    old, new = blob(200_000, 25), blob(200_000, 26)
    url = origin.add_file("changed.bin", old)
    await create(client, "changed", url)
    await wait_status(client, "changed", "completed")
    origin.replace_file("changed.bin", new)  # same size, new ETag
    await create(client, "changed", url)
    done = await wait_status(client, "changed", "completed")
    assert Path(done["local_path"]).read_bytes() == new


async def test_a_same_size_file_nobody_recorded_is_not_taken_as_present(
    client: Any, origin: Origin, tmp_path: Path
) -> None:
    data = blob(200_000, 27)
    url = origin.add_file("stranger.bin", data)
    target = tmp_path / "models" / "stranger" / "stranger.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\0" * len(data))
    await create(client, "stranger", url)
    done = await wait_status(client, "stranger", "completed")
    assert Path(done["local_path"]).read_bytes() == data


async def test_sha256_mismatch_fails_and_leaves_no_file(client: Any, origin: Origin) -> None:
    url = origin.add_file("tampered.bin", blob(100_000, 22))
    await create(client, "tampered", url, sha256="0" * 64)
    failed = await wait_status(client, "tampered", "failed")
    assert "Checksum mismatch" in failed["error_message"] and "0" * 64 in failed["error_message"]
    assert not os.path.exists(failed["local_path"])
    assert not os.path.exists(failed["local_path"] + ".part")


async def test_gguf_file_without_magic_fails(client: Any, origin: Origin) -> None:
    url = origin.add_file("fake.gguf", b"NOPE" + blob(1000, 23))
    await create(client, "fakegguf", url)
    failed = await wait_status(client, "fakegguf", "failed")
    assert "not a valid GGUF model (bad magic number)" in failed["error_message"]
    assert not os.path.exists(failed["local_path"])


async def test_origin_404_fails_at_once_with_a_clear_message(client: Any, origin: Origin) -> None:
    await create(client, "missing", origin.url("does-not-exist.bin"))
    failed = await wait_status(client, "missing", "failed")
    assert "404" in failed["error_message"]
    assert len(origin.requests_for("does-not-exist.bin")) == 1


async def test_transient_503_is_retried_and_resumes(client: Any, origin: Origin) -> None:
    data = blob(300_000, 24)
    url = origin.add_file("flaky.bin", data)
    origin.faults.fail_statuses = [503, 503]
    await create(client, "flaky", url)
    done = await wait_status(client, "flaky", "completed")
    assert sha(done["local_path"]) == hashlib.sha256(data).hexdigest()


async def test_connection_drop_resumes_from_the_part_file(client: Any, origin: Origin) -> None:
    data = blob(800_000, 25)
    url = origin.add_file("dropped.bin", data)
    origin.faults.drop_after = 300_000
    await create(client, "dropped", url)
    done = await wait_status(client, "dropped", "completed")
    assert sha(done["local_path"]) == hashlib.sha256(data).hexdigest()
    gets = [r for r in origin.requests_for("dropped.bin") if r.method == "GET"]
    assert len(gets) == 2 and gets[1].headers["range"].startswith("bytes=")
    assert gets[1].headers["range"] != "bytes=0-"


async def test_downloads_beyond_max_concurrent_are_queued_in_priority_order(
    origin: Origin, tmp_path: Path
) -> None:
    from litestar.testing import AsyncTestClient

    from kernel.api.app import create_app
    from kernel.core import Kernel
    from tests.conftest import make_settings

    kernel = Kernel(make_settings(tmp_path, max_concurrent=1), load_entrypoints=False)
    origin.faults.throttle_bps = 100_000
    async with AsyncTestClient(app=create_app(kernel)) as client:
        await create(client, "first", origin.add_file("q1.bin", blob(200_000, 30)))
        low = await create(client, "low", origin.add_file("q2.bin", blob(1000, 31)))
        high = await create(client, "high", origin.add_file("q3.bin", blob(1000, 32)), priority=5)
        assert low["status"] == "queued" and high["status"] == "queued"
        assert (await client.get("/v1/downloads/high")).json()["queue_position"] == 1
        assert (await client.get("/v1/downloads/low")).json()["queue_position"] == 2
        listing = (await client.get("/v1/downloads")).json()
        assert [d["status"] for d in listing["active_downloads"]] == ["downloading", "queued", "queued"]
        origin.faults.throttle_bps = None
        for model_id in ("first", "high", "low"):
            await wait_status(client, model_id, "completed")
        gets = [r.path for r in origin.requests if r.method == "GET"]
        assert gets.index("/q3.bin") < gets.index("/q2.bin")


@pytest.mark.parametrize("bad_id", ["..", "../evil", ".hidden", "a/../../b", "x" * 129, "sp ace"])
async def test_hostile_ids_are_rejected_and_nothing_is_written(
    client: Any, origin: Origin, tmp_path: Path, bad_id: str
) -> None:
    url = origin.add_file("victim.bin", b"x" * 10)
    response = await client.post("/v1/downloads", json={"model_id": bad_id, "url": url})
    assert_error(response, 400, "invalid_request_error", param="model_id")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "state" not in p.parts]
    assert written == []


@pytest.mark.parametrize("bad_name", ["../../etc/passwd", "..", "a/b.gguf", "a\x00b"])
async def test_hostile_filenames_are_rejected(client: Any, origin: Origin, bad_name: str) -> None:
    url = origin.add_file("victim2.bin", b"x" * 10)
    response = await client.post(
        "/v1/downloads", json={"model_id": "fname", "url": url, "filename": bad_name}
    )
    assert_error(response, 400, "invalid_request_error", param="filename")

"""Symbolic links planted in models_dir are never written through, and no path outside
models_dir is ever written or removed (issue 13 item 3)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from kernel.api.app import create_app
from kernel.core import Kernel
from kernel.types import DownloadRecord
from tests.conftest import make_settings
from tests.helpers.api import wait_for, wait_status
from tests.helpers.data import blob
from tests.helpers.origin import Origin


async def create(client: Any, model_id: str, url: str) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url})
    assert response.status_code == 202, response.text
    return response.json()


def outside_dir(tmp_path: Path, *files: tuple[str, bytes]) -> dict[Path, bytes]:
    """A directory outside models_dir holding ``files``; returns what must stay as it is."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    for name, data in files:
        (outside / name).write_bytes(data)
    return {p: p.read_bytes() for p in outside.iterdir()}


def unchanged(before: dict[Path, bytes], directory: Path) -> None:
    assert {p: p.read_bytes() for p in directory.iterdir()} == before


async def test_a_model_directory_that_is_a_link_is_refused(
    client: Any, origin: Origin, tmp_path: Path
) -> None:
    url = origin.add_file("linkdir.bin", blob(300_000, 1))
    before = outside_dir(tmp_path, ("linkdir.bin", b"precious" * 100), ("linkdir.bin.part", b"p"))
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "linkdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    await create(client, "linkdir", url)
    failed = await wait_status(client, "linkdir", "failed")
    assert "symbolic link" in failed["error_message"]
    unchanged(before, tmp_path / "outside")
    await client.delete("/v1/downloads/linkdir?purge=true&delete_file=true")
    unchanged(before, tmp_path / "outside")  # nothing removed through the link either


async def test_a_part_link_planted_while_paused_is_never_written_through(
    client: Any, origin: Origin, tmp_path: Path
) -> None:
    url = origin.add_file("paused-link.bin", blob(600_000, 2))
    origin.faults.throttle_bps = 200_000
    created = await create(client, "plink", url)
    await wait_for(client, "plink", lambda b: b["progress"]["downloaded_bytes"] > 0)
    assert (await client.post("/v1/downloads/plink/pause")).status_code == 200
    before = outside_dir(tmp_path, ("victim", b"v" * 100_000))  # smaller: a resume would append
    part = Path(created["local_path"] + ".part")
    part.unlink()
    part.symlink_to(tmp_path / "outside" / "victim")
    origin.faults.throttle_bps = None
    assert (await client.post("/v1/downloads/plink/resume")).status_code == 200
    done = await wait_status(client, "plink", "failed", "completed")
    unchanged(before, tmp_path / "outside")
    if done["status"] == "failed":
        assert "symbolic link" in done["error_message"]
    else:  # replaced the link: a whole, correct file of our own
        assert Path(done["local_path"]).read_bytes() == blob(600_000, 2)
        assert not Path(done["local_path"]).is_symlink()


async def test_a_part_link_planted_while_queued_is_never_written_through(
    tmp_path: Path, origin: Origin
) -> None:
    origin.faults.throttle_bps = 100_000
    kernel = Kernel(make_settings(tmp_path, max_concurrent=1), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        await create(client, "first", origin.add_file("first-q.bin", blob(400_000, 3)))
        queued = await create(client, "second", origin.add_file("second-q.bin", blob(400_000, 4)))
        assert queued["status"] == "queued"
        before = outside_dir(tmp_path, ("victim", b"q" * 1000))
        part = Path(queued["local_path"] + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.symlink_to(tmp_path / "outside" / "victim")
        origin.faults.throttle_bps = None
        done = await wait_status(client, "second", "failed", "completed", timeout=30)
        unchanged(before, tmp_path / "outside")
        if done["status"] == "failed":
            assert "symbolic link" in done["error_message"]
        else:
            assert Path(done["local_path"]).read_bytes() == blob(400_000, 4)


async def test_a_final_path_link_is_never_already_present(
    client: Any, origin: Origin, tmp_path: Path
) -> None:
    data = blob(200_000, 5)
    url = origin.add_file("final-link.bin", data)
    await create(client, "flink", url)
    done = await wait_status(client, "flink", "completed")
    final = Path(done["local_path"])
    before = outside_dir(tmp_path, ("same-size", b"s" * len(data)))
    final.unlink()
    final.symlink_to(tmp_path / "outside" / "same-size")  # same size, same recorded ETag
    await create(client, "flink", url)
    again = await wait_status(client, "flink", "completed", "failed")
    unchanged(before, tmp_path / "outside")
    assert again["status"] == "completed"
    assert not final.is_symlink() and final.read_bytes() == data  # the link was replaced


async def test_a_changed_models_dir_never_writes_to_the_old_one(
    tmp_path: Path, origin: Origin
) -> None:
    url = origin.add_file("moved.bin", blob(600_000, 6))
    origin.faults.throttle_bps = 200_000
    old = make_settings(tmp_path)
    async with AsyncTestClient(app=create_app(Kernel(old, load_entrypoints=False))) as client:
        created = await create(client, "moved", url)
        await wait_for(client, "moved", lambda b: b["progress"]["downloaded_bytes"] > 0)
        assert (await client.post("/v1/downloads/moved/pause")).status_code == 200
        await create(client, "kept", origin.add_file("kept.bin", b"k" * 1000))
        kept = await wait_status(client, "kept", "completed")
    origin.faults.throttle_bps = None
    part = Path(created["local_path"] + ".part")
    part_before = part.read_bytes()
    new = make_settings(tmp_path)
    new.storage.models_dir = str(tmp_path / "models2")
    async with AsyncTestClient(app=create_app(Kernel(new, load_entrypoints=False))) as client:
        assert (await client.post("/v1/downloads/moved/resume")).status_code == 200
        failed = await wait_status(client, "moved", "failed")
        assert "outside models_dir" in failed["error_message"]
        response = await client.delete("/v1/downloads/kept?purge=true&delete_file=true")
        assert response.json()["file_deleted"] is False
    assert part.read_bytes() == part_before  # the old models_dir was not touched
    assert Path(kept["local_path"]).read_bytes() == b"k" * 1000


async def test_a_local_path_edited_in_the_store_is_never_written(
    tmp_path: Path, origin: Origin
) -> None:
    before = outside_dir(tmp_path, ("target.bin", b"t" * 1000))
    settings = make_settings(tmp_path)
    state = Path(settings.storage.state_dir)
    url = origin.add_file("edited.bin", blob(1000, 7))
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as client:
        await create(client, "edited", url)
        await wait_status(client, "edited", "completed")
        assert (await client.post("/v1/downloads/edited/pause")).status_code == 400
    evil = DownloadRecord(model_id="evil", url=url, status="paused", seq=99,
                          local_path=str(tmp_path / "models" / "evil" / ".." / ".." / "outside" / "target.bin"))  # fmt: skip
    with sqlite3.connect(state / "modelkernel.db") as conn:
        conn.execute("INSERT INTO downloads(model_id, record) VALUES (?, ?)",
                     ("evil", msgspec.json.encode(evil)))  # fmt: skip
    conn.close()
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as client:
        assert (await client.post("/v1/downloads/evil/resume")).status_code == 200
        failed = await wait_status(client, "evil", "failed")
        assert "outside models_dir" in failed["error_message"]
        await client.delete("/v1/downloads/evil?purge=true&delete_file=true")
    unchanged(before, tmp_path / "outside")
    assert os.path.exists(tmp_path / "outside" / "target.bin")


async def test_a_dangling_orphan_part_link_does_not_stop_the_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    orphan = tmp_path / "models" / "orphan" / "gone.bin.part"
    orphan.parent.mkdir(parents=True)
    orphan.symlink_to(tmp_path / "nowhere")
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as client:
        assert (await client.get("/health/ready")).status_code == 200
    assert orphan.is_symlink()  # reported, never removed

"""State that survives: the real server as a subprocess, killed and restarted."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess


def blob(size: int, seed: int) -> bytes:
    return hashlib.shake_256(f"restart-{seed}".encode()).digest(size)


def wait_for(server: ServerProcess, model_id: str, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{server.url}/v1/downloads/{model_id}", timeout=5)
        if response.status_code == 200:
            body = response.json()
            if predicate(body):
                return body
        time.sleep(0.02)
    raise AssertionError(f"timed out on {model_id}: {body}")


def create(server: ServerProcess, model_id: str, url: str) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/downloads", json={"model_id": model_id, "url": url}, timeout=5)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_interrupted_download_resumes_after_restart(tmp_path: Path, origin: Origin, how: str) -> None:
    data = blob(1_200_000, 1)
    url = origin.add_file(f"restart-{how}.bin", data)
    origin.faults.throttle_bps = 400_000
    server = ServerProcess(tmp_path)
    server.start()
    try:
        created = create(server, "survivor", url)
        wait_for(server, "survivor", lambda b: b["progress"]["downloaded_bytes"] > 300_000)
        if how == "kill9":
            server.kill()
        else:
            took = server.stop(signal.SIGTERM, timeout=5)
            assert took < 2.0, f"graceful shutdown took {took:.2f}s"
        part = Path(created["local_path"] + ".part")
        assert 0 < part.stat().st_size < len(data)
        origin.requests.clear()
        origin.faults.throttle_bps = None
        server.start()
        done = wait_for(server, "survivor", lambda b: b["status"] == "completed")
    finally:
        server.stop()
    assert hashlib.sha256(Path(done["local_path"]).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert done["timing"]["start_time"] == created["timing"]["start_time"]
    gets = [r for r in origin.requests_for(f"restart-{how}.bin") if r.method == "GET"]
    assert gets and gets[0].headers["range"] != "bytes=0-"
    assert int(gets[0].headers["range"].removeprefix("bytes=").rstrip("-")) > 0


def test_paused_and_ended_downloads_survive_a_restart(tmp_path: Path, origin: Origin) -> None:
    server = ServerProcess(tmp_path)
    server.start()
    try:
        done_url = origin.add_file("r-done.bin", blob(1000, 2))
        create(server, "done", done_url)
        wait_for(server, "done", lambda b: b["status"] == "completed")
        create(server, "broken", origin.url("r-missing.bin"))
        wait_for(server, "broken", lambda b: b["status"] == "failed")
        origin.faults.throttle_bps = 100_000
        create(server, "held", origin.add_file("r-held.bin", blob(500_000, 3)))
        wait_for(server, "held", lambda b: b["progress"]["downloaded_bytes"] > 0)
        assert httpx.post(f"{server.url}/v1/downloads/held/pause").status_code == 200
        create(server, "gone", origin.add_file("r-gone.bin", blob(500_000, 4)))
        assert httpx.delete(f"{server.url}/v1/downloads/gone").status_code == 200
        before = {m: httpx.get(f"{server.url}/v1/downloads/{m}").json() for m in ("done", "broken", "held", "gone")}
        server.stop()
        server.start()
        after = {m: httpx.get(f"{server.url}/v1/downloads/{m}").json() for m in before}
    finally:
        server.stop()
    assert [after[m]["status"] for m in ("done", "broken", "held", "gone")] == [
        "completed", "failed", "paused", "cancelled"]
    for model_id in ("done", "broken", "gone"):
        assert after[model_id]["timing"] == before[model_id]["timing"]
        assert after[model_id].get("error_message") == before[model_id].get("error_message")
    assert after["held"]["progress"]["downloaded_bytes"] == before["held"]["progress"]["downloaded_bytes"]


ECHO_PLUGIN = """
from kernel import hookimpl


class EchoEngine:
    def __init__(self, model_id, model_type):
        self.model_id, self.model_type = model_id, model_type

    async def complete(self, prompt, max_tokens):
        return prompt

    async def embed(self, texts):
        return [[1.0] for _ in texts]

    async def close(self):
        pass


class EchoBackend:
    name = "echo"
    aliases = ()

    async def create(self, model_id, path, model_type, spec):
        return EchoEngine(model_id, model_type)


@hookimpl
def register_engine_backends(settings):
    return [EchoBackend()]
"""


def install_echo_plugin(site: Path) -> dict[str, str]:
    """A third-party engine plugin, installed through an entry point for the subprocess."""
    site.mkdir()
    (site / "mk_echo_engine.py").write_text(ECHO_PLUGIN)
    dist = site / "mk_echo_engine-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mk-echo-engine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[modelkernel]\necho = mk_echo_engine\n")
    return {"PYTHONPATH": str(site)}


def test_config_models_become_one_startup_download_across_boots(tmp_path: Path, origin: Origin) -> None:
    data = blob(2000, 5)
    url = origin.add_file("boot.bin", data)
    config = {"models": [{"id": "bootmodel", "path": url, "type": "embedding",
                          "inference_engine": "echo", "main_gpu_id": 0}]}
    server = ServerProcess(tmp_path, config=config, env=install_echo_plugin(tmp_path / "site"))
    server.start()
    try:
        done = wait_for(server, "bootmodel", lambda b: b["status"] == "completed")
        assert done["download_type"] == "startup"
        assert done["engine_creation"]["inference_engine"] == "echo"
        assert done["engine_creation"]["model_type"] == "embedding"
        server.stop()
        origin.requests.clear()
        server.start()
        again = httpx.get(f"{server.url}/v1/downloads/bootmodel").json()
    finally:
        server.stop()
    assert again["status"] == "completed"
    assert again["timing"] == done["timing"]
    assert origin.requests_for("boot.bin") == []  # not downloaded again
    assert Path(done["local_path"]).read_bytes() == data


def test_changed_config_url_replaces_the_startup_download(tmp_path: Path, origin: Origin) -> None:
    env = install_echo_plugin(tmp_path / "site")
    first, second = blob(1000, 6), blob(1500, 7)
    entry = {"id": "swap", "type": "llm", "inference_engine": "echo"}
    server = ServerProcess(tmp_path, config={"models": [{**entry, "path": origin.add_file("v1.bin", first)}]}, env=env)
    server.start()
    try:
        wait_for(server, "swap", lambda b: b["status"] == "completed")
        server.stop()
        server = ServerProcess(tmp_path, config={"models": [{**entry, "path": origin.add_file("v2.bin", second)}]}, env=env)
        server.start()
        done = wait_for(server, "swap", lambda b: b["status"] == "completed" and b["url"].endswith("v2.bin"))
    finally:
        server.stop()
    assert Path(done["local_path"]).read_bytes() == second


def test_second_server_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path)
    first.start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "kernel.cli", "serve", "--port", "1",
             "--models-dir", str(tmp_path / "models"), "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        first.stop()
    assert second.returncode != 0
    assert "modelkernel.lock" in second.stderr and "Traceback" not in second.stderr


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        (lambda db: db.write_bytes(b"this is not a database" * 100), "unusable"),
        (lambda db: sqlite3.connect(db).execute("PRAGMA user_version=99").connection.commit(), "newer"),
    ],
)
def test_corrupt_or_newer_database_gives_a_clear_error(tmp_path: Path, prepare: Any, expected: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    prepare(state / "modelkernel.db")
    result = subprocess.run(
        [sys.executable, "-m", "kernel.cli", "serve", "--port", "1",
         "--models-dir", str(tmp_path / "models"), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_a_segmented_download_resumes_every_segment_after_kill_9(tmp_path: Path, origin: Origin) -> None:
    data = blob(32 << 20, 9)  # pieces are at least 4 MiB
    url = origin.add_file("segkill.bin", data)
    origin.faults.throttle_bps = 1 << 20  # per connection: one connection, then four
    config = {"downloads": {"connections": 4, "segment_min_bytes": 1 << 20}}
    server = ServerProcess(tmp_path, config=config)
    server.start()
    try:
        create(server, "segkill", url)
        # Split into four within a second; progress is checkpointed every second: the saved segment
        # table has four segments, each moved past its start, by the time 8 MiB are in.
        wait_for(server, "segkill", lambda b: b["progress"]["downloaded_bytes"] > 8 << 20)
        server.kill()
        origin.requests.clear()
        origin.faults.throttle_bps = None
        server.start()
        done = wait_for(server, "segkill", lambda b: b["status"] == "completed")
    finally:
        server.stop()
    assert Path(done["local_path"]).read_bytes() == data
    ranges = [r.headers["range"] for r in origin.requests_for("segkill.bin") if r.method == "GET"]
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in ranges)
    ends = sorted(int(r.split("-")[1]) + 1 for r in ranges)
    assert starts[0] > 0  # the first segment continued, not restarted
    # every started segment continued from where it had got to, on its own connection (a range
    # that starts where none ends); the rest of the file, not started, came in pieces after them
    assert len([start for start in starts if start not in ends]) == 4

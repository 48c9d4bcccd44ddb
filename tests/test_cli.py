"""The client commands of ``modelkernel`` against the real app (uvicorn in the test's loop).

``main(argv)`` runs in a worker thread so the loop keeps serving; one test runs the real
``python -m kernel.cli`` process to check the exit status a shell sees.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from kernel.api.app import create_app
from kernel.cli import main
from kernel.config import AuthSettings, Settings
from kernel.core import Kernel
from tests.conftest import make_settings
from tests.helpers.api import wait_status
from tests.helpers.origin import Origin
from tests.helpers.server import AppServer, free_port


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[AppServer]:
    async with AppServer(create_app(Kernel(settings, load_entrypoints=False))) as running:
        yield running


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No developer env vars; the in-process server's log lines are captured, not printed
    (stdout is the CLI's output here)."""
    monkeypatch.delenv("MODELKERNEL_SERVER", raising=False)
    monkeypatch.delenv("MODELKERNEL_API_KEY", raising=False)
    with structlog.testing.capture_logs():
        yield


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_pull_wait_exits_0_with_the_file_in_place(
    server: AppServer, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    data = hashlib.shake_256(b"cli").digest(300_000)
    origin.faults.throttle_bps = 1_000_000
    url = origin.add_file("pulled.bin", data)
    code = await cli(
        "--server",
        server.url,
        "pull",
        url,
        "--id",
        "pulled",
        "--wait",
        "--sha256",
        hashlib.sha256(data).hexdigest(),
        "--filename",
        "renamed.bin",
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    path = Path(out.strip().rsplit(" -> ", 1)[1])
    assert out.startswith("pulled: completed -> ")
    assert path.name == "renamed.bin"
    assert path.read_bytes() == data
    assert not path.with_name("renamed.bin.part").exists()


async def test_pull_wait_exits_4_when_the_download_fails(
    server: AppServer, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await cli(
        "--server", server.url, "pull", origin.url("missing.bin"), "--id", "nope", "--wait"
    )
    err = capsys.readouterr().err
    assert code == 4
    assert "nope failed: Not found (HTTP 404)" in err


async def test_ls_show_pause_resume_and_cancel_change_server_state(
    server: AppServer,
    origin: Origin,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELKERNEL_SERVER", server.url)  # the env var instead of --server
    http = httpx.AsyncClient(base_url=server.url, timeout=5)
    origin.faults.throttle_bps = 100_000
    for name in ("alpha", "beta"):
        assert await cli("pull", origin.add_file(f"{name}.bin", b"x" * 500_000), "--id", name) == 0
        await wait_status(http, name, "downloading")
    assert re.match(r"alpha: (queued|downloading) -> .*alpha\.bin$", capsys.readouterr().out, re.M)

    assert await cli("ls") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MODEL", "ID", "STATUS", "PROGRESS", "DOWNLOADED", "SPEED", "ETA"]
    assert [row.split()[:2] for row in table[1:]] == [
        ["alpha", "downloading"],
        ["beta", "downloading"],
    ]

    assert await cli("pause", "alpha") == 0
    assert capsys.readouterr().out == "Download paused successfully: alpha\n"
    assert (await http.get("/v1/downloads/alpha")).json()["status"] == "paused"
    assert await cli("show", "alpha") == 0
    shown = capsys.readouterr().out
    assert "status:" in shown
    assert "paused" in shown
    assert "local_path:" in shown
    assert await cli("resume", "alpha") == 0
    await wait_status(http, "alpha", "downloading")

    assert await cli("cancel", "beta") == 0
    assert "Download cancelled successfully: beta" in capsys.readouterr().out
    assert (await http.get("/v1/downloads/beta")).json()["status"] == "cancelled"
    assert await cli("ls", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [d["model_id"] for d in listing["active_downloads"]] == ["alpha"]

    assert await cli("cancel", "--all") == 0
    assert "Cancelled 1 download(s)" in capsys.readouterr().out
    assert await cli("ls") == 0
    assert capsys.readouterr().out == "No active downloads.\n"
    assert await cli("ls", "--all", "--json") == 0
    statuses = {
        d["model_id"]: d["status"] for d in json.loads(capsys.readouterr().out)["active_downloads"]
    }
    assert statuses == {"alpha": "cancelled", "beta": "cancelled"}
    assert await cli("show", "alpha", "--json") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    await http.aclose()


async def test_api_errors_exit_1_with_the_message_and_usage_errors_exit_2(
    server: AppServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("--server", server.url, "pause", "ghost") == 1
    assert capsys.readouterr().err == "modelkernel: No download found for model ID: ghost\n"
    assert await cli("--server", server.url, "cancel") == 2  # an ID or --all
    assert await cli("pull", "http://x/y") == 2  # --id is required
    assert await cli("--server", f"http://127.0.0.1:{free_port()}", "ls") == 3
    assert "Cannot connect to" in capsys.readouterr().err


async def test_a_wrong_key_exits_nonzero_with_the_api_message(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings.auth = AuthSettings(require_api_key=True, api_keys=["right"])
    async with AppServer(create_app(Kernel(settings, load_entrypoints=False))) as secured:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kernel.cli",
            "ls",
            "--server",
            secured.url,
            "--api-key",
            "wrong",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1
        assert err.decode() == (
            "modelkernel: Invalid or missing API key: send X-API-Key or Authorization: Bearer.\n"
        )
        assert out == b""
        assert await cli("--server", secured.url, "--api-key", "right", "ls") == 0
        assert await cli("ls", "--server", secured.url, "--api-key", "right") == 0  # after, too

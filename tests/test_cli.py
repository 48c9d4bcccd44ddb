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
from kernel.cli import main, model_id_from_ref
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
        assert (
            await cli(
                "pull", origin.add_file(f"{name}.bin", b"x" * 500_000), "--id", name, "--detach"
            )
            == 0
        )
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
    assert await cli("pull", "https://example.com/") == 2  # no id can be derived from it
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


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (
            "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
            "qwen2.5-0.5b-instruct-q4_k_m",
        ),
        ("hf://owner/repo/sub/dir/Model-Q8_0.gguf@v1.0", "model-q8_0"),
        ("hf://owner/Big-GGUF/big-q4-00001-of-00003.gguf", "big-q4"),
        ("hf://owner/Big-GGUF/*Q4_K_M*.gguf", "big-gguf"),
        ("hf://owner/Some Repo", "some-repo"),
        ("https://cdn.example.com/files/Tiny%20Model.GGUF?token=abc#frag", "tiny-20model"),
        ("https://example.com/models/llama.v2.bin", "llama.v2"),
        ("https://example.com/", None),
        ("https://example.com/___", None),
        ("hf://owner/repo/???", "repo"),
    ],
)
def test_model_id_from_ref_follows_the_documented_rule(ref: str, expected: str | None) -> None:
    assert model_id_from_ref(ref) == expected


async def test_pull_without_id_derives_it_and_waits_by_default(
    server: AppServer, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    data = b"d" * 200_000
    url = origin.add_file("Derived-Model.Q4_K_M.bin", data)
    assert await cli("--server", server.url, "pull", url) == 0
    out = capsys.readouterr().out
    assert out.startswith("derived-model.q4_k_m: completed -> ")
    assert Path(out.strip().rsplit(" -> ", 1)[1]).read_bytes() == data


async def test_pull_reports_a_derived_id_that_names_another_file(
    server: AppServer, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    first = origin.add_file("a/same.bin", b"1" * 1000)
    second = origin.add_file("b/same.bin", b"2" * 1000)
    assert await cli("--server", server.url, "pull", first) == 0
    capsys.readouterr()
    assert await cli("--server", server.url, "pull", second, "--detach") == 1
    err = capsys.readouterr().err
    assert f"the model id 'same' (derived from REF) is already used by {first}" in err
    assert "--id" in err
    # The same reference again is no clash: it is pulled (checked) again under its id.
    assert await cli("--server", server.url, "pull", first) == 0
    assert capsys.readouterr().out.startswith("same: completed -> ")


async def test_pull_detach_returns_before_the_download_ends(
    server: AppServer, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    origin.faults.throttle_bps = 100_000
    url = origin.add_file("slow-detach.bin", b"s" * 2_000_000)
    assert await cli("--server", server.url, "pull", url, "--detach") == 0
    assert re.match(r"slow-detach: (queued|downloading) -> ", capsys.readouterr().out)
    assert await cli("--server", server.url, "cancel", "slow-detach") == 0


async def test_rm_forgets_the_download_and_deletes_its_file(
    server: AppServer, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    url = origin.add_file("gone.bin", b"g" * 5000)
    assert await cli("--server", server.url, "pull", url, "--id", "gone") == 0
    path = Path(capsys.readouterr().out.strip().rsplit(" -> ", 1)[1])
    assert path.exists()
    assert await cli("--server", server.url, "rm", "gone") == 0
    assert capsys.readouterr().out == "Removed gone and its file\n"
    assert not path.exists()
    assert await cli("--server", server.url, "show", "gone") == 1
    assert await cli("--server", server.url, "rm", "gone") == 1


async def test_models_lists_what_the_server_has_models_for(
    tmp_path: Path, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    async with AppServer(create_app(Kernel(make_settings(tmp_path)))) as full:
        assert await cli("--server", full.url, "models") == 0
        assert capsys.readouterr().out == "No models.\n"
        origin.faults.throttle_bps = 50_000
        url = origin.add_file("listed.gguf", b"GGUF" + b"\0" * 500_000)
        async with httpx.AsyncClient(base_url=full.url, timeout=5) as http:
            added = await http.post(
                "/v1/models", json={"model_id": "listed", "model_path": url, "model_type": "llm"}
            )
            assert added.status_code == 202, added.text
            assert await cli("--server", full.url, "models") == 0
            table = capsys.readouterr().out.splitlines()
            assert table[0].split() == ["MODEL", "ID", "STATUS", "TYPE", "ENGINE", "PATH"]
            row = table[1].split()
            assert row[0] == "listed"
            assert row[1] in ("queued", "downloading")
            assert row[2] == "llm"
            await http.delete("/v1/models/listed")

"""HTTPS downloads: trust (SSL_CERT_FILE, network.ca_bundle), certificate failures that are
permanent and say why, resumes with Range over TLS, and a real server process that trusts
only the CA named in its environment."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from kernel.config import NetworkSettings, Settings
from kernel.tls import tls_context
from tests.conftest import make_settings
from tests.helpers.api import wait_for, wait_status
from tests.helpers.data import blob
from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess
from tests.helpers.tls import TestCA


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tls_origin(tls_server: Origin) -> Iterator[Origin]:
    try:
        yield tls_server
    finally:
        tls_server.reset()


@pytest.fixture
def trust_ca(monkeypatch: pytest.MonkeyPatch, ca: TestCA) -> None:
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))


@pytest.fixture
def no_env_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


async def create(client: Any, model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url, **extra})
    assert response.status_code == 202, response.text
    return response.json()


async def test_https_download_trusts_ssl_cert_file(
    client: Any, tls_origin: Origin, trust_ca: None
) -> None:
    data = blob(3 << 20)
    url = tls_origin.add_file("tls.bin", data)
    assert url.startswith("https://")
    await create(client, "tls", url)
    done = await wait_status(client, "tls", "completed", "failed")
    assert done["status"] == "completed", done
    assert sha(Path(done["local_path"]).read_bytes()) == sha(data)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Parametrized indirectly with "ca_bundle": network.ca_bundle set to the test CA."""
    base = make_settings(tmp_path)
    if getattr(request, "param", None) != "ca_bundle":
        return base
    ca: TestCA = request.getfixturevalue("ca")
    return msgspec.structs.replace(base, network=NetworkSettings(ca_bundle=str(ca.ca_file)))


@pytest.mark.parametrize("settings", ["ca_bundle"], indirect=True)
async def test_https_download_trusts_the_ca_bundle_setting(
    client: Any, tls_origin: Origin, no_env_trust: None
) -> None:
    data = blob(1 << 20, 1)
    url = tls_origin.add_file("bundle.bin", data)
    await create(client, "bundle", url)
    done = await wait_status(client, "bundle", "completed", "failed")
    assert done["status"] == "completed", done


async def failure_of(client: Any, model_id: str, url: str) -> str:
    await create(client, model_id, url)
    failed = await wait_status(client, model_id, "failed", "completed")
    assert failed["status"] == "failed", failed
    message: str = failed["error_message"]
    assert "attempts" not in message  # permanent: failed at once, not after the retries
    return message


async def test_an_unknown_ca_fails_at_once_naming_the_host_and_the_reason(
    client: Any, tls_origin: Origin, no_env_trust: None
) -> None:
    url = tls_origin.add_file("untrusted.bin", blob(1000, 2))
    message = await failure_of(client, "untrusted", url)
    host = url.split("/")[2]
    assert message.startswith(f"TLS certificate check failed for {host}: ")
    assert "unknown CA" in message
    assert "SSL_CERT_FILE" in message  # says how to trust a private CA
    assert tls_origin.requests_for("untrusted.bin") == []  # no request went over it


@pytest.mark.parametrize(
    ("label", "names", "expired", "reason"),
    [
        ("mismatch", ("other.example",), False, "does not name this"),
        ("expired", ("127.0.0.1",), True, "has expired"),
    ],
)
async def test_bad_certificates_fail_at_once_with_the_reason(
    client: Any, ca: TestCA, trust_ca: None,
    label: str, names: tuple[str, ...], expired: bool, reason: str,
) -> None:  # fmt: skip
    with Origin(tls=ca.issue(label, names, expired=expired)) as bad:
        url = bad.add_file(f"{label}.bin", blob(1000, 3))
        message = await failure_of(client, label, url)
        assert message.startswith(f"TLS certificate check failed for {url.split('/')[2]}: ")
        assert reason in message
        assert bad.requests == []


async def test_pause_and_resume_over_tls_sends_range_with_if_range(
    client: Any, tls_origin: Origin, trust_ca: None
) -> None:
    data = blob(600_000, 4)
    url = tls_origin.add_file("resumable.bin", data)
    tls_origin.faults.throttle_bps = 300_000
    await create(client, "resumable", url)
    await wait_for(client, "resumable", lambda b: b["progress"]["downloaded_bytes"] > 0)
    response = await client.post("/v1/downloads/resumable/pause")
    assert response.status_code == 200, response.text
    paused = (await client.get("/v1/downloads/resumable")).json()
    at_pause = paused["progress"]["downloaded_bytes"]
    assert 0 < at_pause < len(data)
    assert Path(paused["local_path"] + ".part").stat().st_size == at_pause
    before = len(tls_origin.requests_for("resumable.bin"))
    tls_origin.faults.throttle_bps = None
    await client.post("/v1/downloads/resumable/resume")
    done = await wait_status(client, "resumable", "completed", "failed")
    assert done["status"] == "completed", done
    assert sha(Path(done["local_path"]).read_bytes()) == sha(data)
    gets = [r for r in tls_origin.requests_for("resumable.bin")[before:] if r.method == "GET"]
    assert gets[-1].headers["range"] == f"bytes={at_pause}-"
    assert gets[-1].headers["if-range"] == tls_origin._files["resumable.bin"].etag


def test_the_context_is_shared_per_trust_configuration(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    assert tls_context() is tls_context()
    assert tls_context(str(ca.ca_file)) is not tls_context()
    monkeypatch.delenv("SSL_CERT_FILE")
    assert tls_context() is not tls_context(str(ca.ca_file))


def test_a_server_with_only_ssl_cert_file_downloads_from_the_tls_origin(
    tmp_path: Path, ca: TestCA, tls_origin: Origin
) -> None:
    data = blob(2 << 20, 5)
    url = tls_origin.add_file("server.bin", data)
    env = {"SSL_CERT_FILE": str(ca.ca_file)}
    with ServerProcess(tmp_path, env=env) as server, httpx.Client(base_url=server.url) as api:
        created = api.post("/v1/downloads", json={"model_id": "served", "url": url})
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + 30
        body = created.json()
        while body["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
            body = api.get("/v1/downloads/served").json()
        assert body["status"] == "completed", (body, server.output()[-2000:])
    assert sha(Path(body["local_path"]).read_bytes()) == sha(data)


async def test_a_stall_over_tls_is_retried_with_a_range(
    tmp_path: Path, tls_origin: Origin, trust_ca: None
) -> None:
    from litestar.testing import AsyncTestClient

    from kernel.api.app import create_app
    from kernel.core import Kernel

    data = blob(400_000, 6)
    url = tls_origin.add_file("stall.bin", data)
    tls_origin.faults.stall_after = 150_000
    kernel = Kernel(make_settings(tmp_path, stall_timeout_s=0.5), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        await create(client, "stall", url)
        done = await wait_status(client, "stall", "completed", "failed", timeout=30)
    assert done["status"] == "completed", done
    assert sha(Path(done["local_path"]).read_bytes()) == sha(data)
    gets = [r for r in tls_origin.requests_for("stall.bin") if r.method == "GET"]
    assert len(gets) == 2 and gets[1].headers["range"].startswith("bytes=")
    assert gets[1].headers["range"] != "bytes=0-"

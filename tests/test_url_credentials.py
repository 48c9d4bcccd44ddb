"""Credentials in a URL (``http://user:pw@host/``, issue 13 item 4): used as Basic auth for
that host only, never shown to API clients, in events or in logs."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx

from kernel.api.app import create_app
from kernel.config import Settings
from kernel.core import Kernel
from kernel.log import redact_secrets
from kernel.validation import redact_url
from tests.helpers.api import wait_status
from tests.helpers.origin import Origin
from tests.helpers.server import AppServer, ServerProcess

SECRET = "s3cr3t-pw"


def _with_credentials(url: str, user: str = "alice", password: str = SECRET) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_credentials_go_as_basic_auth_to_that_host_and_never_in_the_host_header(
    client: Any, origin: Origin
) -> None:
    url = _with_credentials(origin.add_file("cred.bin", b"c" * 5000))
    await client.post("/v1/downloads", json={"model_id": "cred", "url": url})
    await wait_status(client, "cred", "completed")
    requests = origin.requests_for("cred.bin")
    assert requests
    for request in requests:
        assert request.headers.get("authorization") == _basic("alice", SECRET)
        assert SECRET not in request.headers["host"] and "alice" not in request.headers["host"]


async def test_credentials_are_not_sent_after_a_redirect_to_another_host(
    client: Any, origin: Origin
) -> None:
    target = origin.add_file("elsewhere.bin", b"e" * 5000).replace("127.0.0.1", "localhost")
    url = _with_credentials(origin.redirect("cred-hop", target))
    await client.post("/v1/downloads", json={"model_id": "credhop", "url": url})
    await wait_status(client, "credhop", "completed")
    assert origin.requests_for("cred-hop")[0].headers.get("authorization")
    elsewhere = origin.requests_for("elsewhere.bin")
    assert elsewhere
    assert all("authorization" not in r.headers for r in elsewhere)


async def test_api_replies_and_events_never_show_the_credentials(
    settings: Settings, origin: Origin
) -> None:
    url = _with_credentials(origin.add_file("shown.bin", b"s" * 5000))
    missing = _with_credentials(origin.url("missing.bin"))
    async with AppServer(create_app(Kernel(settings, load_entrypoints=False))) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=30) as http:  # fmt: skip
        created = await http.post("/v1/downloads", json={"model_id": "shown", "url": url})
        assert created.status_code == 202
        assert SECRET not in created.text
        assert created.json()["url"] == redact_url(url)
        await http.post("/v1/downloads", json={"model_id": "gone", "url": missing})
        await wait_status(http, "shown", "completed")
        failed = await wait_status(http, "gone", "failed")
        assert "404" in failed["error_message"]
        for path in ("/v1/downloads?status=all", "/v1/downloads/shown", "/v1/downloads/gone"):
            response = await http.get(path)
            assert SECRET not in response.text, path
        text = ""
        async with http.stream("GET", "/v1/events?last_event_id=0") as stream:
            async for chunk in stream.aiter_text():
                text += chunk
                if '"model_id":"gone","status":"failed"' in text:
                    break
    assert "shown" in text
    assert SECRET not in text


def test_redact_url_hides_only_the_userinfo() -> None:
    assert redact_url("http://a:b@h:8/p?q=1") == "http://***@h:8/p?q=1"
    assert redact_url("https://token@h/p") == "https://***@h/p"
    assert redact_url("http://u:p@ss@h/x") == "http://***@h/x"
    assert redact_url("http://h/p@x") == "http://h/p@x"
    assert redact_url("hf://owner/repo/f.gguf") == "hf://owner/repo/f.gguf"


def test_the_log_processor_redacts_nested_values_and_tracebacks() -> None:
    event = {
        "event": "download.created",
        "url": f"http://alice:{SECRET}@h/x",
        "nested": {"errors": [f"https://u:{SECRET}@h/y", 3]},
        "exception": [{"exc_value": f"cannot fetch http://alice:{SECRET}@h/z"}],
    }
    out = redact_secrets(None, "info", event)
    assert SECRET not in json.dumps(out)
    assert out["url"] == "http://***@h/x"
    assert out["nested"]["errors"][1] == 3


def test_the_server_log_never_carries_url_credentials(tmp_path: Path, origin: Origin) -> None:
    found = _with_credentials(origin.add_file("logged.bin", b"l" * 5000))
    missing = _with_credentials(origin.url("nowhere.bin"))
    with ServerProcess(tmp_path) as server:
        for model_id, url in (("logged", found), ("nowhere", missing)):
            response = httpx.post(f"{server.url}/v1/downloads", json={"model_id": model_id, "url": url})
            assert response.status_code == 202, response.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = httpx.get(f"{server.url}/v1/downloads?status=all").json()
            if {d["status"] for d in body["active_downloads"]} <= {"completed", "failed"}:
                break
            time.sleep(0.05)
        log = server.output()
    assert "download.created" in log and "nowhere.bin" in log
    assert SECRET not in log

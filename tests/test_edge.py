"""The edge against browsers: JSON-only bodies (415) and the Host check on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from kernel.api.app import create_app
from kernel.config import ServerSettings, Settings
from kernel.core import Kernel
from tests.helpers.api import assert_error
from tests.helpers.origin import Origin
from tests.helpers.server import AppServer

CREATE = {"model_id": "m1", "url": "http://127.0.0.1:9/x.bin"}


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        None,  # a body without any Content-Type
    ],
)
async def test_a_create_body_that_is_not_application_json_is_415(
    client: Any, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    body = b'{"model_id": "m1", "url": "http://127.0.0.1:9/x.bin"}'
    response = await client.post("/v1/downloads", content=body, headers=headers)
    assert_error(response, 415, "invalid_request_error", code="unsupported_media_type")
    assert (await client.get("/v1/downloads?status=all")).json()["active_downloads"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("PATCH", "/v1/settings"), ("POST", "/v1/models"), ("POST", "/downloads/cancel")],
)
async def test_every_write_route_refuses_a_text_plain_body(
    client: Any, method: str, path: str
) -> None:
    response = await client.request(
        method, path, content=b'{"action": "cancel_all"}', headers={"content-type": "text/plain"}
    )
    assert_error(response, 415, "invalid_request_error", code="unsupported_media_type")


async def test_json_with_a_charset_and_bodyless_actions_still_work(
    client: Any, origin: Origin
) -> None:
    url = origin.add_file("ok.bin", b"o" * 10)
    response = await client.post(
        "/v1/downloads",
        content=f'{{"model_id": "ok", "url": "{url}"}}'.encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202, response.text
    # curl -X POST sends neither a body nor a Content-Type: still the action's own answer
    assert_error(await client.post("/v1/downloads/ghost/pause"), 404, "not_found_error")


@pytest.fixture
async def loopback_server(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[str]:
    allowed = getattr(request, "param", [])
    settings.server = ServerSettings(host="127.0.0.1", allowed_hosts=allowed)
    async with AppServer(create_app(Kernel(settings, load_entrypoints=False))) as server:
        yield server.url


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8080", "attacker.test.", "127.0.0.1.nip.io"]
)
async def test_a_foreign_host_header_is_refused_on_loopback(
    loopback_server: str, host: str
) -> None:
    async with httpx.AsyncClient(base_url=loopback_server) as http:
        response = await http.post("/v1/downloads", json=CREATE, headers={"host": host})
        error = assert_error(response, 400, "invalid_request_error", code="invalid_host")
        assert "server.allowed_hosts" in error["message"]
        listing = await http.get("/v1/downloads?status=all", headers={"host": host})
        assert listing.status_code == 400
        assert (await http.get("/v1/downloads?status=all")).json()["active_downloads"] == []


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080", "app.localhost"]
)
async def test_loopback_names_pass_the_host_check(loopback_server: str, host: str) -> None:
    async with httpx.AsyncClient(base_url=loopback_server) as http:
        response = await http.get("/v1/downloads", headers={"host": host})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("loopback_server", [["models.lan", ".corp.example"]], indirect=True)
async def test_server_allowed_hosts_adds_names(loopback_server: str) -> None:
    async with httpx.AsyncClient(base_url=loopback_server) as http:
        for host in ("models.lan:8080", "MODELS.LAN", "a.corp.example"):
            response = await http.get("/v1/downloads", headers={"host": host})
            assert response.status_code == 200, (host, response.text)
        response = await http.get("/v1/downloads", headers={"host": "corp.example.evil"})
        assert response.status_code == 400


async def test_the_health_check_answers_whatever_the_host(loopback_server: str) -> None:
    async with httpx.AsyncClient(base_url=loopback_server) as http:
        response = await http.get("/health", headers={"host": "evil.example"})
        assert response.status_code == 200

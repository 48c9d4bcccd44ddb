"""Proxies from the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), against a real forward
proxy on loopback (tests/helpers/proxy.py): a CONNECT tunnel for https, absolute-form for
http, credentials from the proxy URL, bypass by NO_PROXY."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel._http_wire import open_response, proxy_for
from kernel.errors import PermanentError
from kernel.tls import tls_context
from tests.helpers.api import wait_status
from tests.helpers.data import blob
from tests.helpers.origin import Origin
from tests.helpers.proxy import Proxy
from tests.helpers.tls import TestCA

PROXY_VARS = [
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    for name in (base, base.lower())
]


@pytest.fixture(autouse=True)
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tls_origin(tls_server: Origin, monkeypatch: pytest.MonkeyPatch, ca: TestCA) -> Iterator[Origin]:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    try:
        yield tls_server
    finally:
        tls_server.reset()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as server:
        yield server


async def download(client: Any, model_id: str, url: str) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url})
    assert response.status_code == 202, response.text
    done = await wait_status(client, model_id, "completed", "failed")
    assert done["status"] == "completed", done
    return done


async def test_https_goes_through_a_connect_tunnel(
    client: Any, tls_origin: Origin, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    data = blob(2 << 20, 1)
    url = tls_origin.add_file("tunnelled.bin", data)
    done = await download(client, "tunnelled", url)
    assert Path(done["local_path"]).read_bytes() == data
    authority = url.split("/")[2]
    connects = [r for r in proxy.requests if r.method == "CONNECT"]
    assert len(connects) >= 2  # the probe (httpx) and the body (the fast path)
    assert all(r.target == authority for r in connects)
    assert len(connects) == len(proxy.requests)  # the proxy saw no plain request
    assert [r.method for r in tls_origin.requests_for("tunnelled.bin")][-1] == "GET"


async def test_http_is_sent_to_the_proxy_in_absolute_form(
    client: Any, origin: Origin, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", proxy.url)
    data = blob(1 << 20, 2)
    url = origin.add_file("forwarded.bin", data)
    done = await download(client, "forwarded", url)
    assert Path(done["local_path"]).read_bytes() == data
    gets = [r for r in proxy.requests if r.method == "GET"]
    assert gets and gets[-1].target == url
    assert gets[-1].headers["host"] == url.split("/")[2]


async def test_no_proxy_bypasses_the_proxy(
    client: Any, tls_origin: Origin, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    url = tls_origin.add_file("direct.bin", blob(100_000, 3))
    await download(client, "direct", url)
    assert proxy.requests == []


async def test_proxy_credentials_come_from_the_proxy_url(
    client: Any, tls_origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Proxy(credentials="user:s3cret") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        data = blob(300_000, 4)
        done = await download(client, "authed", tls_origin.add_file("authed.bin", data))
        assert Path(done["local_path"]).read_bytes() == data
        assert proxy.requests and all("proxy-authorization" in r.headers for r in proxy.requests)


def test_a_proxy_that_wants_credentials_is_a_permanent_failure_saying_so(
    tls_origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = tls_origin.add_file("refused.bin", blob(1000, 5))
    with Proxy(credentials="user:s3cret") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("user:s3cret@", ""))
        with pytest.raises(PermanentError) as excinfo:
            open_response(url, {}, tls=tls_context())
    assert "requires authentication (HTTP 407)" in excinfo.value.message


def test_proxy_for_reads_the_environment_like_curl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://p:3128")
    monkeypatch.setenv("http_proxy", "http://q:8080")
    monkeypatch.setenv("NO_PROXY", ".internal,10.0.0.5")
    assert proxy_for("https://cdn.example/x") == "http://p:3128"
    assert proxy_for("http://cdn.example/x") == "http://q:8080"
    assert proxy_for("https://mirror.internal/x") is None
    assert proxy_for("https://10.0.0.5:8443/x") is None
    monkeypatch.setenv("NO_PROXY", "*")
    assert proxy_for("https://cdn.example/x") is None

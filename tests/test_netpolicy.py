"""The destination policy (issue 13, item 1): refused destinations are a 400 at create naming
the setting, or a failed download when a redirect or a resolved name leads there, decided
before connecting; loopback stays allowed by default (every other test uses 127.0.0.1)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from kernel._http_wire import open_response
from kernel.api.app import create_app
from kernel.config import HubSettings, NetworkSettings, SourcesSettings
from kernel.core import Kernel
from kernel.errors import PermanentError
from kernel.netpolicy import DestinationDenied, NetPolicy
from kernel.tls import tls_context
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_status
from tests.helpers.hub import Hub
from tests.helpers.origin import Origin


async def _client(tmp_path: Path, **network: Any) -> AsyncIterator[Any]:
    settings = make_settings(tmp_path)
    settings.network = NetworkSettings(**network)
    kernel = Kernel(settings, load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        yield client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Any]:
    async for client in _client(tmp_path):
        yield client


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A socket listening on 127.0.0.2 that must never see a connection."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here")
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


def _never_connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return True
    return False


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "2852039166",  # 169.254.169.254 in decimal
        "0xa9.0xfe.0xa9.0xfe",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
        "[fd00:ec2::254]",
        "[fe80::1]",
        "100.100.100.200",
        "metadata.google.internal",
        "METADATA.GOOGLE.INTERNAL.",
    ],
)
async def test_metadata_and_link_local_destinations_are_400_at_create(
    client: Any, host: str
) -> None:
    body = {"model_id": "meta", "url": f"http://{host}/latest/meta-data/"}
    error = assert_error(
        await client.post("/v1/downloads", json=body), 400, "invalid_request_error",
        param="url", code="destination_denied",
    )  # fmt: skip
    assert "network.allow" in error["message"]
    assert (await client.get("/v1/downloads?status=all")).json()["active_downloads"] == []


async def test_loopback_is_allowed_by_default(client: Any, origin: Origin) -> None:
    url = origin.add_file("local.bin", b"l" * 1000)
    await client.post("/v1/downloads", json={"model_id": "local", "url": url})
    await wait_status(client, "local", "completed")


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "2130706433", "[::1]", "localhost",
                                  "[::ffff:127.0.0.1]", "10.0.0.8", "192.168.1.1"])
async def test_deny_private_refuses_loopback_and_private_hosts_at_create(
    tmp_path: Path, host: str
) -> None:
    async for client in _client(tmp_path, deny_private=True):
        body = {"model_id": "priv", "url": f"http://{host}:8080/x.bin"}
        error = assert_error(
            await client.post("/v1/downloads", json=body), 400, "invalid_request_error",
            param="url", code="destination_denied",
        )  # fmt: skip
        assert "network.deny_private" in error["message"]


async def test_network_allow_wins_over_deny_private(tmp_path: Path, origin: Origin) -> None:
    url = origin.add_file("allowed.bin", b"a" * 1000)
    async for client in _client(tmp_path, deny_private=True, allow=["127.0.0.1/32"]):
        await client.post("/v1/downloads", json={"model_id": "allowed", "url": url})
        await wait_status(client, "allowed", "completed")


async def test_a_redirect_to_the_metadata_address_fails_naming_the_setting(
    client: Any, origin: Origin
) -> None:
    url = origin.redirect("to-meta", "http://169.254.169.254/latest/meta-data/iam/")
    await client.post("/v1/downloads", json={"model_id": "tometa", "url": url})
    failed = await wait_status(client, "tometa", "failed")
    assert "network policy" in failed["error_message"]
    assert "network.allow" in failed["error_message"]
    assert len(origin.requests_for("to-meta")) == 1  # refused for good: no retries


async def test_a_redirect_to_a_denied_address_fails_without_connecting(
    tmp_path: Path, origin: Origin, listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    url = origin.redirect("to-denied", f"http://127.0.0.2:{port}/secret")
    async for client in _client(tmp_path, deny=["127.0.0.2/32"]):
        await client.post("/v1/downloads", json={"model_id": "todenied", "url": url})
        failed = await wait_status(client, "todenied", "failed")
        assert "network.deny" in failed["error_message"]
    assert _never_connected(sock)


async def test_a_name_that_resolves_to_a_denied_address_fails_at_connect(
    tmp_path: Path, origin: Origin
) -> None:
    url = origin.add_file("named.bin", b"n" * 1000).replace("127.0.0.1", "localhost")
    async for client in _client(tmp_path, deny=["127.0.0.0/8", "::1/128"]):
        assert (await client.post("/v1/downloads", json={"model_id": "named", "url": url})).status_code == 202
        failed = await wait_status(client, "named", "failed")
        assert "network.deny" in failed["error_message"]
    assert origin.requests_for("named.bin") == []


def test_the_fast_path_checks_each_address_before_connecting(
    origin: Origin, listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    policy = NetPolicy(NetworkSettings(deny=["127.0.0.2"]))
    with pytest.raises(DestinationDenied):
        open_response(f"http://127.0.0.2:{port}/x", {}, tls=tls_context(None),
                      check_address=policy.check_address)  # fmt: skip
    assert _never_connected(sock)
    # and each redirect hop: the origin is allowed, where it points is not
    url = origin.redirect("hop", f"http://127.0.0.2:{port}/x")
    with pytest.raises(PermanentError, match="network.deny"):
        open_response(url, {}, tls=tls_context(None), check_address=policy.check_address)
    assert _never_connected(sock)


async def test_a_checksum_mismatch_does_not_disclose_the_digest_of_what_was_fetched(
    client: Any, origin: Origin
) -> None:
    data = b"internal secret response" * 100
    url = origin.add_file("secret.bin", data)
    await client.post("/v1/downloads", json={"model_id": "secret", "url": url, "sha256": "0" * 64})
    failed = await wait_status(client, "secret", "failed")
    assert "Checksum mismatch" in failed["error_message"]
    assert hashlib.sha256(data).hexdigest() not in str(failed)


async def test_a_hub_redirect_to_a_denied_cdn_fails_naming_the_setting(tmp_path: Path) -> None:
    data = b"GGUF" + b"\x03\x00\x00\x00" + bytes(200_000)
    with Origin(host="localhost") as cdn, Hub(cdn=cdn) as hub:
        hub.add_repo("owner/repo", {"model.gguf": data})
        settings = make_settings(tmp_path)
        settings.sources = SourcesSettings(huggingface=HubSettings(endpoint=hub.base_url))
        settings.network = NetworkSettings(deny=["localhost"])
        kernel = Kernel(settings, load_entrypoints=False)
        async with AsyncTestClient(app=create_app(kernel)) as client:
            body = {"model_id": "hubbed", "url": "hf://owner/repo/model.gguf"}
            assert (await client.post("/v1/downloads", json=body)).status_code == 202
            failed = await wait_status(client, "hubbed", "failed")
            assert "network.deny" in failed["error_message"]
        assert cdn.requests_for(Hub.blob_name(data)) == []

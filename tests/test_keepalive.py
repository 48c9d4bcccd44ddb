"""Kept-alive connections on the fast path (kernel/_http_wire.py): a body read to its length
leaves its connection for the next request with the same origin, proxy, TLS context and
address checker; anything else (a cut or interrupted body, ``Connection: close``, another
policy) gets a new connection, and a connection the server closed while idle is replaced
without the caller noticing."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

import kernel._http_wire
import kernel.segments
from kernel._http_wire import _POOL, Response, open_response
from kernel.api.app import create_app
from kernel.config import NetworkSettings
from kernel.core import Kernel
from kernel.netpolicy import DestinationDenied, NetPolicy
from kernel.tls import tls_context
from tests.conftest import make_settings
from tests.helpers.api import wait_for, wait_status
from tests.helpers.data import blob
from tests.helpers.origin import Origin
from tests.helpers.tls import TestCA

MiB = 1 << 20
TLS = tls_context()


def read_all(response: Response) -> bytes:
    buffer = bytearray(1 << 20)
    out = bytearray()
    while n := response.readinto_blocking(memoryview(buffer), 0.25):
        out += buffer[:n]
    return bytes(out)


def get(url: str, **options: Any) -> bytes:
    """One GET on the fast path, its body read to the end and the response closed."""
    response = open_response(url, {}, tls=options.pop("tls", TLS), **options)
    try:
        assert response.status_code == 200
        return read_all(response)
    finally:
        response.close()


def clients(origin: Origin, name: str) -> list[tuple[str, int] | None]:
    return [r.client for r in origin.requests_for(name)]


def test_a_body_read_to_its_end_leaves_its_connection_for_the_next_request(
    origin: Origin,
) -> None:
    data = blob(300_000, 1)
    url = origin.add_file("ka.bin", data)
    assert get(url) == data
    assert _POOL.count() == 1
    assert get(url) == data
    first, second = clients(origin, "ka.bin")
    assert first is not None
    assert first == second


def test_an_interrupted_or_unfinished_body_closes_its_connection(origin: Origin) -> None:
    data = blob(2 * MiB, 2)
    url = origin.add_file("cut.bin", data)
    for stop in ("interrupt", "unfinished"):
        response = open_response(url, {}, tls=TLS)
        assert response.readinto_blocking(memoryview(bytearray(64 << 10)), 0.25) > 0
        if stop == "interrupt":
            response.interrupt()
        assert not response.reusable
        response.close()
        assert _POOL.count() == 0
    assert get(url) == data  # the next request is answered in full, on a new connection
    assert len(set(clients(origin, "cut.bin"))) == 3


def test_a_redirect_is_followed_on_the_same_connection(origin: Origin) -> None:
    data = blob(100_000, 3)
    origin.add_file("moved-target.bin", data)
    url = origin.redirect("moved.bin", "moved-target.bin")
    assert get(url) == data
    assert get(url) == data
    hops = clients(origin, "moved.bin") + clients(origin, "moved-target.bin")
    assert len(hops) == 4
    assert len(set(hops)) == 1


def test_a_connection_checked_under_one_policy_never_serves_another(origin: Origin) -> None:
    data = blob(50_000, 4)
    url = origin.add_file("policy.bin", data)
    allowing = NetPolicy(NetworkSettings())
    denying = NetPolicy(NetworkSettings(deny_private=True))
    assert get(url, check_address=allowing.check_address) == data
    assert _POOL.count() == 1
    with pytest.raises(DestinationDenied):
        get(url, check_address=denying.check_address)
    other = NetPolicy(NetworkSettings())  # the same rules, another policy: a new connection
    assert get(url, check_address=other.check_address) == data
    assert get(url, check_address=allowing.check_address) == data
    first, second, third = clients(origin, "policy.bin")
    assert second != first
    assert third == first


class RawOrigin:
    """A plain HTTP server on a socket, to be exact about connections: it answers
    ``hello``, says ``Connection: close`` when ``say_close``, closes each connection after
    its answer without saying so when ``close_quietly`` (a server's idle timeout), and with
    ``drop_reused`` closes a connection that brings a second request without answering (the
    client's request crossed the server's FIN)."""

    def __init__(
        self, *, say_close: bool = False, close_quietly: bool = False, drop_reused: bool = False
    ) -> None:
        self.say_close = say_close
        self.close_quietly = close_quietly
        self.drop_reused = drop_reused
        self.connections = 0
        self.answered = 0
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hello"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            served = 0
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                data = data.split(b"\r\n\r\n", 1)[1]
                if served and self.drop_reused:
                    self.dropped += 1
                    return
                closing = b"Connection: close\r\n" if self.say_close else b""
                self.answered += 1  # counted before the client can see the answer
                served += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + closing + b"\r\nhello")
                if self.say_close or self.close_quietly:
                    return


@pytest.fixture
def raw_origin(request: pytest.FixtureRequest) -> Iterator[RawOrigin]:
    server = RawOrigin(**request.param)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize(
    "raw_origin", [{"drop_reused": True}, {"close_quietly": True}], indirect=True
)
def test_a_connection_closed_while_idle_is_replaced_without_an_error(
    raw_origin: RawOrigin,
) -> None:
    assert get(raw_origin.url) == b"hello"
    assert _POOL.count() == 1
    assert get(raw_origin.url) == b"hello"  # the kept connection fails; a new one answers
    assert (raw_origin.connections, raw_origin.answered) == (2, 2)
    assert raw_origin.dropped == (1 if raw_origin.drop_reused else 0)


def test_an_idle_connection_past_its_time_is_not_reused(
    origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob(10_000, 7)
    url = origin.add_file("idle.bin", data)
    monkeypatch.setattr(kernel._http_wire, "IDLE_S", 0.0)
    assert get(url) == data
    assert get(url) == data
    assert len(set(clients(origin, "idle.bin"))) == 2


@pytest.mark.parametrize("raw_origin", [{"say_close": True}], indirect=True)
def test_connection_close_from_the_server_is_honoured(raw_origin: RawOrigin) -> None:
    assert get(raw_origin.url) == b"hello"
    assert _POOL.count() == 0
    assert get(raw_origin.url) == b"hello"
    assert raw_origin.connections == 2


# --- a segmented download over HTTPS ---------------------------------------------------------


@pytest.fixture
def tls_origin(tls_server: Origin, monkeypatch: pytest.MonkeyPatch, ca: TestCA) -> Iterator[Origin]:
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    monkeypatch.setattr(kernel.segments, "MIN_PIECE", 256 << 10)  # many pieces in a few MiB
    try:
        yield tls_server
    finally:
        tls_server.reset()


async def test_a_segmented_https_download_reuses_its_connections(
    tmp_path: Path, tls_origin: Origin
) -> None:
    data = blob(6 * MiB + 77, 5)
    digest = hashlib.sha256(data).hexdigest()
    url = tls_origin.add_file("seg-ka.bin", data)
    tls_origin.faults.throttle_bps = MiB  # per connection: the download splits into pieces
    settings = make_settings(tmp_path, connections=4, segment_min_bytes=MiB)
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as client:
        body = {"model_id": "segka", "url": url, "sha256": digest}
        assert (await client.post("/v1/downloads", json=body)).status_code == 202
        done = await wait_status(client, "segka", "completed", timeout=60)
    assert Path(done["local_path"]).read_bytes() == data
    assert done["sha256"] == digest
    gets = [r for r in tls_origin.requests_for("seg-ka.bin") if r.method == "GET"]
    connections = {r.client for r in gets}
    assert len(gets) >= 8
    assert len(connections) < len(gets)


async def test_a_paused_segmented_download_resumes_right(
    tmp_path: Path, tls_origin: Origin
) -> None:
    data = blob(4 * MiB, 6)
    url = tls_origin.add_file("seg-pause.bin", data)
    tls_origin.faults.throttle_bps = MiB
    settings = make_settings(tmp_path, connections=4, segment_min_bytes=MiB)
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as client:
        body = {"model_id": "segp", "url": url}
        assert (await client.post("/v1/downloads", json=body)).status_code == 202
        await wait_for(client, "segp", lambda b: b["progress"]["downloaded_bytes"] > MiB, 30)
        await client.post("/v1/downloads/segp/pause")
        await wait_status(client, "segp", "paused")
        tls_origin.faults.throttle_bps = None
        await client.post("/v1/downloads/segp/resume")
        done = await wait_status(client, "segp", "completed", timeout=30)
    assert Path(done["local_path"]).read_bytes() == data

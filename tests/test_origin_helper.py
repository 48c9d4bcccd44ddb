"""Tests of the loopback origin test helper itself."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.origin import Origin

DATA = bytes(range(256)) * 1024  # 256 KiB
SIZE = len(DATA)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")]
    assert not logged


@pytest.fixture
def url(origin: Origin) -> str:
    return origin.add_file("data.bin", DATA)


def test_full_get(origin: Origin, client: httpx.Client, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"] == '"' + hashlib.sha256(DATA).hexdigest()[:16] + '"'
    assert r.headers["content-length"] == str(SIZE)
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["last-modified"].endswith(" GMT")
    assert [(q.method, q.path) for q in origin.requests_for("data.bin")] == [("GET", "/data.bin")]


def test_unknown_path_is_404(client: httpx.Client, origin: Origin) -> None:
    assert client.get(origin.url("missing.bin")).status_code == 404


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [("bytes=100-", 100, SIZE), ("bytes=10-19", 10, 20), ("bytes=-5", SIZE - 5, SIZE)],
)
def test_range(client: httpx.Client, url: str, spec: str, start: int, end: int) -> None:
    r = client.get(url, headers={"Range": spec})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert r.content == DATA[start:end]


def test_if_range(origin: Origin, client: httpx.Client, url: str) -> None:
    etag = client.head(url).headers["etag"]
    assert client.get(url, headers={"Range": "bytes=5-", "If-Range": etag}).status_code == 206
    origin.set_etag("data.bin", '"changed"')
    r = client.get(url, headers={"Range": "bytes=5-", "If-Range": etag})
    assert (r.status_code, r.content) == (200, DATA)
    origin.replace_file("data.bin", b"new")
    assert client.get(url).headers["etag"] not in (etag, '"changed"')


def test_ignore_range(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.ignore_range = True
    r = client.get(url, headers={"Range": "bytes=100-"})
    assert (r.status_code, r.content) == (200, DATA)
    assert "content-range" not in r.headers


def test_corrupt_at_flips_one_byte_in_every_body_covering_it(
    origin: Origin, client: httpx.Client, url: str
) -> None:
    origin.faults.corrupt_at = 1000
    whole, ranged = client.get(url).content, client.get(url, headers={"Range": "bytes=900-"})
    assert [i for i in range(SIZE) if whole[i] != DATA[i]] == [1000]
    assert whole[1000] == DATA[1000] ^ 0xFF
    assert ranged.content[100] == DATA[1000] ^ 0xFF and ranged.content[101:] == DATA[1001:]
    assert client.get(url, headers={"Range": "bytes=1001-"}).content == DATA[1001:]


def test_unsatisfiable_range(client: httpx.Client, url: str) -> None:
    r = client.get(url, headers={"Range": f"bytes={SIZE}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{SIZE}"


def test_head(client: httpx.Client, url: str) -> None:
    r = client.head(url)
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["content-length"] == str(SIZE)
    assert "etag" in r.headers
    assert r.headers["accept-ranges"] == "bytes"


def test_no_head(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.no_head = True
    assert client.head(url).status_code == 405
    assert client.get(url).status_code == 200


def test_fail_statuses(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.fail_statuses = [503, 429]
    origin.faults.retry_after = 7
    first, second, third = (client.get(url) for _ in range(3))
    assert (first.status_code, first.headers["retry-after"]) == (503, "7")
    assert second.status_code == 429
    assert (third.status_code, third.content) == (200, DATA)


def test_drop_after(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.drop_after = 100_000
    received = bytearray()
    with (
        client.stream("GET", url) as r,
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
    ):
        _read_into(r, received)
    assert bytes(received) == DATA[:100_000]
    assert client.get(url).content == DATA  # one-shot


def _read_into(response: httpx.Response, sink: bytearray) -> None:
    for chunk in response.iter_raw():
        sink += chunk


def test_short_body(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.short_body = 1000
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(url)
    assert client.get(url).content == DATA


def test_no_content_length(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.no_content_length = True
    r = client.get(url)
    assert "content-length" not in r.headers
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.content == DATA


def test_stall_and_release(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.stall_after = 70_000
    stalled: list[bool] = []

    def release() -> None:
        stalled.append(origin.wait_stalled(5))
        origin.release_stall()

    helper = threading.Thread(target=release)
    helper.start()
    assert client.get(url).content == DATA
    helper.join(5)
    assert stalled == [True]


def test_stall_then_client_disconnect(origin: Origin, client: httpx.Client, url: str) -> None:
    origin.faults.stall_after = 1000
    with client.stream("GET", url) as r:
        assert origin.wait_stalled(5)
        assert r.status_code == 200
    assert client.get(url).content == DATA  # server still healthy


def test_throttle(origin: Origin, client: httpx.Client) -> None:
    url = origin.add_file("throttled.bin", DATA[: 200 * 1024])
    origin.faults.throttle_bps = 400 * 1024
    began = time.monotonic()
    r = client.get(url)
    assert time.monotonic() - began >= 0.4
    assert r.content == DATA[: 200 * 1024]


def test_redirect(origin: Origin, client: httpx.Client, url: str) -> None:
    alias = origin.redirect("alias.bin", "data.bin")
    r = client.get(alias, follow_redirects=True)
    assert (r.status_code, r.content) == (200, DATA)
    assert [h.status_code for h in r.history] == [302]
    assert [q.path for q in origin.requests] == ["/alias.bin", "/data.bin"]

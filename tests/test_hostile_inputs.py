"""Inputs a hostile or careless client sends: each gets a real 4xx answer or a failure that
says what went wrong, never an internal error (issue 13, item 10)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from kernel.api.app import create_app
from kernel.config import Settings
from kernel.core import Kernel
from tests.helpers.api import assert_error, wait_status
from tests.helpers.disk import fill_disk_after
from tests.helpers.origin import Origin
from tests.helpers.server import AppServer

DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/downloads"),
        ("POST", "/v1/models"),
        ("POST", "/v1/downloads/x/priority"),
        ("PATCH", "/v1/settings"),
    ],
)
async def test_json_nested_50k_deep_is_400(client: Any, method: str, path: str) -> None:
    response = await client.request(
        method, path, content=DEEP, headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400, "invalid_request_error")
    assert "nested too deeply" in error["message"]


async def test_a_file_name_whose_part_file_exceeds_255_bytes_is_400(
    client: Any, origin: Origin
) -> None:
    url = origin.add_file("short.bin", b"s" * 10)
    too_long = {"model_id": "long", "url": url, "filename": "a" * 251}
    error = assert_error(
        await client.post("/v1/downloads", json=too_long), 400, "invalid_request_error",
        param="filename",
    )
    assert "250" in error["message"]
    multibyte = {"model_id": "long", "url": url, "filename": "é" * 126}  # 252 bytes
    assert_error(await client.post("/v1/downloads", json=multibyte), 400, "invalid_request_error",
                 param="filename")
    fits = {"model_id": "long", "url": url, "filename": "a" * 250}
    assert (await client.post("/v1/downloads", json=fits)).status_code == 202
    done = await wait_status(client, "long", "completed")
    assert Path(done["local_path"]).read_bytes() == b"s" * 10


async def test_a_url_whose_name_is_too_long_for_a_part_file_saves_under_the_model_id(
    client: Any, origin: Origin
) -> None:
    url = origin.add_file("b" * 253, b"b" * 10)
    response = await client.post("/v1/downloads", json={"model_id": "lb", "url": url})
    assert response.status_code == 202
    done = await wait_status(client, "lb", "completed")
    assert done["local_path"].endswith(os.path.join("lb", "lb.bin"))


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:99999/x", "port '99999'"),
        ("http://127.0.0.1:abc/x", "port 'abc'"),
        ("http://127.0.0.1:-1/x", "port '-1'"),
        ("http://127.0.0.1:0/x", "port '0'"),
        ("https://[::1/x", "not valid"),
        ("http://xn--/x", "international domain name"),
        ("http://xn--zz-zzz.com/x", "international domain name"),
        ("http://\u2603\u2603.invalid/x", "international domain name"),
        ("http://ex\u00e4mple..com/x", "empty label"),
        ("http://a..b/x", "empty label"),
        ("http://" + "a" * 64 + ".com/x", "longer than 63"),
        ("http:///x", "no host name"),
    ],
)
async def test_bad_ports_and_host_names_are_400_with_a_real_message(
    client: Any, url: str, words: str
) -> None:
    response = await client.post("/v1/downloads", json={"model_id": "bad", "url": url})
    error = assert_error(response, 400, "invalid_request_error", param="url")
    assert words in error["message"]
    assert "Internal" not in error["message"]
    assert (await client.get("/v1/downloads?status=all")).json()["active_downloads"] == []


async def test_an_international_host_name_is_accepted(client: Any) -> None:
    body = {"model_id": "idn", "url": "http://m\u00fcnchen.invalid:1/x.bin"}
    assert (await client.post("/v1/downloads", json=body)).status_code == 202
    await client.delete("/v1/downloads/idn")


async def test_a_redirect_loop_fails_with_a_message_that_says_so(
    client: Any, origin: Origin
) -> None:
    url = origin.redirect("loop-a", "loop-b")
    origin.redirect("loop-b", "loop-a")
    await client.post("/v1/downloads", json={"model_id": "loop", "url": url})
    failed = await wait_status(client, "loop", "failed")
    message = failed["error_message"]
    assert "redirect" in message and "loop" in message, message
    assert "Internal error" not in message
    assert len(origin.requests_for("loop-a")) <= 11  # one probe's worth: not retried


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("http://127.0.0.1:99999/x", "port '99999'"),
        ("http://xn--/x", "invalid URL"),
        ("ftp://127.0.0.1/x", "is not an http:// or https:// URL"),
    ],
)
async def test_a_redirect_to_a_malformed_url_fails_with_a_real_message(
    client: Any, origin: Origin, location: str, words: str
) -> None:
    url = origin.redirect("to-bad", location)
    await client.post("/v1/downloads", json={"model_id": "tobad", "url": url})
    failed = await wait_status(client, "tobad", "failed")
    assert words in failed["error_message"]
    assert "Internal error" not in failed["error_message"]
    assert len(origin.requests_for("to-bad")) == 1  # permanent: no retries


async def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(
    settings: Settings,
) -> None:
    body = b'{"action": "cancel_all"}'
    smuggled = (
        b"POST /v1/downloads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )

    def exchange(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(smuggled)
            data = b""
            while chunk := sock.recv(65536):  # the server closes: recv returns b""
                data += chunk
            return data

    async with AppServer(create_app(Kernel(settings, load_entrypoints=False))) as server:
        reply = await asyncio.to_thread(exchange, int(server.url.rsplit(":", 1)[1]))
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Length and Transfer-Encoding" in reply
    assert reply.count(b"HTTP/1.1 ") == 1  # the pipelined request was not served
    assert b"Bulk download cancellation" not in reply


async def test_a_full_disk_does_not_promise_a_resume_when_the_origin_has_no_ranges(
    client: Any, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = origin.add_file("noranges.bin", b"n" * (3 << 20))
    fill_disk_after(monkeypatch, 1 << 20)
    origin.faults.no_ranges = True
    origin.faults.throttle_bps = 4 << 20  # several writes, so the disk fills mid-file
    await client.post("/v1/downloads", json={"model_id": "nr", "url": url})
    failed = await wait_status(client, "nr", "failed")
    message = failed["error_message"]
    assert "disk is full" in message and "start over" in message, message
    assert "continues from the partial file" not in message

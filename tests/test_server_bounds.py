"""The server's resource bounds (issue 13, item 9): idle sockets past the open-file limit never
starve /health or a running download, a connection that sends no request head is closed, the
soft open-file limit is raised at start, and a repeated loop error is logged once."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import kernel._files
from kernel.serving import RateLimitedErrors
from tests.helpers.api import wait_status
from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="open-file limits as on Linux")


class LimitedServer(ServerProcess):
    """The server started under an open-file limit (soft, hard)."""

    def __init__(self, tmp_path: Path, nofile: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(tmp_path, **kwargs)
        self.nofile = nofile

    def command(self) -> list[str]:
        argv = super().command()
        wrap = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, {self.nofile!r}); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        return [sys.executable, "-c", wrap, *argv[1:]]


def _open_idle(port: int, count: int) -> list[socket.socket]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:  # this test process needs the descriptors itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_sockets_past_the_open_file_limit_starve_neither_health_nor_a_download(
    tmp_path: Path, origin: Origin
) -> None:
    data = os.urandom(600_000)
    url = origin.add_file("flood.bin", data)
    origin.faults.throttle_bps = 200_000  # about 3 s: it runs through the flood
    with LimitedServer(tmp_path, (256, 256)) as server:
        created = httpx.post(f"{server.url}/v1/downloads", json={"model_id": "flood", "url": url})
        assert created.status_code == 202, created.text
        log_before = server.log_path.stat().st_size
        idle = _open_idle(server.port, 300)
        try:
            started = time.monotonic()
            health = httpx.get(f"{server.url}/health", timeout=15)
            answered_in = time.monotonic() - started
            assert health.status_code == 200
            assert answered_in < 10, answered_in
            deadline = time.monotonic() + 60
            body: dict[str, Any] = {}
            while time.monotonic() < deadline:
                body = httpx.get(f"{server.url}/v1/downloads/flood", timeout=15).json()
                if body["status"] in ("completed", "failed"):
                    break
                time.sleep(0.1)
            assert body["status"] == "completed", body
            assert Path(body["local_path"]).read_bytes() == data
            closed = sum(_closed_by_server(s) for s in idle)
            assert closed >= 200, closed  # evicted or timed out, not held
        finally:
            for sock in idle:
                sock.close()
        grown = server.log_path.stat().st_size - log_before
        assert grown < 64_000, server.output()[-3000:]
        assert "Too many open files" not in server.output()


def test_a_connection_that_never_finishes_its_request_head_is_closed(tmp_path: Path) -> None:
    config = {"server": {"header_timeout_s": 1}}
    with ServerProcess(tmp_path, config) as server, socket.create_connection(
        ("127.0.0.1", server.port), timeout=20
    ) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, long before the 20 s timeout
        assert time.monotonic() - started < 15


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_at_start(tmp_path: Path) -> None:
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    with LimitedServer(tmp_path, (256, hard)) as server:
        assert server.process is not None
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3] == str(hard), line


async def test_running_out_of_descriptors_while_writing_is_retried(
    client: Any, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    url = origin.add_file("emfile.bin", data)
    real = kernel._files._pwrite
    failures = {"left": 1}

    def pwrite(fd: int, view: Any, pos: int) -> int:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real(fd, view, pos)

    monkeypatch.setattr(kernel._files, "_pwrite", pwrite)
    await client.post("/v1/downloads", json={"model_id": "emfile", "url": url})
    done = await wait_status(client, "emfile", "completed")
    assert Path(done["local_path"]).read_bytes() == data
    assert failures["left"] == 0


async def test_a_repeated_loop_error_is_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = RateLimitedErrors(every_s=3600)
    loop = asyncio.get_running_loop()
    error = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(1000):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": error})
        handler(loop, {"message": "something else"})
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert sum("socket.accept()" in m for m in messages) == 1
    assert sum("something else" in m for m in messages) == 1

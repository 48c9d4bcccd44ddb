"""A pause (task cancellation) that arrives while a block is being written to the ``.part``.

The write is held in its worker thread (the ``_pwrite`` seam) until the transfer task has been
cancelled; then it lands. Afterwards the ``.part`` holds exactly the bytes received, once, and
the record's counter agrees with the file, for both byte loops (chunks, and the pump's
``readinto_blocking`` in a worker thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import kernel._files
from kernel.config import DownloadSettings, RetrySettings
from kernel.transfer import Transfer
from kernel.types import DownloadRecord, Probe
from tests.helpers.fakes import VALIDATOR

SIZE = 12 << 20
CHUNK = 256 << 10


class _Body:
    def __init__(self, data: bytes, start: int) -> None:
        self.data, self.start, self.pos = data, start, start
        self.total: int | None = len(data)
        self.validator: str | None = VALIDATOR

    async def chunks(self) -> AsyncIterator[bytes]:
        for pos in range(self.start, len(self.data), CHUNK):
            yield self.data[pos : pos + CHUNK]

    async def aclose(self) -> None:
        pass


class _BlockBody(_Body):
    """A fast-path body (kernel/pump.py): read in the pump's worker thread."""

    def readinto_blocking(self, view: memoryview, flush_s: float) -> int:
        n = min(len(view), len(self.data) - self.pos, CHUNK)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def interrupt(self) -> None:
        pass


class _Source:
    def __init__(self, data: bytes, body: type[_Body]) -> None:
        self.ref = "mem://blob"
        self.data, self.body = data, body

    async def probe(self) -> Probe:
        return Probe(size=len(self.data), validator=VALIDATOR, accept_ranges=True)

    async def open(self, offset: int, validator: str | None) -> _Body:
        return self.body(self.data, offset)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("body", [_Body, _BlockBody], ids=["chunks", "readinto"])
async def test_a_pause_during_a_block_write_keeps_the_part_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: type[_Body]
) -> None:
    data = hashlib.shake_256(b"pause-write").digest(SIZE)
    held, release = threading.Event(), threading.Event()
    real = kernel._files._pwrite

    def slow_pwrite(fd: int, view: Any, pos: int) -> int:
        if pos > 0 and not release.is_set():
            held.set()
            release.wait(30)
        return real(fd, view, pos)

    monkeypatch.setattr(kernel._files, "_pwrite", slow_pwrite)
    rec = DownloadRecord(model_id="m", url="mem://blob", local_path=str(tmp_path / "m.bin"))
    settings = DownloadSettings(connections=1, retry=RetrySettings(attempts=0))
    transfer = Transfer(rec, _Source(data, body), settings)  # type: ignore[arg-type]
    task = asyncio.create_task(transfer.run())
    deadline = time.monotonic() + 30
    while not held.is_set():  # a write past the first block is in its worker thread
        assert time.monotonic() < deadline, "no second write started"
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.05)  # the cancellation reaches the loop while the write is held
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    on_disk = Path(rec.part_path).read_bytes()
    assert on_disk == data[: len(on_disk)], "a block was written twice"
    assert 0 < len(on_disk) < SIZE
    assert rec.downloaded_bytes == len(on_disk) == os.path.getsize(rec.part_path)

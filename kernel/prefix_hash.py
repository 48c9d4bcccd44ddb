"""The sha256 of a segmented download, computed while its ranges arrive.

A single stream hashes each block as it writes it (kernel/_files.py ``PartFile``); the ranges
of a segmented download land out of order, so that cannot work for them. What can be hashed
while they run is the file's contiguous prefix: the bytes from 0 to the first segment that is
not complete (its start plus its confirmed bytes, kernel/segments.py ``contiguous``). A worker
thread reads that prefix back from the ``.part`` file (the page cache: the bytes were just
written) in blocks of ``BLOCK`` and feeds the digest, so when the last byte arrives only what
lies past the prefix is left to hash (measured on the 2-core box: a whole-file hash after the
end cost ~0.25 s per 256 MiB of waiting).

Why the bytes below the hashed point cannot change: a segment's ``done`` counts only bytes on
disk and only grows, and its connection writes only past it (a retry resumes at ``start +
done``; a cut moves a segment's end, never below what its connection has written). A new
segment table (a restart from zero, a ``.part`` that does not match its table) is a new
``PrefixHash``.

Nothing is persisted: the digest's state cannot be saved. Within one run a retry keeps it (the
table is kept too); a resumed download (after a pause, or a restart of the server) starts again
from 0, hashing what is already on disk in the background while the rest arrives.

The thread runs only between ``start`` and ``stop`` (or the end of ``digest``): a cancelled
download stops it within one block, and nothing reads the file after the task has ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import structlog

from kernel._files import open_nofollow
from kernel.pump import run_in_thread

__all__ = ["PrefixHash"]

log = structlog.get_logger()

BLOCK = 4 << 20  # read back and hashed at a time: the most a stop waits for


class PrefixHash:
    """The running sha256 of ``path``'s bytes ``[0, hashed)``; ``advance`` says how far the
    file is known to be on disk. All methods are called on the event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.hashed = 0  # written by the worker thread
        self.hashed_before_end: int | None = None  # ``hashed`` when the last byte landed
        self._hasher = hashlib.sha256()
        self._target = 0  # bytes from 0 that are on disk and will not change
        self._final = False  # the thread returns once it has reached the target
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: asyncio.Future[None] | None = None
        self._ended_at = 0.0

    def advance(self, to: int) -> None:
        """Bytes ``[0, to)`` are on disk for good."""
        if to > self._target:
            self._target = to
            self._wake.set()

    def start(self) -> None:
        """Follow the prefix in a worker thread (until ``stop``)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = run_in_thread(self._work, name="modelkernel-hash")

    async def stop(self) -> None:
        """Stop the thread and wait for it; the digest so far is kept for a later start."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        try:
            await self._join()
        except OSError as exc:  # a failed read back changed nothing: a later start retries it
            log.warning("download.sha256_read_failed", path=self.path, error=str(exc))

    def ended(self, size: int) -> None:
        """The last byte landed: the whole file may be hashed. Notes how much already was."""
        self.hashed_before_end = self.hashed
        self._ended_at = time.monotonic()
        self.advance(size)

    async def digest(self, size: int) -> str:
        """Hash what is left up to ``size``; the hex digest of the whole file."""
        self.advance(size)
        self._final = True
        self.start()
        self._wake.set()
        await self._join()  # a file shorter than ``size`` gets a digest that cannot match
        log.info(
            "download.sha256", bytes=size, hashed_before_end=self.hashed_before_end,
            tail_s=round(time.monotonic() - self._ended_at, 3) if self._ended_at else None,
        )  # fmt: skip
        return self._hasher.hexdigest()

    async def _join(self) -> None:
        """Wait for the thread; when the waiting task is cancelled, stop it first."""
        thread = self._thread
        assert thread is not None
        try:
            await asyncio.shield(thread)
        except asyncio.CancelledError:
            self._stop.set()
            self._wake.set()
            await asyncio.wait({thread})
            raise
        finally:
            if thread.done():
                self._thread = None

    def _work(self) -> None:
        fd = open_nofollow(self.path, os.O_RDONLY)
        view = memoryview(bytearray(BLOCK))
        try:
            while not self._stop.is_set():
                self._wake.clear()
                want = min(BLOCK, self._target - self.hashed)
                if want <= 0:
                    if self._final:
                        return
                    self._wake.wait()
                    continue
                n = os.preadv(fd, [view[:want]], self.hashed)
                if n == 0:
                    return  # shorter than it should be: ``digest`` says so
                self._hasher.update(view[:n])
                self.hashed += n
        finally:
            os.close(fd)

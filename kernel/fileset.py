"""A download of several files under one model id: the shards of a split model, or the files
of a repository picked by ``include`` patterns.

Each file is fetched by the ordinary single-file :class:`~kernel.transfer.Transfer`, on a
record of its own built from the set's :class:`~kernel.types.FileRecord` and copied back into
it on every progress report, so probing, resuming from the ``.part``, If-Range, segments,
retries and verification (sha256, the engine backend's check) are exactly those of a single
download. This module only decides which files run, how many at once (the ``connections``
budget is shared: ``min(connections, files left)`` files at a time, each with its share of the
connections), and keeps the set's counters: ``total_bytes`` and ``downloaded_bytes`` are the sums.

The first failure that a file's own retries cannot fix stops the other files and fails the
set; cancellation (pause, cancel, shutdown) stops them all, each keeping its ``.part``. A file
already in place at its size is not fetched again. When every file is in place, the engine
backend that will load them checks the set as a whole (``VerifyingBackend.verify_set``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import msgspec
import structlog

from kernel._files import make_parent, size_of
from kernel.config import DownloadSettings
from kernel.throttle import TokenBucket
from kernel.transfer import Transfer, now_ms
from kernel.types import DownloadRecord, DownloadRetry, FileRecord, Source, VerifyingBackend

__all__ = ["FileSetTransfer"]

log = structlog.get_logger()


class FileSetTransfer:
    """Downloads every file of ``record.files``; same callbacks as :class:`Transfer`."""

    def __init__(
        self,
        record: DownloadRecord,
        resolve_source: Callable[[str], Source],
        settings: DownloadSettings,
        *,
        on_progress: Callable[[DownloadRecord], None] = lambda _r: None,
        on_finalizing: Callable[[], None] = lambda: None,
        shared_bucket: TokenBucket | None = None,
        on_retry: Callable[[DownloadRetry], None] = lambda _event: None,
        verifier: VerifyingBackend | None = None,
    ) -> None:
        assert record.files is not None
        self.verifier = verifier  # checks each file, then the set (a split model's shards)
        self.rec = record
        self.files: list[FileRecord] = record.files
        self.resolve_source = resolve_source
        self.settings = settings
        self.on_progress = on_progress
        self.on_finalizing = on_finalizing
        self.shared_bucket = shared_bucket
        self.on_retry = on_retry
        self._running: dict[str, DownloadRecord] = {}  # file path -> its transfer's record

    async def run(self) -> None:
        for f in self.files:
            await asyncio.to_thread(make_parent, f.local_path)  # a real directory, no link
        left = [f for f in self.files if not await self._in_place(f)]
        self._sum()
        if left:
            await self._fetch(left)
        self.on_finalizing()
        if self.verifier is not None:
            await asyncio.to_thread(self.verifier.verify_set, [f.local_path for f in self.files])
        self.rec.sha256 = None if len(self.files) > 1 else self.files[0].sha256
        self._sum()

    async def _in_place(self, f: FileRecord) -> bool:
        """A file finished in an earlier run, still there at its size."""
        if f.status != "done":
            return False
        if await asyncio.to_thread(size_of, f.local_path) == f.size:
            f.downloaded_bytes = f.size
            return True
        log.warning("download.file_missing", path=f.local_path)
        f.status, f.downloaded_bytes, f.sha256 = "pending", 0, None
        return False

    async def _fetch(self, left: list[FileRecord]) -> None:
        budget = max(1, self.settings.connections)
        parallel = min(budget, len(left))
        settings = msgspec.structs.replace(self.settings, connections=max(1, budget // parallel))
        queue = list(left)

        async def worker() -> None:
            while queue:
                await self._one(queue.pop(0), settings)

        tasks = [asyncio.create_task(worker()) for _ in range(parallel)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            self._sum()
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _one(self, f: FileRecord, settings: DownloadSettings) -> None:
        rec = self.rec
        child = DownloadRecord(
            model_id=rec.model_id,
            url=f.url,
            local_path=f.local_path,
            status="downloading",
            total_bytes=f.size,
            downloaded_bytes=f.downloaded_bytes,
            expected_sha256=f.expected_sha256,
            validator=f.validator,
            file_validator=f.file_validator,
            segments=f.segments,
            run_started_at=now_ms(),
            run_start_bytes=f.downloaded_bytes,
        )
        f.status = "downloading"
        self._running[f.path] = child
        self._share_cap()
        source = self.resolve_source(f.url)
        transfer = Transfer(
            child,
            source,
            settings,
            on_progress=lambda c: self._copy(f, c),
            shared_bucket=self.shared_bucket,
            on_retry=self.on_retry,
            verifier=self.verifier,
        )
        log.info("download.file_started", path=f.path, offset=f.downloaded_bytes)
        try:
            await transfer.run()
        except BaseException:
            f.status = "pending"  # stopped or failed: it continues from its .part next run
            raise
        finally:
            del self._running[f.path]
            self._copy(f, child)
            await source.aclose()
        f.status = "done"
        f.sha256 = child.sha256
        f.segments = None
        self._copy(f, child)
        log.info("download.file_done", path=f.path, bytes=f.size)

    def _copy(self, f: FileRecord, child: DownloadRecord) -> None:
        """A file's transfer reported progress: into its FileRecord, then the set's sums."""
        f.size = child.total_bytes
        f.downloaded_bytes = child.downloaded_bytes
        f.validator = child.validator
        f.file_validator = child.file_validator
        f.segments = child.segments
        self._share_cap()  # a cap changed on the set applies at once
        rec = self.rec
        rec.attempts = max((r.attempts for r in self._running.values()), default=0)
        rec.last_error = (child.last_error or rec.last_error) if rec.attempts else None
        self._sum()
        self.on_progress(rec)

    def _share_cap(self) -> None:
        """Give each running file its part of the set's bandwidth cap (0 = none)."""
        cap = self.rec.max_bytes_per_second
        share = math.ceil(cap / max(1, len(self._running))) if cap else 0
        for running in self._running.values():
            running.max_bytes_per_second = share

    def _sum(self) -> None:
        self.rec.total_bytes = sum(f.size for f in self.files)
        self.rec.downloaded_bytes = sum(f.downloaded_bytes for f in self.files)

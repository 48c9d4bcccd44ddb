"""One download's byte loop: probe, resume the ``.part`` file, stream, verify, rename.

The loop owns no status: it fills in the record's byte counters and raises when it cannot
finish. ``TransientError`` is retried here with exponential backoff and jitter, resuming from
the ``.part`` file with ``Range`` + ``If-Range``; ``ValidatorChanged`` (or an origin that answers
200 to a range request) restarts at byte 0 so two versions of a file are never spliced;
``PermanentError`` propagates to the manager, which fails the download.

Bytes move in kernel/pump.py: a body that can be read off the loop (``readinto_blocking``,
what http_source and hf_source return) is pumped into the ``.part`` file by a worker thread;
any other body (``chunks()`` only) is gathered into blocks here. Single-stream and segmented
downloads share both loops.

Cancellation (pause, cancel, shutdown) is plain asyncio cancellation: it interrupts any await,
stops a pump (flag + socket shutdown) and waits for its thread, and a disk write already
handed to a worker thread is allowed to finish first, so the ``.part`` file always ends on a
block boundary the counters agree with.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import threading
from collections.abc import Callable
from typing import Any

import structlog

from kernel._files import (
    PartFile,
    Writeback,
    file_sha256,
    make_parent,
    open_nofollow,
    remove,
    rename_durably,
    size_of,
)
from kernel.config import DownloadSettings
from kernel.errors import PermanentError, TransientError, ValidatorChanged
from kernel.prefix_hash import PrefixHash
from kernel.pump import FLUSH_S, ChunkPump, Pump, is_blocking
from kernel.segments import (
    Spawn,
    check_segments,
    contiguous,
    cut_segment,
    piece_size,
    plan_segments,
    preallocate,
    run_segments,
)
from kernel.throttle import TokenBucket
from kernel.types import (
    DownloadRecord,
    DownloadRetry,
    Probe,
    RangedSource,
    Source,
    VerifyingBackend,
    now_ms,
)

__all__ = ["Transfer", "now_ms"]

log = structlog.get_logger()

WRITE_BLOCK = 4 << 20  # bytes gathered before one write() (or after FLUSH_S on slow links)
# A pump reads and writes blocks of at most this: small enough that the decrypted bytes are
# still in the CPU cache when they are copied to the page cache (measured over loopback TLS:
# 4 MiB blocks cost 3.5-3.8 CPU s/GiB, 256 KiB blocks 1.9-3.0, in the same runs).
PUMP_BLOCK = 256 << 10
MIN_CAPPED_BLOCK = 4 << 10  # the smallest block under a bandwidth cap (see _read_cap)
MAX_RESTARTS = 3  # validator changes tolerated in one run before giving up
# Adaptive segmenting (kernel/segments.py): one connection first; more only when it is slow.
PROBE_S = 0.3  # the one connection is measured over this long, from its first byte
SPLIT_BELOW_BPS = 128 << 20  # one connection faster than this is a fast link: never split
SPLIT_DRAINED = 0.25  # waiting on the network: this share of blocks left the socket empty,
SPLIT_BUSY = 0.35  # or its thread ran or waited for a CPU less than this share of the time
SPLIT_PROBES = 5  # probes before the one connection is left alone (one noisy probe must not decide)
# The disk layer: a seam for fault-injection tests (a full disk).
_disk_usage = shutil.disk_usage


def _busy_s(pump: Pump | ChunkPump) -> float:
    """Seconds the pump's thread ran or waited for a CPU (Linux schedstat: on a loaded
    machine a starved thread is CPU-bound too, not idle); its CPU time elsewhere."""
    if pump.tid is not None:
        try:
            with open(f"/proc/self/task/{pump.tid}/schedstat", "rb") as f:
                ran, waited = f.read().split()[:2]
            return (int(ran) + int(waited)) / 1e9
        except (OSError, ValueError):
            pass
    return pump.busy_s


class Transfer:
    """Downloads ``record.url`` through ``source`` into ``record.local_path``."""

    def __init__(
        self,
        record: DownloadRecord,
        source: Source,
        settings: DownloadSettings,
        *,
        on_progress: Callable[[DownloadRecord], None] = lambda _r: None,
        on_finalizing: Callable[[], None] = lambda: None,
        shared_bucket: TokenBucket | None = None,
        on_retry: Callable[[DownloadRetry], None] = lambda _event: None,
        on_block: Callable[[int, memoryview], None] | None = None,
        verifier: VerifyingBackend | None = None,
    ) -> None:
        self.rec = record
        self.verifier = verifier  # checks the complete file before it is renamed into place
        self.source = source
        self.settings = settings  # as they were at the start; the global cap is live instead
        self.on_progress = on_progress
        self.on_finalizing = on_finalizing
        self.probe: Probe | None = None
        self.transferred = 0  # bytes received over the network in this run
        self._hasher: Any = None  # running sha256 of the part, when a digest is expected
        # A segmented download's: the sha256 of its contiguous prefix, kept across retries of
        # this run while its segment table is (kernel/prefix_hash.py).
        self._prefix: PrefixHash | None = None
        self.on_retry = on_retry  # each transient fault, before its backoff
        self._segments_ok = True
        # The furthest the file has ever got in this run: only bytes beyond it are progress.
        self._high_water = record.downloaded_bytes
        self._own_bucket = TokenBucket(lambda: record.max_bytes_per_second)
        self._shared_bucket = shared_bucket
        self._pumps: dict[int, Pump | ChunkPump] = {}  # id(segment) -> the pump fetching it now
        # Called in a worker thread after each block lands in the .part (offset, bytes): the
        # seam for a tee of the byte stream. The view is only valid during the call.
        self.on_block = on_block

    @property
    def expected_sha256(self) -> str | None:
        sha = self.rec.expected_sha256 or (self.probe.sha256 if self.probe else None)
        return sha.lower() if sha else None

    async def run(self) -> None:
        await asyncio.to_thread(make_parent, self.rec.local_path)
        restarts = 0
        while True:
            try:
                if await self._attempt():
                    return
            except ValidatorChanged as exc:
                if self.rec.segments is not None:
                    self._segments_ok = False  # this origin mishandles ranges: one stream
                restarts += 1
                log.info("download.restart", reason=exc.message)
                if restarts > MAX_RESTARTS:
                    raise PermanentError(
                        f"The remote file kept changing during the download ({exc.message})."
                    ) from exc
                await self._discard_part()
            except TransientError as exc:
                await self._backoff(exc)
            except PermanentError as exc:
                if not _out_of_descriptors(exc.__cause__):
                    raise self._without_false_promise(exc) from exc.__cause__
                await self._backoff(_descriptors_error(exc.__cause__))
            except OSError as exc:
                if not _out_of_descriptors(exc):
                    raise
                await self._backoff(_descriptors_error(exc))

    def _without_false_promise(self, exc: PermanentError) -> PermanentError:
        """A full disk's message says a later start continues from the partial file; that
        holds only when the origin serves ranges. Otherwise say that it starts over."""
        cause = exc.__cause__
        if not (isinstance(cause, OSError) and cause.errno == errno.ENOSPC):
            return exc
        if self.probe is None or self.probe.accept_ranges:
            return exc
        directory = os.path.dirname(self.rec.local_path) or "."
        return PermanentError(
            f"The disk is full ({directory}): free some space, then start the download again. "
            "This server does not support resuming, so it will start over from the beginning."
        )

    async def _backoff(self, exc: TransientError) -> None:
        """Count a failure and wait before the next try. The count is of failures in a row
        without progress, and progress means the file got further than it ever had (its
        high-water mark): a long download over a link that drops now and then is never
        failed for that, but an origin that cuts every try at the same byte (restarting
        from zero each time) runs out of attempts."""
        rec, retry = self.rec, self.settings.retry
        if rec.downloaded_bytes > self._high_water:
            self._high_water = rec.downloaded_bytes
            rec.attempts = 0
        rec.attempts += 1
        rec.last_error = exc.message
        if rec.attempts > retry.attempts:
            raise PermanentError(
                f"Download failed after {rec.attempts} attempts: {exc.message}"
            ) from exc
        delay = retry.backoff_seconds * 2 ** (rec.attempts - 1) * random.uniform(0.5, 1.0)  # noqa: S311
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        log.warning(
            "download.retry",
            attempt=rec.attempts,
            delay_s=round(delay, 2),
            reason=exc.reason,
            error=exc.message,
        )
        self.on_retry(
            DownloadRetry(
                model_id=rec.model_id,
                attempt=rec.attempts,
                reason=exc.reason,
                error=exc.message,
                delay_s=round(delay, 2),
            )
        )
        self.on_progress(rec)
        await asyncio.sleep(min(delay, 300.0))

    async def _discard_part(self) -> None:
        await asyncio.to_thread(remove, self.rec.part_path)
        self.rec.validator = None
        self.rec.segments = None
        self.rec.downloaded_bytes = 0
        self.rec.run_start_bytes = 0
        self.probe = None
        self._prefix = None

    async def _attempt(self) -> bool:
        """One connection's worth of work. True when the final file is in place."""
        rec = self.rec
        if self.probe is None:
            self.probe = await self.source.probe()
            if self.probe.size is not None:
                if rec.total_bytes and rec.total_bytes != self.probe.size and rec.downloaded_bytes:
                    raise ValidatorChanged("The remote file's size changed.")
                rec.total_bytes = self.probe.size
            if await self._already_present():
                return True
        probe = self.probe
        part_size = await asyncio.to_thread(size_of, rec.part_path) or 0
        if rec.segments is not None or self._should_segment(probe, part_size):
            return await self._attempt_segmented(probe, part_size)
        offset = part_size if probe.accept_ranges else 0
        if offset and rec.validator and probe.validator and rec.validator != probe.validator:
            raise ValidatorChanged("The remote file changed since the partial download began.")
        if rec.total_bytes and offset > rec.total_bytes:
            raise ValidatorChanged("The partial file is larger than the remote file.")
        if rec.total_bytes and offset == rec.total_bytes:
            return await self._finish(offset)
        if rec.total_bytes:
            await self._check_free_space(rec.total_bytes - offset)
        body = await self.source.open(offset, rec.validator or probe.validator if offset else None)
        try:
            if body.start != offset:
                log.info("download.restart", reason="origin sent the whole file", offset=offset)
                offset = body.start
            rec.validator = body.validator or probe.validator
            if body.total is not None and body.total > 0:
                rec.total_bytes = body.total
            rec.downloaded_bytes = offset
            if offset < rec.run_start_bytes:
                rec.run_start_bytes = offset
            if offset:
                log.info("download.resumed", offset=offset)
            await self._stream(body, offset)
        finally:
            await body.aclose()
        return await self._finish(rec.downloaded_bytes)

    async def _stream(self, body: Any, offset: int) -> None:
        rec = self.rec
        self._hasher = None
        part = PartFile(rec.part_path, offset, hashing=self.expected_sha256 is not None)
        try:
            await part.hash_existing()
            pos = await self._pump(
                body, part.fd, offset, limit=rec.total_bytes or None, hasher=part.hasher,
                writeback=part.writeback,
            )  # fmt: skip
            part.pos = part.issued = pos
            rec.downloaded_bytes = pos
            self.on_progress(rec)
            self._hasher = part.hasher
            await part.sync_and_close()
        finally:
            part.close()
        if rec.total_bytes and rec.downloaded_bytes < rec.total_bytes:
            raise TransientError(
                f"The connection ended after {rec.downloaded_bytes} of {rec.total_bytes} bytes.",
                reason="short_body",
            )

    def _should_segment(self, probe: Probe, part_size: int) -> bool:
        return (
            self._segments_ok
            and self.settings.connections > 1
            and not self.rec.max_bytes_per_second  # a capped download gains nothing from more
            and not self._global_cap()
            and probe.accept_ranges
            and probe.size is not None
            and probe.size >= self.settings.segment_min_bytes
            and part_size == 0
            and isinstance(self.source, RangedSource)
            and self.source.supports_segments
        )

    async def _attempt_segmented(self, probe: Probe, part_size: int) -> bool:
        rec, source = self.rec, self.source
        if not isinstance(source, RangedSource):  # segments saved, but this source has no ranges
            raise ValidatorChanged("The source of this download cannot fetch byte ranges.")
        if rec.validator and probe.validator and rec.validator != probe.validator:
            raise ValidatorChanged("The remote file changed since the partial download began.")
        validator = rec.validator or probe.validator
        if rec.segments is None or part_size != rec.total_bytes:
            await self._check_free_space(rec.total_bytes)
            rec.segments = plan_segments(rec.total_bytes, 1)  # split later if one is slow
            await asyncio.to_thread(preallocate, rec.part_path, rec.total_bytes)
            self._prefix = None  # a new table: whatever was hashed is written again
        check_segments(rec)
        rec.validator = validator
        rec.downloaded_bytes = sum(done for _, _, done in rec.segments)
        split = self._split_when_slow if len(rec.segments) == 1 else None
        connections = 1 if split is not None else self.settings.connections
        log.info(
            "download.segmented", connections=connections, segments=len(rec.segments),
            done=rec.downloaded_bytes,
        )  # fmt: skip
        fd = await asyncio.to_thread(open_nofollow, rec.part_path, os.O_WRONLY)
        writeback = Writeback(fd)
        if self._prefix is None and self.expected_sha256 is not None:
            self._prefix = PrefixHash(rec.part_path)
        prefix = self._prefix
        segments = rec.segments

        def landed() -> None:
            if prefix is not None:
                prefix.advance(contiguous(segments))

        async def fetch(body: Any, seg: list[int]) -> None:
            def written(n: int) -> None:
                seg[2] += n  # only bytes on disk: a checkpoint resumes right after them

            start, end, done = seg
            try:
                await self._pump(
                    body, fd, start + done, end=end, writeback=writeback, on_written=written,
                    on_pump=lambda pump: self._pumps.__setitem__(id(seg), pump), on_landed=landed,
                )  # fmt: skip
            finally:
                self._pumps.pop(id(seg), None)

        complete = False
        try:
            if prefix is not None:
                landed()  # a resumed table: hash what is on disk while the rest arrives
                prefix.start()
            await run_segments(
                rec, source, validator, fetch=fetch, split=split, connections=connections
            )
            if prefix is not None:
                prefix.ended(rec.total_bytes)  # the rest is hashed during the final flush
            await writeback.sync()
            complete = True
        finally:
            os.close(fd)
            if prefix is not None and not complete:
                await prefix.stop()
        rec.segments = None  # complete: from here on the .part is one whole file
        self._hasher = None
        return await self._finish(rec.total_bytes, prefix)

    async def _split_when_slow(self, spawn: Spawn) -> None:
        """The splitting policy: measure the one connection for PROBE_S. When it is slow and
        waiting on the network (its socket is often found drained after a block, or its
        thread is mostly neither running nor runnable), the origin limits each connection:
        cut the range into ``connections``. A connection that keeps its socket full and its
        thread busy is CPU-bound here, and more of them would only cost more. (Each signal
        alone misleads: nginx's limit_rate sends plain http in bursts that leave the socket
        non-empty, and on a loaded machine a thread waits for a CPU even at 50 MiB/s.)"""
        target = self.settings.connections
        if target <= 1:
            return
        for _ in range(SPLIT_PROBES):
            rate, busy, drained = await self._probe(PROBE_S)
            waiting = busy < SPLIT_BUSY or (drained is not None and drained >= SPLIT_DRAINED)
            log.info(
                "download.split_probe", bps=int(rate), busy=round(busy, 2),
                drained=None if drained is None else round(drained, 2),
            )  # fmt: skip
            if rate >= SPLIT_BELOW_BPS:
                return  # a fast link: one stream is the cheapest
            if waiting:
                self._split_to(target, spawn)
                return

    def _live(self) -> tuple[int, float, int, int]:
        """Bytes on disk in this run (including blocks the loop has not been told of yet),
        CPU seconds of the pumps' threads, blocks sampled, blocks that drained the socket."""
        pumps = list(self._pumps.values())
        moved = self.transferred + sum(p.pos - p.published for p in pumps)
        busy = sum(_busy_s(p) for p in pumps)
        return moved, busy, sum(p.blocks for p in pumps), sum(p.drained for p in pumps)

    async def _probe(self, seconds: float) -> tuple[float, float, float | None]:
        """(bytes per second, busy fraction of the pump threads, share of blocks that left
        the socket drained or None when unknown) over ``seconds`` from the first byte."""
        first = self._live()[0]
        while self._live()[0] == first:  # noqa: ASYNC110 - counters moved by threads
            await asyncio.sleep(0.02)
        loop = asyncio.get_running_loop()
        (moved, busy, blocks, drained), began = self._live(), loop.time()
        await asyncio.sleep(seconds)
        (moved2, busy2, blocks2, drained2), took = self._live(), max(loop.time() - began, 1e-3)
        share = (drained2 - drained) / (blocks2 - blocks) if blocks2 > blocks else None
        return (moved2 - moved) / took, (busy2 - busy) / took, share

    def _split_to(self, connections: int, spawn: Spawn) -> bool:
        """Cut the one running range after its share of a piece (kernel/segments.py
        ``piece_size``) and start ``connections - 1`` more connections, which take the rest
        piece by piece. True when it was split."""
        rec = self.rec
        assert rec.segments is not None
        running = [s for s in rec.segments if id(s) in self._pumps and s[2] < s[1] - s[0]]
        if len(running) != 1 or connections <= 1:
            return False
        seg = running[0]
        pump = self._pumps[id(seg)]
        keep = piece_size(seg[1] - pump.pos, connections)
        if cut_segment(rec, seg, pump.cut, pump.pos, keep) is None:
            return False
        for _ in range(connections - 1):
            spawn()
        log.info("download.split", connections=connections)
        return True

    def _pump_block(self) -> int:
        return min(PUMP_BLOCK, self._read_cap())

    def _read_cap(self) -> int:
        """Bytes to read before throttling: a flush interval's worth of the tightest cap,
        never more than ``WRITE_BLOCK`` (a huge cap must not size a huge buffer) nor less
        than ``MIN_CAPPED_BLOCK``. A block is read before the bucket is paid, so at low caps
        a larger one would land in bursts of several seconds' worth (and each file of a set
        would take one such burst at once, past the set's cap)."""
        caps = [cap for cap in (self.rec.max_bytes_per_second, self._global_cap()) if cap > 0]
        if not caps:
            return WRITE_BLOCK
        return min(WRITE_BLOCK, max(MIN_CAPPED_BLOCK, int(min(caps) * FLUSH_S)))

    def _global_cap(self) -> int:
        """The cap shared by every download, read live from its bucket: ``settings`` is the
        snapshot this transfer started with, and the cap may change while it runs."""
        return self._shared_bucket.rate if self._shared_bucket is not None else 0

    async def _pump(
        self,
        body: Any,
        fd: int,
        pos: int,
        *,
        end: int | None = None,
        limit: int | None = None,
        hasher: Any = None,
        writeback: Writeback,
        on_written: Callable[[int], None] | None = None,
        on_pump: Callable[[Pump | ChunkPump], None] | None = None,
        on_landed: Callable[[], None] | None = None,
    ) -> int:
        """Move ``body`` into ``fd`` from ``pos`` (up to ``end``); the position reached.
        ``rec.downloaded_bytes`` and the transfer's counters follow as blocks land, and then
        ``on_landed()`` is called (on the loop, unlike ``on_written``)."""
        rec = self.rec

        def progress(delta: int) -> None:
            rec.downloaded_bytes += delta
            self.transferred += delta
            writeback.wrote(delta)
            if on_landed is not None:
                on_landed()
            self.on_progress(rec)

        pump: Pump | ChunkPump
        if is_blocking(body):
            pump = Pump(
                body, fd, rec.part_path, pos, end=end, limit=limit, block_size=self._pump_block,
                throttle=self._throttle_blocking, hasher=hasher,
                on_block=self.on_block, on_written=on_written,
            )  # fmt: skip
        else:
            pump = ChunkPump(
                body, fd, rec.part_path, pos, end=end, limit=limit, block_size=self._read_cap,
                throttle=self._throttle, hasher=hasher,
                on_block=self.on_block, on_written=on_written,
            )  # fmt: skip
        if on_pump is not None:
            on_pump(pump)
        await pump.run(progress)
        return pump.pos

    async def _check_free_space(self, needed: int) -> None:
        directory = os.path.dirname(self.rec.local_path) or "."
        free = (await asyncio.to_thread(_disk_usage, directory)).free
        if free < needed:
            raise PermanentError(
                f"Not enough disk space in {directory}: the download needs {needed} more bytes "
                f"but only {free} are free ({needed - free} missing)."
            )

    async def _throttle(self, n: int) -> None:
        if self.rec.max_bytes_per_second:
            await self._own_bucket.consume(n)
        if self._shared_bucket is not None:
            await self._shared_bucket.consume(n)

    def _throttle_blocking(self, n: int, stop: threading.Event) -> None:
        """``_throttle`` for a pump's worker thread."""
        if self.rec.max_bytes_per_second:
            self._own_bucket.consume_blocking(n, stop)
        if self._shared_bucket is not None:
            self._shared_bucket.consume_blocking(n, stop)

    async def _already_present(self) -> bool:
        """A final file of the right size needs no transfer when it is known to be this
        version of the remote file: its digest matches the expected one, or (with no digest
        to check) the validator recorded when it was downloaded is the origin's current one.
        The size alone proves nothing: a changed file often keeps its size."""
        rec = self.rec
        size = await asyncio.to_thread(size_of, rec.local_path)
        if size is None or not rec.total_bytes or size != rec.total_bytes:
            return False
        expected = self.expected_sha256
        current = self.probe.validator if self.probe is not None else None
        if expected is not None:
            digest = await asyncio.to_thread(file_sha256, rec.local_path)
            if digest != expected:
                return False
            rec.sha256 = digest
        elif current is None or rec.file_validator != current:
            return False
        rec.file_validator = current
        rec.downloaded_bytes = rec.run_start_bytes = size  # in place, not received in this run
        log.info("download.already_present", path=rec.local_path)
        return True

    async def _finish(self, size: int, prefix: PrefixHash | None = None) -> bool:
        """Verify the complete ``.part`` and rename it into place. ``prefix``: a segmented
        download's digest so far, still hashing the rest (stopped here if not used)."""
        try:
            return await self._verify_and_rename(size, prefix)
        finally:
            if prefix is not None:
                await prefix.stop()

    async def _digest(self, size: int, prefix: PrefixHash | None) -> str:
        if self._hasher is not None:
            return str(self._hasher.hexdigest())
        if prefix is not None:
            return await prefix.digest(size)
        return await asyncio.to_thread(file_sha256, self.rec.part_path)

    async def _verify_and_rename(self, size: int, prefix: PrefixHash | None) -> bool:
        rec = self.rec
        if rec.total_bytes and size != rec.total_bytes:
            raise TransientError(
                f"The download ended at {size} of {rec.total_bytes} bytes.", reason="short_body"
            )
        self.on_finalizing()  # from here nothing is retried: a pause waits for the rename
        expected = self.expected_sha256
        if expected is not None:
            digest = await self._digest(size, prefix)
            if digest != expected:
                await asyncio.to_thread(remove, rec.part_path)
                rec.downloaded_bytes = 0
                # The actual digest goes to the log only: in an API message it would tell any
                # client a digest of whatever the URL served (an internal service, say).
                log.warning("download.checksum_mismatch", expected=expected, actual=digest)
                raise PermanentError(
                    f"Checksum mismatch: the file's sha256 is not the expected {expected}; "
                    "the partial file was removed."
                )
            rec.sha256 = digest
        if self.verifier is not None:
            await self._verify(self.verifier)
        await asyncio.to_thread(rename_durably, rec.part_path, rec.local_path)
        rec.file_validator = rec.validator
        rec.total_bytes = rec.total_bytes or size
        return True

    async def _verify(self, verifier: VerifyingBackend) -> None:
        """The engine backend that will load the file checks it; a rejected file is removed."""
        rec = self.rec
        try:
            await asyncio.to_thread(
                verifier.verify_file, rec.part_path, os.path.basename(rec.local_path)
            )
        except PermanentError as exc:
            await asyncio.to_thread(remove, rec.part_path)
            rec.downloaded_bytes = 0
            raise PermanentError(f"{exc.message} The file was removed.") from exc


def _out_of_descriptors(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def _descriptors_error(exc: BaseException | None) -> TransientError:
    """Running out of file descriptors passes (connections close): retried, never fatal."""
    detail = exc.strerror if isinstance(exc, OSError) else None
    return TransientError(
        f"Out of file descriptors ({detail or 'too many open files'}); retrying.",
        reason="fd_limit",
    )

"""The byte loop: one response body into the ``.part`` file, in a worker thread of its own.

Every large body (plain http, TLS, after redirects, each segment of a segmented download)
goes through :class:`Pump`. A source whose body has ``readinto_blocking`` (see
:class:`BlockingBody`) is read on a blocking socket in the pump's thread, straight into one
reused block buffer, and each block is written with ``pwrite`` at its offset from the same
thread: no per-chunk Python objects, no event-loop round trip per block. Measured on loopback
TLS, this reaches curl's throughput where asyncio's SSL transport reached half of it
(shared/PERFORMANCE.md).

The event loop hears about progress at most every ``FLUSH_S`` (one ``call_soon_threadsafe``),
and a pause or cancel sets a flag the thread checks per block and shuts the socket down
(``interrupt``) so a blocked read returns at once; the task waits for the thread, so the file
never changes after the task has stopped and the counters agree with it. Throttling is a
token bucket consulted per block from the thread.

``on_block(pos, data)``, when given, is called in the worker thread after each block is
written (for a tee: checksums, uploads); ``data`` is only valid during the call.

A body that only yields chunks (a plugin's ``Body.chunks``) goes through :class:`ChunkPump`
instead: the chunks are gathered into blocks on the loop and each block is written by a
worker thread. Both pumps can be ``cut`` while they run, which is how the split policy
(kernel/transfer.py) hands the rest of a slow range to new connections, whatever the source.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, Required, TypedDict, TypeVar, Unpack, runtime_checkable

from kernel._files import disk_error, pwrite_all, write_at
from kernel.errors import PermanentError, TransientError
from kernel.types import BlockingBody, Body, QueuingBody

__all__ = ["BlockingBody", "ChunkPump", "Pump", "PumpOptions", "is_blocking", "run_in_thread"]

FLUSH_S = 0.25  # the longest a block is held, and the most often the loop hears of progress

T = TypeVar("T")


@runtime_checkable
class _Closeable(Protocol):
    def close(self) -> None: ...


def is_blocking(body: object) -> bool:
    """Whether ``body`` declares the fast path (kernel.types.BlockingBody)."""
    return isinstance(body, BlockingBody)


def run_in_thread(
    fn: Callable[..., T], *args: Any, name: str = "modelkernel-io"
) -> asyncio.Future[T]:
    """Run ``fn(*args)`` in a new daemon thread; its result as a future of the running loop.
    (Not the default executor: a transfer holds its thread for the whole body, and hundreds
    may run at once.)"""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def main() -> None:
        try:
            value: Any = fn(*args)
            ok = True
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, raised there
            value, ok = exc, False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody waits any more
            if ok and isinstance(value, _Closeable):
                value.close()

    threading.Thread(target=main, name=name, daemon=True).start()
    return future


class PumpOptions(TypedDict, total=False):
    """What both pumps take besides their body and throttle (see :class:`Pump`)."""

    end: int | None
    limit: int | None
    block_size: Required[Callable[[], int]]
    hasher: Any
    on_block: Callable[[int, memoryview], None] | None
    on_written: Callable[[int], None] | None


class _Writer:
    """Where a pump's bytes go and who hears of them: the part of both pumps that is one."""

    def __init__(self, fd: int, path: str, pos: int, **options: Unpack[PumpOptions]) -> None:
        self.fd = fd
        self.path = path
        self.pos = pos  # bytes on disk up to here
        self.published = pos  # bytes the loop has been told of
        self.end = options.get("end")
        self.limit = options.get("limit")
        self.block_size = options["block_size"]
        self.hasher = options.get("hasher")
        self.on_block = options.get("on_block")
        self.on_written = options.get("on_written")

    def _landed(self, data: memoryview) -> None:
        """``data`` is on disk at ``pos``: hash it, hand it on, count it."""
        if self.hasher is not None:
            self.hasher.update(data)
        if self.on_block is not None:
            self.on_block(self.pos, data)
        if self.on_written is not None:
            self.on_written(len(data))
        self.pos += len(data)


class Pump(_Writer):
    """Moves ``body`` into ``fd`` from ``pos`` on, up to ``end`` (exclusive) when given.

    ``limit`` is the file size the origin announced: a body that goes past it is refused.
    ``block_size()`` and ``throttle(n, stop)`` are called from the worker thread per block.
    ``await pump.run(on_progress)`` runs it; ``on_progress(delta)`` is called on the loop
    with the bytes written since the last call (at most every FLUSH_S, and once at the end).
    """

    def __init__(
        self,
        body: BlockingBody,
        fd: int,
        path: str,
        pos: int,
        *,
        throttle: Callable[[int, threading.Event], None] | None = None,
        **options: Unpack[PumpOptions],
    ) -> None:
        super().__init__(fd, path, pos, **options)
        self.body = body
        self.throttle = throttle
        self.stop = threading.Event()
        self._lock = threading.Lock()  # guards end and _reserved (see cut)
        self._reserved = pos  # the end of the block being written now
        self.busy_s = 0.0  # CPU seconds the worker thread has used (read by the split policy)
        self.tid: int | None = None  # the worker thread's native id, once it runs
        # After each block, was the socket drained (the origin is slower than this reader)?
        # Counted when the body can tell (an optional ``queued() -> int``: bytes waiting).
        self.blocks = 0
        self.drained = 0
        self._pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_progress: Callable[[int], None] = lambda _n: None

    async def run(self, on_progress: Callable[[int], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_progress = on_progress
        done = run_in_thread(self._work, name="modelkernel-pump")
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self.stop.set()
            self.body.interrupt()
            await asyncio.wait({done})
            if not done.cancelled():
                done.exception()  # a stopped read may fail; that is expected, not reported
            raise
        finally:
            self._publish()

    def cut(self, at: int) -> int:
        """Make the pump stop at ``at`` instead of its end (or after the block it is writing
        now, if that reaches further); the offset it will stop at. Thread-safe: bytes of the
        block being read that fall past the cut are dropped (the new segment fetches them)."""
        with self._lock:
            at = max(at, self._reserved)
            if self.end is not None:
                at = min(at, self.end)
            self.end = at
            return at

    def _publish(self) -> None:
        """On the loop: report the bytes written since the last report."""
        self._pending = False
        delta = self.pos - self.published
        if delta:
            self.published += delta
            self._on_progress(delta)

    def _work(self) -> None:
        buffer = bytearray(0)
        view = memoryview(buffer)
        last_publish = time.monotonic()
        cpu_start = time.thread_time()
        self.tid = threading.get_native_id()
        body, stop = self.body, self.stop
        queued = body.queued if isinstance(body, QueuingBody) else None  # bytes in the socket
        while not stop.is_set():
            with self._lock:
                want = self.block_size()
                if self.end is not None:
                    want = min(want, self.end - self.pos)
                    if want <= 0:
                        return
            if len(buffer) < want:
                view.release()
                buffer = bytearray(want)
                view = memoryview(buffer)
            block = view[:want]
            n = body.readinto_blocking(block, FLUSH_S)
            if n == 0:
                return
            if self.limit is not None and self.pos + n > self.limit:
                raise PermanentError(
                    f"The server sent more bytes than the {self.limit} it announced."
                )
            with self._lock:  # a cut while this block was read keeps only what is ours
                keep = n if self.end is None else max(0, min(n, self.end - self.pos))
                self._reserved = self.pos + keep
            if keep:
                self._write(block[:keep])
            if keep < n:
                return  # the rest belongs to the segment cut from this one
            self.busy_s = time.thread_time() - cpu_start
            if queued is not None and (waiting := queued()) >= 0:
                self.blocks += 1
                self.drained += waiting < want
            now = time.monotonic()
            if now - last_publish >= FLUSH_S and not self._pending:
                last_publish = now
                self._pending = True
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(self._publish)
                except RuntimeError:  # the loop is gone: stop
                    return
            if self.throttle is not None:
                self.throttle(n, stop)

    def _write(self, data: memoryview) -> None:
        try:
            pwrite_all(self.fd, data, self.pos)
        except OSError as exc:
            raise disk_error(exc, self.path) from exc
        self._landed(data)


class ChunkPump(_Writer):
    """Moves a chunk-yielding ``body`` into ``fd`` from ``pos`` on, up to ``end`` (exclusive)
    when given: chunks are gathered into blocks of ``block_size()`` bytes (or what arrived
    within ``FLUSH_S``), each written at its offset by a worker thread. ``throttle(n)`` is
    awaited per chunk. ``await pump.run(on_progress)`` runs it; ``on_progress(delta)`` is
    called as each block lands. The counters the split policy reads (``pos``, ``published``,
    ``busy_s``, ``blocks``, ``drained``, ``tid``) are those of :class:`Pump`; this loop has no
    thread of its own to measure, so it always looks like it waits on its source."""

    tid: int | None = None
    busy_s = 0.0
    blocks = 0
    drained = 0

    def __init__(
        self,
        body: Body,
        fd: int,
        path: str,
        pos: int,
        *,
        throttle: Callable[[int], Awaitable[None]],
        **options: Unpack[PumpOptions],
    ) -> None:
        super().__init__(fd, path, pos, **options)
        self.body = body
        self.throttle = throttle
        self._buffer = bytearray()

    def cut(self, at: int) -> int:
        """Make the pump stop at ``at`` instead of its end (never before the bytes it holds
        already); the offset it will stop at. Called on the loop, as the pump runs on it."""
        at = max(at, self.pos + len(self._buffer))
        if self.end is not None:
            at = min(at, self.end)
        self.end = at
        return at

    async def run(self, on_progress: Callable[[int], None]) -> None:
        buffer = self._buffer
        flushed_at = time.monotonic()

        async def flush() -> None:
            nonlocal flushed_at
            data = bytes(buffer)
            buffer.clear()
            flushed_at = time.monotonic()
            try:
                await write_at(self.fd, memoryview(data), self.pos, self.path)
            except asyncio.CancelledError:
                landed(data)  # a cancelled write is let land first: count it, once
                raise
            landed(data)

        def landed(data: bytes) -> None:
            self._landed(memoryview(data))
            self.published = self.pos
            on_progress(len(data))

        try:
            async for chunk in self.body.chunks():
                held = self.pos + len(buffer)
                if self.limit is not None and held + len(chunk) > self.limit:
                    raise PermanentError(
                        f"The server sent more bytes than the {self.limit} it announced."
                    )
                if self.end is not None and held + len(chunk) >= self.end:
                    buffer += chunk[: self.end - held]  # past a cut: the new segment's bytes
                    break
                buffer += chunk
                await self.throttle(len(chunk))
                if len(buffer) >= self.block_size() or time.monotonic() - flushed_at >= FLUSH_S:
                    await flush()
        except (asyncio.CancelledError, TransientError):
            if buffer:  # keep every byte received: a resume continues after them
                await flush()
            raise
        if buffer:
            await flush()

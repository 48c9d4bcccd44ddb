"""One origin fetch per file for a whole fleet, through an S3 bucket and a lease.

``FleetSource`` wraps the source another plugin resolved (``http_source``, ``hf_source``...)
and is what the kernel's transfer loop sees; the loop itself is unchanged and every node still
verifies size and sha256 before its rename. ``open(offset)``:

* the file is complete in the bucket (its lease says so): a ranged GET of the object, like any
  resumable source: 0 bytes from the origin;
* this node wins the file's lease: it is the holder. It streams the origin and tees every byte
  into a multipart upload (one part per ``part_size`` bytes) while its own transfer writes its
  file; after the last part it completes the upload and marks the lease complete. A takeover
  (the previous holder died or stopped) lists the uploaded parts (ListParts) and resumes the
  origin with Range from the first missing part; when its own file is behind that point it
  first fills the bucket and then reads its file from it;
* someone else holds the lease: wait (``LeaseBoard.wait_change``: LISTEN/NOTIFY and polling on
  ``pg_store``'s board) until the file is complete, or the lease runs out (then claim it).

A holder that loses its lease (fenced by the token) stops fetching: its stream raises a
transient fault, the transfer reopens, and this node then reads from the bucket like the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import structlog

from kernel.config import ConfigError, Settings
from kernel.errors import LeaseLost, PermanentError, StoreError, TransientError, ValidatorChanged
from kernel.types import (
    Body,
    FileSetSource,
    Lease,
    LeaseBoard,
    NamedSource,
    PickingSource,
    Probe,
    RemoteFile,
    Source,
)
from plugins.s3_cache.client import Part, S3Client, S3Error, iterate

__all__ = ["Fleet", "FleetSource", "file_key", "fleet_source"]

log = structlog.get_logger()
# Parts uploading while the holder reads on: it reads at most this many parts ahead of its
# uploads, which bounds what a takeover must fetch again (and the memory: part_size each).
UPLOADS_IN_FLIGHT = 1
PROGRESS_S = 0.5  # how often a holder writes its progress to the lease (the waiters' view)
BYPASS_AFTER = 2  # bucket failures in a row after which a node fetches from the origin itself


def file_key(url: str, validator: str | None, sha256: str | None) -> str:
    """The key a file's lease is under: its sha256 when known (the same bytes from any URL),
    else the URL and the validator (ETag) of the version being fetched."""
    if sha256:
        return f"sha256:{sha256.lower()}"
    return f"url:{url}#{validator or ''}"


class Fleet:
    """This node's lease board (the store's) and bucket client, started on first use."""

    def __init__(self, settings: Settings, leases: LeaseBoard, env: dict[str, str]) -> None:
        s3 = settings.cache.s3
        assert s3 is not None
        self.node_id = leases.node_id
        self.models_dir = str(Path(settings.storage.models_dir).resolve())
        self.part_size = s3.part_size
        self.prefix = s3.prefix
        self.leases = leases
        access, secret = env.get(s3.access_key_env), env.get(s3.secret_key_env)
        if not access or not secret:
            raise ConfigError(
                f"cache.s3 is set but ${s3.access_key_env} / ${s3.secret_key_env} are not: "
                "the bucket's keys come from those environment variables."
            )
        self.s3 = S3Client(
            s3.endpoint, s3.bucket, access_key=access, secret_key=secret, region=s3.region
        )
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self.keys: dict[str, str] = {}  # source ref -> file key (for cancels)
        self.cache_failures = 0  # bucket failures in a row (reset by a success)
        self.origin_bytes = 0  # bytes this node read from origins as a holder
        self.bucket_bytes = 0  # bytes this node read from the bucket

    async def start(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self.leases.start()
                self._started = True

    async def close(self) -> None:
        if self._started:
            await self.leases.close()
        await self.s3.aclose()

    def object_key(self, key: str, sha256: str | None) -> str:
        if sha256:
            return f"{self.prefix}sha256/{sha256.lower()}"
        return f"{self.prefix}url/{hashlib.sha256(key.encode()).hexdigest()}"

    async def forget(self, ref: str, model_id: str) -> None:
        """A download of ``ref`` on this node was cancelled: when no node of the fleet still
        wants the file, stop the shared fetch for good (abort the multipart upload)."""
        key = self.keys.get(ref)
        if key is None or not self._started:
            return
        if await self.leases.unwant(key, model_id) > 0:
            return
        state = await self.leases.read(key)
        if state is None or state.state == "complete":
            return
        upload_id, obj = state.info.get("upload_id"), state.info.get("object")
        if state.live and state.holder not in (None, self.node_id):
            return  # someone is fetching it right now (for a download it was not told of)
        if upload_id and obj:
            with contextlib.suppress(S3Error):
                await self.s3.abort_multipart(obj, upload_id)
        await self.leases.reset(key, state="aborted")
        log.info("fleet.fetch_aborted", file_key=key)

    async def done_with(self, ref: str, model_id: str) -> None:
        key = self.keys.get(ref)
        if key is not None and self._started:
            await self.leases.unwant(key, model_id)


class _ChunkBody:
    def __init__(
        self,
        start: int,
        total: int | None,
        validator: str | None,
        chunks: AsyncIterator[bytes],
        close: Any = None,
    ) -> None:
        self.start = start
        self.total = total
        self.validator = validator
        self._chunks = chunks
        self._close = close

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        if self._close is not None:
            await self._close()


class _Tee:
    """Feeds the origin stream, from a part boundary on, into numbered parts."""

    def __init__(self, fleet: Fleet, obj: str, upload_id: str, lease: Lease, first: int) -> None:
        self.fleet = fleet
        self.obj = obj
        self.upload_id = upload_id
        self.lease = lease
        self.next_number = first
        self.buffer = bytearray()
        self.parts: dict[int, Part] = {}
        self._slots = asyncio.Semaphore(UPLOADS_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        try:
            self.lease.check()
        except LeaseLost as exc:
            raise TransientError(
                "Another node took over the fleet's fetch of this file.", reason="lease_lost"
            ) from exc

    async def feed(self, data: bytes) -> None:
        self._check()
        self.buffer += data
        size = self.fleet.part_size
        while len(self.buffer) >= size:
            await self._upload(bytes(memoryview(self.buffer)[:size]))  # one copy, not two
            del self.buffer[:size]

    async def _upload(self, data: bytes) -> None:
        number = self.next_number
        self.next_number += 1
        await self._slots.acquire()
        self._check()

        async def run() -> None:
            try:
                etag = await self.fleet.s3.upload_part(self.obj, self.upload_id, number, data)
                self.parts[number] = Part(number, etag, len(data))
                self.fleet.cache_failures = 0
            except S3Error as exc:
                self.fleet.cache_failures += exc.transient
                self._error = TransientError(f"Uploading to the cache failed: {exc.message}")
            finally:
                self._slots.release()

        task = asyncio.create_task(run(), name=f"s3-part-{number}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> list[Part]:
        if self.buffer:
            await self._upload(bytes(self.buffer))
            self.buffer.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._check()
        return [self.parts[n] for n in sorted(self.parts)]

    async def settle(self, within: float) -> None:
        """Let the parts already cut finish uploading (a successor keeps them), up to
        ``within`` seconds; then cancel what is left."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=within)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))


class FleetSource:
    """A Source that fetches through the fleet: see the module docstring."""

    supports_segments = False  # one ordered stream, so the tee can cut it into parts

    def __init__(self, inner: Source, fleet: Fleet, model_id: str | None) -> None:
        self.inner = inner
        self.fleet = fleet
        self.model_id = model_id or inner.ref
        self._probe: Probe | None = None
        self._key: str | None = None
        self._obj: str | None = None

    @property
    def ref(self) -> str:
        return self.inner.ref

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def probe(self) -> Probe:
        await self.fleet.start()
        probe = await self.inner.probe()  # metadata only: no body bytes from the origin
        self._probe = probe
        self._key = file_key(probe.final_url or self.ref, probe.validator, probe.sha256)
        self._obj = self.fleet.object_key(self._key, probe.sha256)
        self.fleet.keys[self.ref] = self._key
        return probe

    async def open(self, offset: int, validator: str | None, end: int | None = None) -> Body:
        if self._probe is None:
            await self.probe()
        probe, key = self._probe, self._key
        assert probe is not None
        assert key is not None
        if offset and validator and probe.validator and validator != probe.validator:
            raise ValidatorChanged("The remote file changed since the partial download began.")
        try:
            await self.fleet.leases.want(key, self.model_id)
            while True:
                state = await self.fleet.leases.read(key)
                if state is not None and state.state == "complete":
                    body = await self._from_bucket(offset)
                    if body is not None:
                        return body
                    continue
                lease = await self.fleet.leases.claim(
                    key, size=probe.size, info={"object": self._obj, "validator": probe.validator}
                )
                if lease is not None:
                    body = await self._as_holder(lease, offset)
                    if body is not None:
                        return body
                    continue  # filled the bucket first: read it from there
                await self.fleet.leases.wait_change(key)
        except StoreError as exc:
            raise TransientError(f"The fleet's database is unreachable: {exc.message}") from exc
        except S3Error as exc:
            if not exc.transient:
                raise PermanentError(
                    f"The fleet's cache refused a request: {exc.message}"
                ) from exc
            self.fleet.cache_failures += 1
            if self.fleet.cache_failures < BYPASS_AFTER:
                raise TransientError(f"The fleet's cache is unreachable: {exc.message}") from exc
        # The bucket keeps failing: the cache is an optimisation, not a dependency. Fetch from
        # the origin directly, like a node without the cache (the lease is not held).
        log.warning("fleet.cache_bypassed", failures=self.fleet.cache_failures, ref=self.ref)
        return await self.inner.open(offset, validator)

    # --- reading the complete object -------------------------------------------------------

    async def _from_bucket(self, offset: int) -> Body | None:
        assert self._probe is not None
        assert self._obj is not None
        size = self._probe.size
        if size is not None and offset >= size:
            return _ChunkBody(offset, size, self._probe.validator, _nothing())
        try:
            response = await self.fleet.s3.get(self._obj, offset)
        except S3Error as exc:
            if exc.status != 404:
                raise
            # The lease says complete but the object is gone (deleted by hand, a lifecycle
            # rule): fetch it again.
            assert self._key is not None
            await self.fleet.leases.reset(self._key)
            return None
        self.fleet.cache_failures = 0
        log.info("fleet.from_bucket", object=self._obj, offset=offset)

        async def chunks() -> AsyncIterator[bytes]:
            async for data in iterate(response):
                self.fleet.bucket_bytes += len(data)
                yield data

        return _ChunkBody(offset, size, self._probe.validator, chunks(), response.aclose)

    # --- holding the lease -------------------------------------------------------------------

    async def _as_holder(self, lease: Lease, offset: int) -> Body | None:
        assert self._probe is not None
        assert self._obj is not None
        probe, obj, s3 = self._probe, self._obj, self.fleet.s3
        part_size = self.fleet.part_size
        try:
            upload_id = lease.info.get("upload_id")
            uploaded: list[Part] = []
            if upload_id:
                try:
                    uploaded = await s3.list_parts(obj, upload_id)
                except S3Error as exc:
                    if exc.status != 404:
                        raise
                    upload_id = None  # aborted or expired: start a new one
            if not upload_id:
                upload_id = await s3.create_multipart(obj)
                try:
                    await lease.write(info={"upload_id": upload_id, "object": obj}, done=0)
                except LeaseLost:
                    with contextlib.suppress(S3Error):
                        await s3.abort_multipart(obj, upload_id)
                    return None
            prefix: list[Part] = []
            for part in uploaded:  # the contiguous full parts from part 1 on are kept
                if part.number != len(prefix) + 1 or part.size != part_size:
                    break
                prefix.append(part)
            resume_at = len(prefix) * part_size
            if probe.size is not None and resume_at >= probe.size:
                resume_at, prefix = 0, []  # inconsistent listing: upload it all again
            if resume_at and not probe.accept_ranges:
                resume_at, prefix = 0, []
            log.info(
                "fleet.holder",
                object=obj,
                token=lease.token,
                parts_kept=len(prefix),
                resume_at=resume_at,
                local_offset=offset,
            )
            lease.start_heartbeat()
            tee = _Tee(self.fleet, obj, upload_id, lease, len(prefix) + 1)
            origin = await self.inner.open(resume_at, probe.validator if resume_at else None)
            if origin.start != resume_at:  # the origin sent the whole file: upload it all
                resume_at, prefix = origin.start, []
                tee = _Tee(self.fleet, obj, upload_id, lease, 1)
        except BaseException:
            await lease.release()
            raise
        ended = False

        async def stop_holding(completed: bool) -> None:
            """Stop holding, once: from the stream's end, or from the body's close when the
            stream was never read (a pause right after the open)."""
            nonlocal ended
            if ended:
                return
            ended = True
            await tee.settle(0.0 if completed or not lease.valid else 5.0)
            await origin.aclose()
            if completed:
                await lease.stop_heartbeat()
            else:
                await lease.release()

        stream = self._tee_stream(lease, tee, origin, prefix, resume_at, offset, stop_holding)
        if offset >= resume_at:
            return _ChunkBody(
                offset, probe.size, probe.validator, stream, lambda: stop_holding(False)
            )
        # This node's own file is behind the first missing part: fill the bucket from the
        # origin first (nothing of it is ours yet), then read our file from the bucket.
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()
            await stop_holding(False)
        return None

    async def _tee_stream(
        self,
        lease: Lease,
        tee: _Tee,
        origin: Body,
        prefix: list[Part],
        pos: int,
        offset: int,
        stop_holding: Callable[[bool], Awaitable[None]],
    ) -> AsyncGenerator[bytes, None]:
        assert self._probe is not None
        obj, s3 = tee.obj, self.fleet.s3
        size = self._probe.size
        completed = False
        last_report = time.monotonic()
        try:
            async for data in origin.chunks():
                self.fleet.origin_bytes += len(data)
                await tee.feed(data)
                end = pos + len(data)
                if end > offset:
                    yield data[max(offset - pos, 0) :] if pos < offset else data
                pos = end
                if time.monotonic() - last_report >= PROGRESS_S:
                    last_report = time.monotonic()
                    await self._report(lease, pos)
            if size is not None and pos < size:
                raise TransientError(
                    f"The origin's body ended after {pos} of {size} bytes.", reason="short_body"
                )
            parts = prefix + await tee.finish()
            if not lease.valid:
                raise TransientError(
                    "Another node took over the fleet's fetch of this file.", reason="lease_lost"
                )
            try:
                await s3.complete_multipart(obj, tee.upload_id, parts)
            except S3Error as exc:
                info = await s3.head(obj)
                if info is None or (size is not None and info.size != size):
                    raise TransientError(
                        f"Completing the cached copy failed: {exc.message}"
                    ) from exc
            with contextlib.suppress(LeaseLost):
                await lease.complete(size=pos)
            completed = True
            log.info("fleet.cached", object=obj, bytes=pos, parts=len(parts))
        except (StoreError, S3Error) as exc:
            raise TransientError(f"The fleet's cache failed: {exc}") from exc
        finally:
            await stop_holding(completed)

    async def _report(self, lease: Lease, pos: int) -> None:
        try:
            await lease.write(done=pos)
        except LeaseLost as exc:
            raise TransientError(
                "Another node took over the fleet's fetch of this file.", reason="lease_lost"
            ) from exc
        except StoreError as exc:
            log.warning("fleet.progress_not_saved", error=exc.message)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


# --- what the wrapped source declares, the wrapper declares too -------------------------------
# The kernel asks a source what it can do with isinstance against kernel.types' Protocols, so a
# wrapper must declare exactly the capabilities of the source it wraps: no more (the kernel
# would call what the inner lacks), no fewer (a repository reference would lose its file
# picking). Each optional capability is a mixin that hands the call to the inner source, and
# fleet_source() builds the class with the ones the inner declares.


class _Named(FleetSource):
    @property
    def filename(self) -> str | None:
        return cast(NamedSource, self.inner).filename


class _Picking(FleetSource):
    async def resolve_filename(self, filename: str | None) -> str | None:
        return await cast(PickingSource, self.inner).resolve_filename(filename)


class _FileSet(FleetSource):
    async def resolve_files(
        self, filename: str | None, include: list[str] | None
    ) -> list[RemoteFile] | None:
        return await cast(FileSetSource, self.inner).resolve_files(filename, include)


_CAPABILITIES: tuple[tuple[type, type[FleetSource]], ...] = (
    (NamedSource, _Named),
    (PickingSource, _Picking),
    (FileSetSource, _FileSet),
)
_classes: dict[tuple[type[FleetSource], ...], type[FleetSource]] = {}


def fleet_source(inner: Source, fleet: Fleet, model_id: str | None) -> FleetSource:
    """A FleetSource around ``inner`` declaring the optional capabilities ``inner`` declares."""
    mixins = tuple(mixin for protocol, mixin in _CAPABILITIES if isinstance(inner, protocol))
    cls = _classes.get(mixins)
    if cls is None:
        cls = FleetSource if not mixins else type("FleetSource", (*mixins, FleetSource), {})
        _classes[mixins] = cls
    return cls(inner, fleet, model_id)

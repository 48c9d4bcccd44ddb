"""DownloadManager: the state machine, the queue, and pause / resume / cancel.

One event loop owns every record. Transitions happen synchronously in the loop (so two API
calls can never interleave inside one), each one is saved to the store and published on the
bus. Actions on one model id are serialised by a per-id lock; pause and cancel return only
once the transfer task has stopped.

    queued -> downloading -> (creating_engine) -> completed
    any non-terminal -> cancelled;  downloading / creating_engine -> failed
    downloading <-> paused (resume goes through queued when no slot is free)
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from kernel._files import remove
from kernel._saves import RecordWriter
from kernel.config import MAX_RATE, Settings
from kernel.errors import (
    DownloadExists,
    DownloadNotFound,
    InvalidRequest,
    InvalidState,
    KernelError,
    PermanentError,
)
from kernel.events import EventBus
from kernel.fileset import FileSetTransfer
from kernel.netpolicy import NetPolicy
from kernel.throttle import TokenBucket
from kernel.transfer import Transfer, now_ms
from kernel.types import (
    TERMINAL,
    DownloadCreated,
    DownloadProgress,
    DownloadRecord,
    DownloadStatus,
    DownloadStore,
    EngineBackend,
    EngineSpec,
    FileRecord,
    FileSetSource,
    ModelFileBackend,
    ModelType,
    NamedSource,
    PickingSource,
    RemoteFile,
    Source,
    Status,
)
from kernel.validation import validate_filename, validate_model_id, validate_url

if TYPE_CHECKING:
    from kernel.engines import EngineRegistry
    from kernel.plugins import Plugins

__all__ = [
    "TRANSITIONS",
    "DownloadManager",
    "check_transition",
    "validate_filename",
    "validate_model_id",
    "validate_url",
]

log = structlog.get_logger()

PROGRESS_INTERVAL_S = 0.25  # at most 4 progress events a second per download
CHECKPOINT_INTERVAL_S = 1.0  # progress saved to the store at least this often

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"downloading", "paused", "cancelled", "failed"}),
    "downloading": frozenset(
        {"queued", "paused", "creating_engine", "completed", "failed", "cancelled"}
    ),
    "paused": frozenset({"queued", "downloading", "cancelled"}),
    "creating_engine": frozenset({"completed", "failed", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


def check_transition(old: str, new: str) -> None:
    if new not in TRANSITIONS[old]:
        raise RuntimeError(f"Illegal download transition {old} -> {new}.")


class DownloadManager:
    def __init__(
        self,
        settings: Settings,
        plugins: Plugins,
        store: DownloadStore,
        bus: EventBus,
        engines: EngineRegistry,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.store = store
        self.bus = bus
        self.engines = engines
        self.models_dir = Path(settings.storage.models_dir).resolve()
        self.records: dict[str, DownloadRecord] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._phase: dict[str, str] = {}  # model id -> "transfer" | "finalizing" | "engine"
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self.writer = RecordWriter(store)  # saves in order; replies wait for durability
        self._last_progress: dict[str, float] = {}
        self._last_checkpoint: dict[str, float] = {}
        self._seq = 0
        self._stopping = False
        self._held = 0  # > 0 while a bulk cancel runs: nothing new starts
        self.bucket = TokenBucket(lambda: self.settings.downloads.max_bytes_per_second)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        for rec in sorted(await self.store.load_all(), key=lambda r: r.seq):
            self.records[rec.model_id] = rec
            self._seq = max(self._seq, rec.seq)
        await self._prune_ended()
        await asyncio.to_thread(self._report_orphan_parts)
        for rec in self.records.values():
            if self._outside(rec) is not None and rec.status not in TERMINAL:
                log.warning(
                    "download.outside_models_dir",
                    model_id=rec.model_id,
                    path=self._outside(rec),
                    models_dir=str(self.models_dir),
                )
        for rec in self.records.values():
            if rec.status == "downloading":
                rec.status = "queued"  # resumes from its .part file when a slot frees
            elif rec.status == "creating_engine":
                self._start_engine_task(rec)
        self._schedule()

    async def _prune_ended(self) -> None:
        days = self.settings.downloads.retention_days
        if days <= 0:
            return
        cutoff = now_ms() - days * 86_400_000
        for rec in list(self.records.values()):
            if rec.status in TERMINAL and (rec.end_time or rec.created_at) < cutoff:
                del self.records[rec.model_id]
                self.writer.delete(rec.model_id)
                await self.writer.wait(rec.model_id)
                log.info("download.pruned", model_id=rec.model_id, status=rec.status)

    def _report_orphan_parts(self) -> None:
        """A ``.part`` no record owns is reported, never deleted silently."""
        owned = {path for rec in self.records.values() for path in rec.part_paths()}
        for part in self.models_dir.glob("*/*.part"):
            if str(part) not in owned:
                log.warning("download.orphan_part", path=str(part), bytes=part.lstat().st_size)

    async def stop(self) -> None:
        """Stop every task; records keep their status so the next start resumes them."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for rec in self.records.values():
            if rec.status not in TERMINAL:
                self._persist(rec)
        await self.flush()

    async def flush(self) -> None:
        """Wait until every save asked for so far has reached the store."""
        await self.writer.drain()

    # --- queries -------------------------------------------------------------------------

    def get(self, model_id: str) -> DownloadRecord:
        try:
            return self.records[model_id]
        except KeyError:
            raise DownloadNotFound(model_id) from None

    def list(self, statuses: frozenset[str] | None = None) -> list[DownloadRecord]:
        records = sorted(self.records.values(), key=lambda r: r.seq)
        if statuses is None:
            return [r for r in records if r.status not in TERMINAL]
        return [r for r in records if r.status in statuses]

    def queue(self) -> builtins.list[DownloadRecord]:
        """Queued downloads in the order they will start: priority, then FIFO."""
        queued = [r for r in self.records.values() if r.status == "queued"]
        return sorted(queued, key=lambda r: (-r.priority, r.seq))

    def queue_positions(self) -> dict[str, int]:
        """Every queued download's 1-based place in the queue (one sort for all of them)."""
        return {rec.model_id: position for position, rec in enumerate(self.queue(), start=1)}

    def queue_position(self, model_id: str) -> int | None:
        return self.queue_positions().get(model_id)

    # --- actions -------------------------------------------------------------------------

    async def create(
        self,
        *,
        model_id: str,
        url: str,
        model_type: ModelType = "llm",
        sha256: str | None = None,
        filename: str | None = None,
        priority: int = 0,
        engine: EngineSpec | None = None,
        max_bytes_per_second: int = 0,
        include: builtins.list[str] | None = None,
    ) -> DownloadRecord:
        validate_model_id(model_id)
        validate_url(url)
        NetPolicy(self.settings.network).check_url(url)  # a refused host or address: 400
        if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise InvalidRequest("sha256 must be 64 hexadecimal characters.", param="sha256")
        _check_rate(max_bytes_per_second)
        if include is not None and (
            not include or any(not p or len(p) > 1024 for p in include) or len(include) > 100
        ):
            raise InvalidRequest(
                "include must be a list of 1 to 100 non-empty file name patterns.", param="include"
            )
        source = self.plugins.resolve_source(url)
        remote: builtins.list[RemoteFile] | None = None
        try:
            if isinstance(source, FileSetSource):
                # A split model's shards, or a repository's files picked by include patterns.
                remote = await source.resolve_files(filename, include)
            elif include is not None:
                raise InvalidRequest(
                    f"include picks several files of a repository (hf://owner/repo); {url} "
                    "names one file.",
                    param="include",
                )
            if remote is not None:
                name = ""
            elif isinstance(source, PickingSource):
                # The source may pick the file itself (a repository ref plus "*Q4_K_M.*":
                # it lists the repository); its ref then names that one file, kept in the record.
                filename = await source.resolve_filename(filename)
                url = source.ref
            if remote is None:
                name = (
                    validate_filename(filename) if filename else _default_filename(source, model_id)
                )
        finally:
            await source.aclose()  # the transfer task resolves its own
        if engine is not None:
            engine = self.engines.validate(engine)  # names the default engine when none is
        async with self._locks[model_id]:
            existing = self.records.get(model_id)
            if existing is not None and existing.status not in TERMINAL:
                raise DownloadExists(model_id, existing.status)
            self._seq += 1
            now = now_ms()
            files = None if remote is None else _file_records(self.models_dir / model_id, remote)
            rec = DownloadRecord(
                model_id=model_id,
                url=url,
                local_path=(
                    str(self.models_dir / model_id / name)
                    if files is None
                    else _primary(self.models_dir / model_id, files, self.engines.loader(engine))
                ),
                files=files,
                total_bytes=sum(f.size for f in files) if files else 0,
                download_type="startup" if engine is not None else "regular",
                model_type=model_type,
                engine=engine,
                priority=priority,
                seq=self._seq,
                created_at=now,
                start_time=now,
                expected_sha256=sha256.lower() if sha256 else None,
                max_bytes_per_second=max_bytes_per_second,
            )
            await self._adopt_or_drop_part(rec, existing)
            self.records[model_id] = rec
            self._persist(rec)
            self.bus.publish(DownloadCreated(_snapshot(rec)))
            log.info("download.created", model_id=model_id, url=url, path=rec.local_path)
            self._schedule()
            await self.writer.wait(model_id)  # the reply promises a durable download
            return rec

    async def _adopt_or_drop_part(self, rec: DownloadRecord, old: DownloadRecord | None) -> None:
        """A ``.part`` left by the ended download this one replaces is continued when it is the
        same file (same URL and path: its validator guards the resume); any other ``.part`` at
        this path is someone else's bytes and is removed, so two files are never spliced."""
        if rec.files is not None or (old is not None and old.files is not None):
            await self._adopt_or_drop_parts(rec, old)
            return
        if old is not None and old.url == rec.url and old.local_path == rec.local_path:
            rec.file_validator = old.file_validator  # what the final file, if any, is
            if old.validator:
                rec.validator = old.validator
                rec.total_bytes = old.total_bytes
                rec.segments = old.segments
                return
        if await self._remove(rec.part_path):
            log.info("download.stale_part_removed", path=rec.part_path)

    async def _adopt_or_drop_parts(self, rec: DownloadRecord, old: DownloadRecord | None) -> None:
        """The same rule for a set of files, file by file: a file of the old set with the same
        reference and place continues from its ``.part`` (or is found in place)."""
        if rec.files is None:
            if await self._remove(rec.part_path):
                log.info("download.stale_part_removed", path=rec.part_path)
            return
        kept: dict[str, FileRecord] = {}
        if old is not None and old.files is not None:
            kept = {f.local_path: f for f in old.files}
        for f in rec.files:
            before = kept.get(f.local_path)
            if before is not None and before.url == f.url:
                f.file_validator = before.file_validator  # what the final file, if any, is
                if before.validator:
                    f.validator, f.segments = before.validator, before.segments
                    f.size = before.size or f.size
                    continue
            if await self._remove(f.part_path):
                log.info("download.stale_part_removed", path=f.part_path)

    async def ensure_startup(
        self, model_id: str, url: str, model_type: ModelType, engine: EngineSpec
    ) -> DownloadRecord:
        """The config's ``models:`` entry as a startup download, made idempotent across boots:
        the same URL already downloaded (or on its way) is not fetched again, a completed one
        only gets its engine; a changed URL replaces the old download."""
        rec = self.records.get(model_id)
        if rec is not None and rec.url == url and rec.status not in ("failed", "cancelled"):
            if rec.status == "completed" and await asyncio.to_thread(
                os.path.exists, rec.local_path
            ):
                if model_id not in self.engines.engines:
                    await self.engines.create(model_id, rec.local_path, rec.model_type, engine)
                return rec
            if rec.status != "completed":
                return rec
        if rec is not None and rec.status not in TERMINAL:
            await self.cancel(model_id)
        return await self.create(model_id=model_id, url=url, model_type=model_type, engine=engine)

    async def purge(
        self, model_id: str, *, delete_file: bool = False
    ) -> tuple[DownloadRecord, bool]:
        """Forget an ended download (cancelling it first if it is still running); with
        ``delete_file`` also remove its completed file. Returns (record, file_deleted)."""
        rec = self.get(model_id)
        if rec.status not in TERMINAL:
            await self._cancel(model_id)
        async with self._locks[model_id]:
            rec = self.get(model_id)
            deleted = False
            if delete_file:
                for path in rec.final_paths():
                    deleted = await self._remove(path) or deleted
                for path in rec.part_paths():
                    await self._remove(path)
            del self.records[model_id]
            self.writer.delete(model_id)  # after every save queued for it, never before
            await self.writer.wait(model_id)
            log.info("download.purged", model_id=model_id, file_deleted=deleted)
            return rec, deleted

    async def set_priority(self, model_id: str, priority: int) -> DownloadRecord:
        """Reorder: a queued download with a higher priority starts first."""
        return await self._change(model_id, "reprioritise", "download.priority", priority=priority)

    async def set_limit(self, model_id: str, max_bytes_per_second: int) -> DownloadRecord:
        """Cap one download's bandwidth (0 = unlimited); a running transfer obeys at once."""
        _check_rate(max_bytes_per_second)
        return await self._change(
            model_id, "limit", "download.limit", max_bytes_per_second=max_bytes_per_second
        )

    async def _change(
        self, model_id: str, action: str, event: str, **fields: int
    ) -> DownloadRecord:
        """Set fields of a download that has not ended, save it, and log ``event``."""
        async with self._locks[model_id]:
            rec = self.get(model_id)
            if rec.status in TERMINAL:
                raise InvalidState(model_id, action, rec.status)
            for name, value in fields.items():
                setattr(rec, name, value)
            self._persist(rec)
            log.info(event, model_id=model_id, **fields)
            await self.writer.wait(model_id)
            return rec

    async def apply_settings(self, settings: Settings) -> None:
        """Adopt new settings at run time (the kernel replaces them whole; nothing is changed
        in place). New transfers start with them; running ones keep theirs, except the
        global cap, which they read from the shared bucket. More slots start queued
        downloads; fewer send the newest back to the queue."""
        self.settings = settings
        current = settings.downloads
        running = sorted(
            (self.records[m] for m, p in self._phase.items() if p == "transfer"),
            key=lambda r: (-r.priority, r.seq),
        )
        for rec in running[current.max_concurrent :]:
            async with self._locks[rec.model_id]:
                if self._phase.get(rec.model_id) == "transfer":
                    await self._stop_task(rec.model_id)
                    if rec.status == "downloading":
                        self._set_status(rec, "queued")
        self._schedule()
        log.info("settings.applied", downloads=msgspec.to_builtins(current))

    async def pause(self, model_id: str) -> DownloadRecord:
        async with self._locks[model_id]:
            rec = self.get(model_id)
            if rec.status not in ("downloading", "queued"):
                raise InvalidState(model_id, "pause", rec.status)
            await self._stop_task(model_id)
            if rec.status not in ("downloading", "queued"):
                raise InvalidState(model_id, "pause", rec.status)
            self._set_status(rec, "paused")
            self._schedule()
            await self.writer.wait(model_id)
            return rec

    async def resume(self, model_id: str) -> DownloadRecord:
        async with self._locks[model_id]:
            rec = self.get(model_id)
            if rec.status != "paused":
                raise InvalidState(model_id, "resume", rec.status)
            rec.attempts = 0
            rec.last_error = None
            self._set_status(rec, "queued")
            self._schedule()
            await self.writer.wait(model_id)
            return rec

    async def cancel(self, model_id: str) -> tuple[DownloadRecord, str]:
        """Cancel one download; returns the record and the status it had."""
        result = await self._cancel(model_id)
        await self.writer.wait(model_id)
        return result

    async def _cancel(self, model_id: str) -> tuple[DownloadRecord, str]:
        async with self._locks[model_id]:
            rec = self.get(model_id)
            if rec.status in TERMINAL:
                raise InvalidState(model_id, "cancel", rec.status)
            previous = rec.status
            await self._stop_task(model_id)
            if rec.status in TERMINAL:
                raise InvalidState(model_id, "cancel", rec.status)
            if previous != "creating_engine":
                for path in rec.part_paths():
                    await self._remove(path)
            self._set_status(rec, "cancelled")
            self._schedule()
            return rec, previous

    async def cancel_all(
        self,
    ) -> tuple[builtins.list[tuple[DownloadRecord, str]], builtins.list[tuple[str, str, str]]]:
        """Cancel every non-terminal download. Returns (cancelled, failed) where failed rows
        are (model_id, status, reason). The queue is held meanwhile: a slot freed by one
        cancellation never starts a download that is about to be cancelled too."""
        cancelled: list[tuple[DownloadRecord, str]] = []
        failed: list[tuple[str, str, str]] = []
        self._held += 1
        try:
            for rec in self.list():
                try:
                    cancelled.append(await self._cancel(rec.model_id))
                except KernelError as exc:
                    failed.append((rec.model_id, rec.status, exc.message))
        finally:
            self._held -= 1
        self._schedule()  # what was created meanwhile
        for rec, _ in cancelled:  # durable before the reply; written together, not one by one
            await self.writer.wait(rec.model_id)
        return cancelled, failed

    # --- scheduling and tasks --------------------------------------------------------------

    def running(self) -> int:
        """Transfers holding a download slot now."""
        return sum(1 for phase in self._phase.values() if phase in ("transfer", "finalizing"))

    def _schedule(self) -> None:
        if self._stopping or self._held:
            return
        free = self.settings.downloads.max_concurrent - self.running()
        for rec in self.queue()[: max(free, 0)]:
            self._start_transfer(rec)

    def _start_transfer(self, rec: DownloadRecord) -> None:
        rec.run_started_at = now_ms()
        rec.run_start_bytes = rec.downloaded_bytes
        rec.end_time = None
        self._set_status(rec, "downloading")
        self._phase[rec.model_id] = "transfer"
        self._tasks[rec.model_id] = asyncio.create_task(
            self._run_transfer(rec), name=f"transfer:{rec.model_id}"
        )

    def _start_engine_task(self, rec: DownloadRecord) -> None:
        self._phase[rec.model_id] = "engine"
        self._tasks[rec.model_id] = asyncio.create_task(
            self._run_engine(rec), name=f"engine:{rec.model_id}"
        )

    async def _stop_task(self, model_id: str) -> None:
        task = self._tasks.get(model_id)
        if task is None:
            return
        if self._phase.get(model_id) != "finalizing":
            task.cancel()  # a finalizing transfer (verify + rename) is let finish instead
        await asyncio.wait({task})

    def _task_done(self, rec: DownloadRecord) -> None:
        if self._tasks.get(rec.model_id) is asyncio.current_task():
            del self._tasks[rec.model_id]
            self._phase.pop(rec.model_id, None)
        self._last_progress.pop(rec.model_id, None)
        self._last_checkpoint.pop(rec.model_id, None)
        self._schedule()

    async def _run_transfer(self, rec: DownloadRecord) -> None:
        model_id = rec.model_id
        with structlog.contextvars.bound_contextvars(model_id=model_id):
            try:
                self._check_inside(rec)
                callbacks: dict[str, Any] = {
                    "on_progress": self._on_progress,
                    "on_finalizing": lambda: self._phase.__setitem__(model_id, "finalizing"),
                    "shared_bucket": self.bucket,
                    "on_retry": self.bus.publish,
                    "verifier": self.engines.verifier(rec.engine),
                }
                if rec.files is not None:
                    await FileSetTransfer(
                        rec, self.plugins.resolve_source, self.settings.downloads, **callbacks
                    ).run()
                else:
                    source = self.plugins.resolve_source(rec.url)
                    try:
                        await Transfer(rec, source, self.settings.downloads, **callbacks).run()
                    finally:
                        await source.aclose()
            except asyncio.CancelledError:
                self._persist(rec)  # checkpoint the bytes on disk; the canceller sets status
                self._task_done(rec)
                raise
            except KernelError as exc:
                self._fail(rec, exc.message)
            except Exception as exc:
                log.exception("download.internal_error")
                self._fail(rec, f"Internal error: {type(exc).__name__}: {exc}")
            else:
                rec.attempts = 0
                rec.last_error = None
                if rec.engine is not None:
                    self._set_status(rec, "creating_engine")
                    self._start_engine_task(rec)
                    return
                self._set_status(rec, "completed")
            self._task_done(rec)

    async def _run_engine(self, rec: DownloadRecord) -> None:
        assert rec.engine is not None
        with structlog.contextvars.bound_contextvars(model_id=rec.model_id):
            try:
                engine = await self.engines.create(
                    rec.model_id, rec.local_path, rec.model_type, rec.engine
                )
                rec.model_type = "embedding" if engine.model_type == "embedding" else "llm"
            except asyncio.CancelledError:
                self._task_done(rec)
                raise
            except KernelError as exc:
                self._fail(rec, exc.message)
            except Exception as exc:
                log.exception("engine.internal_error")
                self._fail(rec, f"Engine creation failed: {type(exc).__name__}: {exc}")
            else:  # the registry published engine.created
                self._set_status(rec, "completed")
            self._task_done(rec)

    # --- transitions, progress, persistence -------------------------------------------------

    def _set_status(self, rec: DownloadRecord, status: Status, error: str | None = None) -> None:
        previous = rec.status
        check_transition(previous, status)
        rec.status = status
        if status in TERMINAL:
            rec.end_time = now_ms()
        if error is not None:
            rec.error_message = error
        elif status in ("queued", "downloading"):
            rec.error_message = None
        self._persist(rec)
        self.bus.publish(DownloadStatus(_snapshot(rec), previous))
        log.info(
            "download.status",
            model_id=rec.model_id,
            previous=previous,
            status=status,
            downloaded_bytes=rec.downloaded_bytes,
            error=error,
        )

    def _fail(self, rec: DownloadRecord, message: str) -> None:
        if rec.status not in TERMINAL:
            self._set_status(rec, "failed", error=message)

    def _on_progress(self, rec: DownloadRecord) -> None:
        now = time.monotonic()
        if now - self._last_progress.get(rec.model_id, 0.0) >= PROGRESS_INTERVAL_S:
            self._last_progress[rec.model_id] = now
            self.bus.publish(DownloadProgress(_snapshot(rec)))
        if now - self._last_checkpoint.get(rec.model_id, 0.0) >= CHECKPOINT_INTERVAL_S:
            self._last_checkpoint[rec.model_id] = now
            self._persist(rec)

    # --- paths: everything the kernel writes or removes is inside models_dir -------------------

    def _outside(self, rec: DownloadRecord) -> str | None:
        """The first of the record's paths that is not inside ``models_dir/<model_id>/``
        (a record from another models_dir, or a store edited by hand), or None."""
        home = self.models_dir / rec.model_id
        for path in [*rec.final_paths(), *rec.part_paths()]:
            if not _inside(path, home):
                return path
        return None

    def _check_inside(self, rec: DownloadRecord) -> None:
        path = self._outside(rec)
        if path is not None:
            raise PermanentError(
                f"The download's file {path} is outside models_dir ({self.models_dir}/"
                f"{rec.model_id}/), perhaps because storage.models_dir changed; nothing was "
                "written. Purge it and create the download again."
            )

    async def _remove(self, path: str) -> bool:
        """Remove a file of ours: only inside models_dir, never through a symbolic link."""
        if not _inside(path, self.models_dir):
            log.warning("download.not_removed", path=path, reason="outside models_dir")
            return False
        try:
            return await asyncio.to_thread(remove, path)
        except PermanentError as exc:
            log.warning("download.not_removed", path=path, reason=exc.message)
            return False

    def _persist(self, rec: DownloadRecord) -> None:
        """Save ``rec`` as it is now, in the background; ``writer.wait`` awaits it."""
        self.writer.save(_snapshot(rec))


def _check_rate(max_bytes_per_second: int) -> None:
    if not 0 <= max_bytes_per_second <= MAX_RATE:
        raise InvalidRequest(
            f"max_bytes_per_second must be between 0 (unlimited) and {MAX_RATE}.",
            param="max_bytes_per_second",
        )


def _inside(path: str, directory: Path) -> bool:
    """``path`` is spelt plainly (no ``..``) and lies under ``directory`` (lexically; links
    on the way are refused when the file is opened)."""
    return os.path.normpath(path) == path and Path(path).is_relative_to(directory)


def _snapshot(rec: DownloadRecord) -> DownloadRecord:
    if rec.files is None:
        return msgspec.structs.replace(rec)
    files = [
        msgspec.structs.replace(f, segments=[list(s) for s in f.segments] if f.segments else None)
        for f in rec.files
    ]
    return msgspec.structs.replace(rec, files=files)


def _file_records(directory: Path, remote: builtins.list[RemoteFile]) -> builtins.list[FileRecord]:
    """The set's files under the model's directory; every path component is checked."""
    records = []
    seen: set[str] = set()
    for item in remote:
        parts = item.path.split("/")
        for part in parts:
            validate_filename(part, param="url")
        if item.path.lower() in seen:
            raise InvalidRequest(f"The file {item.path!r} is listed twice.", param="url")
        seen.add(item.path.lower())
        records.append(
            FileRecord(
                path=item.path,
                url=item.ref,
                local_path=str(directory.joinpath(*parts)),
                size=item.size or 0,
                expected_sha256=item.sha256.lower() if item.sha256 else None,
            )
        )
    return records


def _primary(
    directory: Path, files: builtins.list[FileRecord], loader: EngineBackend | None
) -> str:
    """What engines load: the one file of a one-file set, else the file the backend that will
    load the set picks (a split model's first shard), else the model's directory."""
    if len(files) == 1:
        return files[0].local_path
    paths = [f.path for f in files]
    chosen = loader.model_file(paths) if isinstance(loader, ModelFileBackend) else None
    return next((f.local_path for f in files if f.path == chosen), str(directory))


def _default_filename(source: Source, model_id: str) -> str:
    name = source.filename if isinstance(source, NamedSource) else None
    try:
        return validate_filename(name) if name else f"{model_id}.bin"
    except InvalidRequest:
        return f"{model_id}.bin"

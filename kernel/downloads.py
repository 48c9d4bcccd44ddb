"""DownloadManager: the records, and the actions on them (create, pause, resume, cancel,
purge, reorder, cap), run in the event loop that owns every record.

It composes the parts that do the work, one job each: kernel/plan.py turns a create request
into a validated plan, kernel/lifecycle.py checks, saves and publishes every transition,
kernel/scheduler.py keeps the queue, the slots and the tasks, and kernel/modelsdir.py keeps
every file it writes or removes inside ``models_dir``. The manager itself runs the transfer
and engine tasks (kernel/transfer.py, kernel/fileset.py, the engine registry). Actions on one
model id are serialised by a per-id lock; pause and cancel return only once the transfer task
has stopped, and every reply waits until its change is durable in the store.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

import msgspec
import structlog

from kernel.config import Settings
from kernel.errors import (
    DownloadExists,
    DownloadNotFound,
    InvalidState,
    KernelError,
)
from kernel.events import EventBus
from kernel.fileset import FileSetTransfer
from kernel.lifecycle import Lifecycle
from kernel.modelsdir import ModelsDir
from kernel.plan import DownloadRequest, Planner, check_rate
from kernel.scheduler import Scheduler
from kernel.throttle import TokenBucket
from kernel.transfer import Transfer
from kernel.types import (
    TERMINAL,
    DownloadRecord,
    DownloadStore,
    EngineSpec,
    ModelType,
    now_ms,
)

if TYPE_CHECKING:
    from kernel.engines import EngineRegistry
    from kernel.plugins import Plugins

__all__ = ["DownloadManager"]

log = structlog.get_logger()


class DownloadManager:
    def __init__(
        self,
        settings: Settings,
        plugins: Plugins,
        store: DownloadStore,
        bus: EventBus,
        engines: EngineRegistry,
    ) -> None:
        self.settings = settings  # replaced whole by apply_settings, never changed in place
        self.plugins = plugins
        self.store = store
        self.bus = bus
        self.engines = engines
        self.models_dir = Path(settings.storage.models_dir).resolve()
        self.files = ModelsDir(self.models_dir)
        self.records: dict[str, DownloadRecord] = {}
        self.planner = Planner(self.models_dir, settings.network, plugins.resolve_source, engines)
        self.lifecycle = Lifecycle(store, bus)
        self.scheduler = Scheduler(
            self.records, lambda: self.settings.downloads.max_concurrent, self._freed
        )
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self._seq = 0
        # The global cap, shared by every transfer; it reads the settings in force each time.
        self.bucket = TokenBucket(lambda: self.settings.downloads.max_bytes_per_second)

    # --- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        for rec in sorted(await self.store.load_all(), key=lambda r: r.seq):
            self.records[rec.model_id] = rec
            self._seq = max(self._seq, rec.seq)
        await self._prune_ended()
        await asyncio.to_thread(self.files.audit, list(self.records.values()))
        for rec in self.records.values():
            if rec.status == "downloading":
                rec.status = "queued"  # resumes from its .part file when a slot frees
            elif rec.status == "creating_engine":
                self.scheduler.start(rec, "engine", self._run_engine(rec))
        self._schedule()

    async def _prune_ended(self) -> None:
        days = self.settings.downloads.retention_days
        if days <= 0:
            return
        cutoff = now_ms() - days * 86_400_000
        for rec in list(self.records.values()):
            if rec.status in TERMINAL and (rec.end_time or rec.created_at) < cutoff:
                del self.records[rec.model_id]
                self.lifecycle.forget(rec.model_id)
                await self.lifecycle.durable(rec.model_id)
                log.info("download.pruned", model_id=rec.model_id, status=rec.status)

    async def stop(self) -> None:
        """Stop every task; records keep their status so the next start resumes them."""
        await self.scheduler.stop_all()
        for rec in self.records.values():
            if rec.status not in TERMINAL:
                self.lifecycle.persist(rec)
        await self.flush()

    async def flush(self) -> None:
        """Wait until every save asked for so far has reached the store."""
        await self.lifecycle.flush()

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

    def queue_positions(self) -> dict[str, int]:
        """Every queued download's 1-based place in the queue (one sort for all of them)."""
        queue = self.scheduler.queue()
        return {rec.model_id: position for position, rec in enumerate(queue, start=1)}

    def queue_position(self, model_id: str) -> int | None:
        return self.queue_positions().get(model_id)

    def running(self) -> int:
        """Transfers holding a download slot now."""
        return self.scheduler.running()

    # --- actions -------------------------------------------------------------------------

    async def create(self, **request: Unpack[DownloadRequest]) -> DownloadRecord:
        """Create a download (InvalidRequest naming the field when the plan is refused,
        DownloadExists while one with this id has not ended); returns once it is durable."""
        plan = await self.planner.plan(**request)
        model_id = plan.model_id
        async with self._locks[model_id]:
            existing = self.records.get(model_id)
            if existing is not None and existing.status not in TERMINAL:
                raise DownloadExists(model_id, existing.status)
            self._seq += 1
            rec = plan.record(self._seq, now_ms())
            await self.files.adopt_or_drop_parts(rec, existing)
            self.records[model_id] = rec
            self.lifecycle.created(rec)
            log.info("download.created", model_id=model_id, url=rec.url, path=rec.local_path)
            self._schedule()
            await self.lifecycle.durable(model_id)  # the reply promises a durable download
            return rec

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
                    deleted = await self.files.remove(path) or deleted
                for path in rec.part_paths():
                    await self.files.remove(path)
            del self.records[model_id]
            self.lifecycle.forget(model_id)  # after every save queued for it, never before
            await self.lifecycle.durable(model_id)
            log.info("download.purged", model_id=model_id, file_deleted=deleted)
            return rec, deleted

    async def set_priority(self, model_id: str, priority: int) -> DownloadRecord:
        """Reorder: a queued download with a higher priority starts first."""
        return await self._change(model_id, "reprioritise", "download.priority", priority=priority)

    async def set_limit(self, model_id: str, max_bytes_per_second: int) -> DownloadRecord:
        """Cap one download's bandwidth (0 = unlimited); a running transfer obeys at once."""
        check_rate(max_bytes_per_second)
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
            self.lifecycle.persist(rec)
            log.info(event, model_id=model_id, **fields)
            await self.lifecycle.durable(model_id)
            return rec

    async def apply_settings(self, settings: Settings) -> None:
        """Adopt new settings at run time (the kernel replaces them whole; nothing is changed
        in place). New transfers start with them; running ones keep theirs, except the
        global cap, which they read from the shared bucket. More slots start queued
        downloads; fewer send the newest, lowest-priority transfers back to the queue
        (a finalizing one is let finish)."""
        self.settings = settings
        for rec in self.scheduler.excess():
            async with self._locks[rec.model_id]:
                job = self.scheduler.job(rec.model_id)
                if job is not None and job.preemptible:
                    await self.scheduler.stop(rec.model_id)
                    if rec.status == "downloading":
                        self.lifecycle.set_status(rec, "queued")
        self._schedule()
        log.info("settings.applied", downloads=msgspec.to_builtins(settings.downloads))

    async def pause(self, model_id: str) -> DownloadRecord:
        async with self._locks[model_id]:
            rec = self.get(model_id)
            if rec.status not in ("downloading", "queued"):
                raise InvalidState(model_id, "pause", rec.status)
            await self.scheduler.stop(model_id)
            if rec.status not in ("downloading", "queued"):
                raise InvalidState(model_id, "pause", rec.status)
            self.lifecycle.set_status(rec, "paused")
            self._schedule()
            await self.lifecycle.durable(model_id)
            return rec

    async def resume(self, model_id: str) -> DownloadRecord:
        async with self._locks[model_id]:
            rec = self.get(model_id)
            if rec.status != "paused":
                raise InvalidState(model_id, "resume", rec.status)
            rec.attempts = 0
            rec.last_error = None
            self.lifecycle.set_status(rec, "queued")
            self._schedule()
            await self.lifecycle.durable(model_id)
            return rec

    async def cancel(self, model_id: str) -> tuple[DownloadRecord, str]:
        """Cancel one download; returns the record and the status it had."""
        result = await self._cancel(model_id)
        await self.lifecycle.durable(model_id)
        return result

    async def _cancel(self, model_id: str) -> tuple[DownloadRecord, str]:
        async with self._locks[model_id]:
            rec = self.get(model_id)
            if rec.status in TERMINAL:
                raise InvalidState(model_id, "cancel", rec.status)
            previous = rec.status
            # A finalizing transfer is let finish and may hand over to its engine job: stop
            # that one too.
            while self.scheduler.job(model_id) is not None:
                await self.scheduler.stop(model_id)
            if rec.status in TERMINAL:
                raise InvalidState(model_id, "cancel", rec.status)
            if previous != "creating_engine":
                for path in rec.part_paths():
                    await self.files.remove(path)
            self.lifecycle.set_status(rec, "cancelled")
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
        with self.scheduler.held():
            for rec in self.list():
                try:
                    cancelled.append(await self._cancel(rec.model_id))
                except KernelError as exc:
                    failed.append((rec.model_id, rec.status, exc.message))
        self._schedule()  # what was created meanwhile
        for rec, _ in cancelled:  # durable before the reply; written together, not one by one
            await self.lifecycle.durable(rec.model_id)
        return cancelled, failed

    # --- the work: transfers and engine creation ---------------------------------------------

    def _schedule(self) -> None:
        for rec in self.scheduler.due():
            rec.run_started_at = now_ms()
            rec.run_start_bytes = rec.downloaded_bytes
            rec.end_time = None
            self.lifecycle.set_status(rec, "downloading")
            self.scheduler.start(rec, "transfer", self._run_transfer(rec))

    def _freed(self, model_id: str) -> None:
        """A task of ``model_id`` ended: the next in the queue may take its slot."""
        self.lifecycle.run_ended(model_id)
        self._schedule()

    async def _run_transfer(self, rec: DownloadRecord) -> None:
        with structlog.contextvars.bound_contextvars(model_id=rec.model_id):
            try:
                self.files.check_inside(rec)
                await self._transfer(rec)
            except asyncio.CancelledError:
                # Checkpoint the bytes on disk; whoever cancelled sets the status.
                self.lifecycle.persist(rec)
                raise
            except KernelError as exc:
                self.lifecycle.fail(rec, exc.message)
            except Exception as exc:
                log.exception("download.internal_error")
                self.lifecycle.fail(rec, f"Internal error: {type(exc).__name__}: {exc}")
            else:
                rec.attempts = 0
                rec.last_error = None
                if rec.engine is None:
                    self.lifecycle.set_status(rec, "completed")
                else:  # the engine job replaces this one, which frees its slot
                    self.lifecycle.set_status(rec, "creating_engine")
                    self.scheduler.start(rec, "engine", self._run_engine(rec))

    async def _transfer(self, rec: DownloadRecord) -> None:
        """Move the download's bytes (one file or a set) with the settings in force now."""
        model_id, settings = rec.model_id, self.settings.downloads
        hooks: dict[str, Any] = {
            "on_progress": self.lifecycle.progress,
            "on_finalizing": lambda: self.scheduler.finalizing(model_id),
            "on_retry": self.bus.publish,  # download.retry: SSE clients, metrics
            "shared_bucket": self.bucket,
            "verifier": self.engines.verifier(rec.engine),
        }
        if rec.files is not None:
            await FileSetTransfer(rec, self.plugins.resolve_source, settings, **hooks).run()
            return
        source = self.plugins.resolve_source(rec.url)
        try:
            await Transfer(rec, source, settings, **hooks).run()
        finally:
            await source.aclose()

    async def _run_engine(self, rec: DownloadRecord) -> None:
        assert rec.engine is not None
        with structlog.contextvars.bound_contextvars(model_id=rec.model_id):
            try:
                engine = await self.engines.create(
                    rec.model_id, rec.local_path, rec.model_type, rec.engine
                )
                rec.model_type = "embedding" if engine.model_type == "embedding" else "llm"
            except KernelError as exc:
                self.lifecycle.fail(rec, exc.message)
            except Exception as exc:
                log.exception("engine.internal_error")
                self.lifecycle.fail(rec, f"Engine creation failed: {type(exc).__name__}: {exc}")
            else:  # the registry published engine.created
                self.lifecycle.set_status(rec, "completed")

"""Kernel: settings + plugins + store + bus + engines + downloads, started and stopped as one."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from kernel._http_wire import close_idle_connections
from kernel._lock import StateLock
from kernel.config import DownloadSettings, ModelEntry, Settings
from kernel.downloads import DownloadManager
from kernel.engines import EngineRegistry
from kernel.errors import InvalidRequest, KernelError
from kernel.events import EventBus
from kernel.metrics import Metrics
from kernel.plugins import Plugins, make_plugin_manager
from kernel.types import DownloadStore, EngineSpec, Event, ModelType

__all__ = ["Kernel"]

log = structlog.get_logger()

RUNTIME_SETTINGS_KEY = "settings.downloads"


def _param_of(exc: msgspec.ValidationError) -> str | None:
    found = re.search(r"at `\$\.([^`]+)`", str(exc)) or re.search(r"field `([^`]+)`", str(exc))
    return found.group(1) if found else None


class Kernel:
    """Owns every long-lived object. ``start()`` opens the store and resumes downloads."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        load_entrypoints: bool = True,
        extra_plugins: Iterable[object] = (),
    ) -> None:
        self.settings = settings or Settings()
        pm = make_plugin_manager(
            load_entrypoints=load_entrypoints,
            disable=self.settings.plugins.disable,
            extra=extra_plugins,
        )
        self.plugins = Plugins(pm, self.settings)
        self.metrics = Metrics()
        self.bus = EventBus(observer=self._observe)
        self.engines = EngineRegistry(
            self.plugins.engine_backends(),
            self.plugins.detect_gpus(),
            detect_gpus=self.plugins.detect_gpus,  # free memory is read again at creation
            publish=self.bus.publish,
        )
        self._store: DownloadStore | None = None
        self._downloads: DownloadManager | None = None
        self._lock = StateLock(self.settings.storage.state_dir)
        self._lag_watch: asyncio.Task[None] | None = None
        # The downloads settings as the file and env give them, for DELETE /v1/settings.
        self._configured_downloads = msgspec.to_builtins(self.settings.downloads)
        self.started = False

    @property
    def store(self) -> DownloadStore:
        if self._store is None:
            raise RuntimeError("The kernel is not started.")
        return self._store

    @property
    def downloads(self) -> DownloadManager:
        if self._downloads is None:
            raise RuntimeError("The kernel is not started.")
        return self._downloads

    async def start(self) -> None:
        """Take the state lock, open the store, resume downloads, honour config ``models:``.
        Idempotent; raises KernelError (lock held, unreadable store) with a clear message."""
        if self.started:
            return
        self._lock.acquire()
        try:
            models_dir = Path(self.settings.storage.models_dir)
            await asyncio.to_thread(models_dir.mkdir, parents=True, exist_ok=True)
            self._store = self.plugins.open_store()
            await self._load_runtime_settings()
            self._downloads = DownloadManager(
                self.settings, self.plugins, self._store, self.bus, self.engines
            )
            await self._downloads.start()
            self._lag_watch = asyncio.create_task(self.metrics.watch_loop_lag(), name="loop-lag")
            for entry in self.settings.models:
                await self._boot_model(entry)
            await self.plugins.startup(self)
        except BaseException:
            await self._abort_start()
            raise
        self.started = True
        log.info(
            "kernel.started",
            plugins=self.plugins.names(),
            models_dir=str(self._downloads.models_dir),
        )

    async def _abort_start(self) -> None:
        """Undo a start that failed half way: nothing stays locked, open or running."""
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        if self._downloads is not None:
            await self._downloads.stop()
        if self._store is not None:
            await self._store.close()
        self._lock.release()

    def _observe(self, event: Event) -> None:
        self.metrics.observe(event)
        self.plugins.emit(event)

    async def _load_runtime_settings(self) -> None:
        """Settings changed through the API outlive a restart: they win over the file."""
        raw = await self.store.get_meta(RUNTIME_SETTINGS_KEY)
        if not raw:  # never changed, or reset
            return
        try:
            saved = msgspec.json.decode(raw, type=DownloadSettings)
        except msgspec.DecodeError as exc:
            log.warning("settings.saved_unreadable", error=str(exc))
            return
        differs = {
            key: value
            for key, value in msgspec.to_builtins(saved).items()
            if msgspec.to_builtins(self.settings.downloads).get(key) != value
        }
        if differs:
            log.warning(
                "settings.runtime_override",
                note="set with PATCH /v1/settings; they "
                "win over the config file until changed again",
                overrides=differs,
            )
        self._replace_settings(saved)

    def _replace_settings(self, downloads: DownloadSettings) -> None:
        """Settings are replaced whole, never changed in place: whoever holds the old object
        keeps a consistent snapshot. The plugins get the new one for their next hook call."""
        self.settings = msgspec.structs.replace(self.settings, downloads=downloads)
        self.plugins.settings = self.settings

    async def update_download_settings(self, patch: dict[str, Any]) -> DownloadSettings:
        """Merge ``patch`` into the ``downloads`` settings, validate like the config file
        (InvalidRequest naming the field), apply at once, and persist."""
        merged = msgspec.to_builtins(self.settings.downloads)
        for key, value in patch.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        try:
            new = msgspec.convert(merged, DownloadSettings)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"Invalid settings: {exc}", param=_param_of(exc)) from exc
        self._replace_settings(new)
        await self.downloads.apply_settings(self.settings)
        await self.store.put_meta(RUNTIME_SETTINGS_KEY, msgspec.json.encode(new))
        return self.settings.downloads

    async def reset_download_settings(self) -> DownloadSettings:
        """Forget the run-time changes: back to the config file's (and env's) values, now
        and after a restart."""
        configured = msgspec.convert(self._configured_downloads, DownloadSettings)
        self._replace_settings(configured)
        await self.downloads.apply_settings(self.settings)
        await self.store.put_meta(RUNTIME_SETTINGS_KEY, b"")
        log.info("settings.reset")
        return self.settings.downloads

    async def _boot_model(self, entry: ModelEntry) -> None:
        """A Kolosal ``models:`` entry: a URL becomes a startup download (once), a local
        path becomes an engine. Errors are logged: one bad entry never stops the server."""
        spec = EngineSpec(
            load_immediately=entry.load_immediately,
            main_gpu_id=entry.main_gpu_id,
            inference_engine=entry.inference_engine or "",
            loading_parameters=entry.load_params,
        )
        model_type: ModelType = "embedding" if entry.type == "embedding" else "llm"
        try:
            if "://" in entry.path:
                await self.downloads.ensure_startup(entry.id, entry.path, model_type, spec)
            else:
                spec = self.engines.validate(spec, prefix="models.")
                await self.engines.create(entry.id, entry.path, model_type, spec)
        except KernelError as exc:
            log.error("config.model_failed", model_id=entry.id, error=exc.message)

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        await self.downloads.stop()
        close_idle_connections()
        await self.plugins.shutdown(self)
        await self.engines.close()
        await self.store.close()
        self._lock.release()
        log.info("kernel.stopped")

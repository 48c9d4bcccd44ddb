"""Kernel: settings + plugins + store + bus + engines + downloads, started and stopped as one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import structlog

from kernel.config import Settings
from kernel.downloads import DownloadManager
from kernel.engines import EngineRegistry
from kernel.events import EventBus
from kernel.plugins import Plugins, make_plugin_manager
from kernel.types import DownloadStore

__all__ = ["Kernel"]

log = structlog.get_logger()


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
        self.bus = EventBus(observer=self.plugins.emit)
        self.engines = EngineRegistry(self.plugins.engine_backends(), self.plugins.detect_gpus())
        self._store: DownloadStore | None = None
        self._downloads: DownloadManager | None = None
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
        Path(self.settings.storage.models_dir).mkdir(parents=True, exist_ok=True)
        self._store = self.plugins.open_store()
        self._downloads = DownloadManager(
            self.settings, self.plugins, self._store, self.bus, self.engines
        )
        await self._downloads.start()
        await self.plugins.startup(self)
        self.started = True
        log.info("kernel.started", plugins=self.plugins.names(),
                 models_dir=str(self._downloads.models_dir))

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        await self.downloads.stop()
        await self.plugins.shutdown(self)
        await self.engines.close()
        await self.store.close()
        log.info("kernel.stopped")

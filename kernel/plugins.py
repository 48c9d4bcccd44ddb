"""The plugin manager: builtin plugins plus every entry point of group ``modelkernel``.

This is the only module that touches ``pm.hook``; the rest of the kernel calls the typed
methods of :class:`Plugins`. Builtins are declared as entry points in our own pyproject, like
any third-party plugin; when entry points are not loaded (a source tree, tests) they are
registered from :data:`BUILTINS`, read from those same declarations.

``plugins.disable`` in the config and ``MODELKERNEL_DISABLE_PLUGINS`` (comma-separated) block
plugins by name; ``MODELKERNEL_TRACE_PLUGINS=1`` logs every hook call.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import inspect
import os
import tomllib
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any

import pluggy
import structlog

from kernel import hookspecs
from kernel.config import Settings
from kernel.errors import InvalidRequest
from kernel.types import DownloadStore, EngineBackend, Event, GpuInfo, Source

__all__ = ["BUILTINS", "Plugins", "make_plugin_manager"]

log = structlog.get_logger()

GROUP = "modelkernel"


def _builtins() -> dict[str, str]:
    """Our own entry points (name -> module): from the source tree's pyproject.toml, else
    from the installed distribution's metadata. The kernel names no plugin itself."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        return dict(project["entry-points"][GROUP])
    return {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group=GROUP)
        if ep.dist is not None and ep.dist.name == "modelkernel"
    }


BUILTINS: dict[str, str] = _builtins()


def make_plugin_manager(
    *,
    load_entrypoints: bool = True,
    disable: Iterable[str] = (),
    extra: Iterable[object] = (),
) -> pluggy.PluginManager:
    """Return a fresh manager with the specs added, blocked names blocked, builtins, entry
    points and ``extra`` plugin objects registered, and every hookimpl checked."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    blocked = set(disable)
    blocked.update(n.strip() for n in os.environ.get("MODELKERNEL_DISABLE_PLUGINS", "").split(","))
    for name in blocked - {""}:
        pm.set_blocked(name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(GROUP)
    for name, module in BUILTINS.items():
        if not pm.is_blocked(name) and pm.get_plugin(name) is None:
            pm.register(importlib.import_module(module), name=name)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    if os.environ.get("MODELKERNEL_TRACE_PLUGINS") == "1":
        pm.trace.root.setwriter(lambda msg: log.debug("plugin.trace", msg=msg.rstrip()))
        pm.enable_tracing()
    return pm


class Plugins:
    """Typed access to the hooks of one plugin manager."""

    def __init__(self, pm: pluggy.PluginManager, settings: Settings) -> None:
        self.pm = pm
        self.settings = settings
        self._pending: set[asyncio.Task[None]] = set()
        self._observer_key: tuple[Any, ...] = ()
        self._observer_callers: list[tuple[str, Any]] = []

    def names(self) -> list[str]:
        return sorted(n for n, p in self.pm.list_name_plugin() if p is not None)

    def resolve_source(self, ref: str) -> Source:
        """The Source of the first plugin that claims ``ref``; InvalidRequest if none does."""
        source: Source | None = self.pm.hook.resolve_source(ref=ref, settings=self.settings)
        if source is None:
            raise InvalidRequest(
                f"No loaded source plugin can fetch {ref[:200]!r} (the builtin ones fetch "
                "http://, https:// and hf:// references).",
                param="url",
            )
        return source

    def open_store(self) -> DownloadStore:
        store: DownloadStore | None = self.pm.hook.open_store(settings=self.settings)
        if store is None:
            raise RuntimeError("No store plugin is loaded (is sqlite_store disabled?).")
        return store

    def engine_backends(self) -> list[EngineBackend]:
        backends: list[EngineBackend] = []
        for result in self.pm.hook.register_engine_backends(settings=self.settings):
            backends.extend(result or [])
        return backends

    def detect_gpus(self) -> list[GpuInfo]:
        return [gpu for result in self.pm.hook.detect_gpus() for gpu in (result or [])]

    def routes(self) -> list[Any]:
        return [
            r for result in self.pm.hook.register_routes(settings=self.settings) for r in result
        ]

    def emit(self, event: Event) -> None:
        """Tell every observer about ``event`` through pluggy, one hook call per observer: one
        that raises is logged and never hides the event from the rest, while wrappers, tracing
        and implementations that take fewer arguments work as for any hook. Awaitables run in
        background tasks."""
        for name, call in self._observers():
            try:
                results = call(event=event)
            except Exception:
                log.exception(
                    "plugin.on_event_failed", plugin=name, event_type=type(event).__name__
                )
                continue
            for result in results:
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(self._guard(result, name))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)

    def _observers(self) -> list[tuple[str, Any]]:
        """``(plugin name, hook caller)`` per ``on_event`` observer, in pluggy's call order; each
        caller is the hook restricted to that observer plus every wrapper. Rebuilt only when the
        registered implementations change."""
        impls = tuple(self.pm.hook.on_event.get_hookimpls())
        if self._observer_key != impls:
            plain = [i for i in impls if not (i.hookwrapper or i.wrapper)]
            self._observer_callers = [
                (
                    impl.plugin_name,
                    self.pm.subset_hook_caller(
                        "on_event", [o.plugin for o in plain if o is not impl]
                    ),
                )
                for impl in reversed(plain)
            ]
            self._observer_key = impls
        return self._observer_callers

    async def startup(self, kernel: object) -> None:
        await self._all(self.pm.hook.startup(kernel=kernel))

    async def shutdown(self, kernel: object) -> None:
        await self._all(self.pm.hook.shutdown(kernel=kernel))
        if self._pending:
            await asyncio.wait(self._pending, timeout=2)

    @staticmethod
    async def _all(results: list[Awaitable[None] | None]) -> None:
        for result in results:
            if inspect.isawaitable(result):
                await result

    @staticmethod
    async def _guard(awaitable: Awaitable[None], plugin: str) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("plugin.on_event_failed", plugin=plugin)

"""The plugin contract: every hook a modelkernel plugin can implement.

Three kinds of hook:

* **One answer** (``firstresult``): the first plugin returning non-None wins. Order plugins
  with ``@hookimpl(tryfirst=True)`` / ``trylast=True``, never by name.
* **Everyone contributes**: each plugin returns a list; the kernel concatenates them.
* **Tell everyone**: the kernel calls every plugin; a plugin may return an awaitable, which the
  kernel awaits.

Hooks are synchronous and cheap. They return objects whose methods do the I/O (``Source.probe``,
``DownloadStore.save``); those Protocols live in :mod:`kernel.types`. Specs may gain parameters
over time but never rename or lose one, and pluggy lets an implementation accept fewer.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kernel.config import Settings
    from kernel.types import DownloadStore, EngineBackend, Event, GpuInfo, Source

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("modelkernel")
hookimpl = pluggy.HookimplMarker("modelkernel")


@hookspec(firstresult=True)
def resolve_source(ref: str, settings: Settings) -> Source | None:
    """Return a Source that can fetch ``ref``, or None if ``ref`` is not this plugin's.

    ``ref`` is the ``url`` of a create request (``https://...``, ``hf://...``, or any scheme a
    plugin understands). First non-None result wins: ``hf_source`` is ``tryfirst`` so hub URLs
    reach it before the generic ``http_source``. Do no I/O here; probing is ``Source.probe()``.
    Raise ``kernel.errors.InvalidRequest(param="url")`` for a reference that is yours but
    malformed. When no plugin claims a reference, the create request fails with a 400.
    """


@hookspec(firstresult=True)
def open_store(settings: Settings) -> DownloadStore | None:
    """Return the DownloadStore that keeps download records across restarts.

    First non-None result wins. The builtin ``sqlite_store`` is ``trylast``, so any other store
    plugin (a shared database for a fleet) replaces it just by being installed.
    """


@hookspec
def register_engine_backends(settings: Settings) -> list[EngineBackend]:  # type: ignore[empty-body]
    """Return the inference engine backends this plugin provides (may be empty).

    Each backend has a ``name`` and ``aliases``; the ``inference_engine`` of a request picks one
    by name. All plugins contribute; a duplicate name is an error at start. The first backend
    offered is the default engine (order with tryfirst/trylast).
    """


@hookspec
def detect_gpus() -> list[GpuInfo]:  # type: ignore[empty-body]
    """Return the GPUs this plugin can see, with their free memory (may be empty).

    All plugins contribute. ``main_gpu_id: -1`` picks the GPU with the most free memory; an id
    nobody reports is rejected when the request is made.
    """


@hookspec
def on_event(event: Event) -> Awaitable[None] | None:
    """Observe every event on the kernel's bus (``download.created``, ``download.status``,
    ``download.progress``, ``download.retry``, ``engine.created``).

    Called for every plugin, in the event loop; keep it quick or return an awaitable (the kernel
    awaits it in a background task, so a slow observer never slows a transfer). Each observer is
    called through pluggy in a hook call of its own, so an exception is logged and never keeps
    the event from the other observers, and a ``wrapper=True`` implementation wraps each
    observer's call (it sees that observer's result or exception).
    """


@hookspec
def startup(kernel: Any) -> Awaitable[None] | None:
    """Called once when the kernel has started (store open, records loaded). May return an
    awaitable, which is awaited before the server accepts requests."""


@hookspec
def shutdown(kernel: Any) -> Awaitable[None] | None:
    """Called once when the kernel stops, before the store closes. May return an awaitable."""


@hookspec
def register_routes(settings: Settings) -> list[Any]:  # type: ignore[empty-body]
    """Return extra Litestar route handlers (or Routers/Controllers) to mount on the app.

    All plugins contribute. A handler receives the Kernel by declaring a parameter
    ``kernel: KernelDep`` (``from kernel.api.deps import KernelDep``; Litestar 2.23+ needs the
    explicit marker), and the download manager with ``downloads: Downloads``.
    """

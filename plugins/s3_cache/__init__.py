"""s3_cache: an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS) as a fleet's model
cache, so each file is fetched from its origin once for the whole fleet.

Active only with ``cache: {s3: {endpoint, bucket, ...}}`` and a store that keeps the fleet's
leases (a ``kernel.types.LeasingStore``: the builtin ``pg_store``, with ``store: {kind:
postgres}``, is one; a third-party store may be another); otherwise every hook here does nothing
and nothing of the ``[fleet]`` extra is imported. A pluggy wrapper on ``open_store`` takes the
lease board from whichever store won, before any download runs; a wrapper on ``resolve_source``
wraps the source the other plugins resolve in a ``FleetSource`` (see ``fleet.py``); and
``on_event`` listens for cancels, so the shared fetch stops when the last node that wanted the
file cancels. ``client.S3Client`` is the small SigV4 client it uses. It imports no other plugin:
the leases are the declared ``LeaseBoard`` and ``Lease`` of ``kernel.types``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import structlog

from kernel import hookimpl
from kernel.config import ConfigError, Settings
from kernel.errors import KernelError
from kernel.types import DownloadStatus, DownloadStore, Event, LeaseBoard, LeasingStore, Source

if TYPE_CHECKING:
    from plugins.s3_cache.fleet import Fleet

__all__ = ["fleet_of", "on_event", "open_store", "resolve_source", "shutdown", "startup"]

log = structlog.get_logger()
# Per running kernel, keyed by its state directory (see ``_kernel_key``).
_boards: dict[str, LeaseBoard] = {}  # from the store, until the Fleet is built
_fleets: dict[str, Fleet] = {}


def _kernel_key(settings: Settings) -> str:
    """Which kernel ``settings`` belong to: its state directory, which a running kernel holds
    locked, so it names one kernel even with several in a process. Not ``id(settings)``: the
    kernel replaces its Settings whole when the downloads settings change."""
    return settings.storage.state_dir


def fleet_of(settings: Settings) -> Fleet | None:
    """This kernel's Fleet (lease board + bucket client), or None when the cache is off."""
    if settings.cache.s3 is None:
        return None
    key = _kernel_key(settings)
    fleet = _fleets.get(key)
    if fleet is None:
        board = _boards.get(key)
        if board is None:
            return None  # the store keeps no leases: startup stops the kernel
        from plugins.s3_cache.fleet import Fleet

        fleet = _fleets[key] = Fleet(settings, board, dict(os.environ))
        del _boards[key]
    return fleet


@hookimpl(wrapper=True)
def open_store(settings: Settings) -> Generator[None, DownloadStore | None, DownloadStore | None]:
    store = yield
    _boards.pop(_kernel_key(settings), None)
    if settings.cache.s3 is not None and isinstance(store, LeasingStore):
        _boards[_kernel_key(settings)] = store.leases(settings.fleet)
    return store


@hookimpl(wrapper=True)
def resolve_source(ref: str, settings: Settings) -> Generator[None, Source | None, Source | None]:
    source = yield
    if source is None:
        return None
    fleet = fleet_of(settings)
    if fleet is None:
        return source
    from plugins.s3_cache.fleet import fleet_source

    # The transfer task binds its model id for logging; the fleet records who wants a file.
    model_id = structlog.contextvars.get_contextvars().get("model_id")
    # ``ref`` follows the wrapped source's (a property), which the Protocol's plain attribute
    # does not express.
    return cast(Source, fleet_source(source, fleet, model_id))


@hookimpl
def startup(kernel: Any) -> None:
    settings = kernel.settings
    if settings.cache.s3 is None:
        return
    key = _kernel_key(settings)
    if key not in _boards and key not in _fleets:
        raise ConfigError(
            "cache.s3 needs a store that keeps the fleet's leases (store.kind: postgres): "
            "they live in the shared database."
        )
    try:
        fleet_of(settings)  # missing bucket keys are reported at start, not at the first download
    except KernelError:
        _boards.pop(key, None)
        raise


@hookimpl
def on_event(event: Event) -> Any:
    if not isinstance(event, DownloadStatus) or not _fleets:
        return None
    rec = event.record
    if rec.status not in ("cancelled", "completed", "failed"):
        return None

    async def tell() -> None:
        for fleet in list(_fleets.values()):
            if not rec.local_path.startswith(fleet.models_dir + os.sep):
                continue  # another kernel's download (several kernels in one process)
            refs = [rec.url, *(f.url for f in rec.files or ())]  # a multi-file download's too
            try:
                for ref in refs:
                    if rec.status == "cancelled":
                        await fleet.forget(ref, rec.model_id)
                    else:
                        await fleet.done_with(ref, rec.model_id)
            except KernelError as exc:
                log.warning("fleet.unwant_failed", model_id=rec.model_id, error=exc.message)

    return tell()


@hookimpl
def shutdown(kernel: Any) -> Any:
    key = _kernel_key(kernel.settings)
    _boards.pop(key, None)
    fleet = _fleets.pop(key, None)
    return None if fleet is None else fleet.close()

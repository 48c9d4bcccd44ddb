"""s3_cache: an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS) as a fleet's model
cache, so each file is fetched from its origin once for the whole fleet.

Active only with both ``store: {kind: postgres}`` (the leases live in the shared database) and
``cache: {s3: {endpoint, bucket, ...}}``; otherwise every hook here does nothing and nothing
of the ``[fleet]`` extra is imported. It wraps the source the other plugins resolve (a pluggy
wrapper on ``resolve_source``) in a ``FleetSource`` (see ``fleet.py``), and listens for cancels
(``on_event``) so the shared fetch stops when the last node that wanted the file cancels.
``client.S3Client`` is the small SigV4 client it uses.

It builds on ``pg_store`` (the leases, ``plugins/pg_store/leases.py``, live in the store's
database and its migrations): the one builtin plugin that imports another, and only when the
cache is configured, which needs the postgres store anyway.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import structlog

from kernel import hookimpl
from kernel.config import Settings
from kernel.errors import KernelError
from kernel.types import DownloadStatus, Event, Source

if TYPE_CHECKING:
    from plugins.s3_cache.fleet import Fleet

__all__ = ["fleet_of", "on_event", "resolve_source", "shutdown", "startup"]

log = structlog.get_logger()
_fleets: dict[int, Fleet] = {}  # by id(settings): one per kernel


def _active(settings: Settings) -> bool:
    return settings.cache.s3 is not None and settings.store.kind == "postgres"


def fleet_of(settings: Settings) -> Fleet | None:
    """This kernel's Fleet (lease manager + bucket client), or None when the cache is off."""
    if not _active(settings):
        return None
    fleet = _fleets.get(id(settings))
    if fleet is None:
        from plugins.pg_store import node_id_of, store_dsn
        from plugins.s3_cache.fleet import Fleet

        dsn = store_dsn(settings)
        assert dsn is not None
        fleet = _fleets[id(settings)] = Fleet(settings, dsn, node_id_of(settings), dict(os.environ))
    return fleet


@hookimpl(wrapper=True)
def resolve_source(ref: str, settings: Settings) -> Generator[None, Source | None, Source | None]:
    source = yield
    if source is None:
        return None
    fleet = fleet_of(settings)
    if fleet is None:
        return source
    from plugins.s3_cache.fleet import FleetSource

    # The transfer task binds its model id for logging; the fleet records who wants a file.
    model_id = structlog.contextvars.get_contextvars().get("model_id")
    # ``ref`` follows the wrapped source's (a property), which the Protocol's plain attribute
    # does not express.
    return cast(Source, FleetSource(source, fleet, model_id))


@hookimpl
def startup(kernel: Any) -> None:
    settings = kernel.settings
    if settings.cache.s3 is not None and settings.store.kind != "postgres":
        raise KernelError(
            "cache.s3 needs store.kind: postgres: the fleet's leases live in the shared database."
        )
    fleet_of(settings)  # missing bucket keys are reported at start, not at the first download


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
    fleet = _fleets.pop(id(kernel.settings), None)
    return None if fleet is None else fleet.close()

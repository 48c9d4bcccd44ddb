"""pg_store: download records in a shared PostgreSQL database, for a fleet of nodes.

Active only with ``store: {kind: postgres, dsn: ...}`` in the config (the DSN may come from
``MODELKERNEL_STORE_DSN`` instead); otherwise it returns None and the embedded SQLite store is
used. Needs the ``[fleet]`` extra (psycopg 3), imported only when the plugin is active, so a
node without the extra starts as before. The node id is ``fleet.node_id``, else the host name.
While the kernel runs, the node's row in ``mk_nodes`` gets a heartbeat every
``fleet.heartbeat_s`` seconds (the cluster view reads it). The store is also a
``LeasingStore``: the fleet's leases (``leases.py``) live in the same database, for the S3 cache
(``s3_cache``), which finds them through that declared capability, not through this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

import structlog

from kernel import hookimpl
from kernel.config import Settings
from kernel.errors import KernelError

if TYPE_CHECKING:
    from kernel.types import DownloadStore

__all__ = ["open_store", "register_routes", "shutdown", "startup", "store_dsn"]

log = structlog.get_logger()
DSN_ENV = "MODELKERNEL_STORE_DSN"
_heartbeats: dict[int, asyncio.Task[None]] = {}


def store_dsn(settings: Settings) -> str | None:
    """The PostgreSQL DSN when the postgres store is configured, else None."""
    if settings.store.kind != "postgres":
        return None
    dsn = settings.store.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        raise KernelError(f"store.kind is postgres but no DSN is set: give store.dsn or {DSN_ENV}.")
    return dsn


@hookimpl
def open_store(settings: Settings) -> DownloadStore | None:
    dsn = store_dsn(settings)
    if dsn is None:
        return None
    try:
        from plugins.pg_store.store import PgStore, default_node_id
    except ImportError as exc:  # psycopg missing
        raise KernelError(
            "store.kind is postgres but psycopg is not installed: pip install 'modelkernel[fleet]'."
        ) from exc
    node_id = settings.fleet.node_id or default_node_id()
    return PgStore(dsn, node_id, api_url=settings.fleet.api_url)


async def _beat(store: Any, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await store.heartbeat()
        except KernelError as exc:
            log.warning("fleet.heartbeat_failed", error=exc.message)


@hookimpl
def startup(kernel: Any) -> None:
    if kernel.settings.store.kind != "postgres":
        return
    from plugins.pg_store.store import PgStore

    store = kernel.store
    if isinstance(store, PgStore):
        _heartbeats[id(kernel)] = asyncio.ensure_future(
            _beat(store, kernel.settings.fleet.heartbeat_s)
        )


@hookimpl
def shutdown(kernel: Any) -> Any:
    task = _heartbeats.pop(id(kernel), None)
    if task is None:
        return None
    task.cancel()

    async def wait() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return wait()


@hookimpl
def register_routes(settings: Settings) -> list[Any]:
    """The cluster view (``GET /v1/cluster/nodes``, ``/v1/cluster/downloads``), only on a
    node that uses the shared database."""
    if settings.store.kind != "postgres":
        return []
    from plugins.pg_store.cluster import ClusterController

    return [ClusterController]

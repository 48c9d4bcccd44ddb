"""The operator's view of a fleet, served by every node that uses the shared database:

* ``GET /v1/cluster/nodes``: each node, its last heartbeat and its state (``up``; ``stale``
  when it stopped beating without saying goodbye, after three heartbeat intervals; ``stopped``);
* ``GET /v1/cluster/downloads``: each file (by sha256 when known, else by URL) with every
  node's download of it (status and bytes), a copies summary (available / total / failed) and,
  when a node is fetching it from the origin for the fleet, that fetch (holder, token, bytes).

Mounted only when ``store.kind`` is ``postgres``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import psycopg
from litestar import Controller, get

from kernel.api.deps import KernelDep
from kernel.errors import KernelError
from kernel.types import DownloadRecord
from kernel.validation import redact_url
from plugins.pg_store.store import PgStore

__all__ = ["ClusterController", "ClusterFile", "ClusterNode"]


class ClusterNode(msgspec.Struct, kw_only=True):
    node_id: str
    api_url: str | None
    state: Literal["up", "stale", "stopped"]
    started_at: int  # ms since the epoch
    last_heartbeat: int
    seconds_since_heartbeat: float


class ClusterNodes(msgspec.Struct, kw_only=True):
    nodes: list[ClusterNode]


class NodeCopy(msgspec.Struct, kw_only=True):
    node_id: str
    model_id: str
    status: str
    downloaded_bytes: int
    total_bytes: int


class Copies(msgspec.Struct, kw_only=True):
    available: int  # completed
    total: int  # node downloads of this file, whatever their status
    failed: int


class FleetFetch(msgspec.Struct, kw_only=True):
    holder: str | None
    token: int
    live: bool
    state: str
    done: int
    size: int | None


class ClusterFile(msgspec.Struct, kw_only=True):
    file: str  # sha256:<hex> or the URL
    url: str
    sha256: str | None
    size: int
    nodes: list[NodeCopy]
    copies: Copies
    fetch: FleetFetch | None = None


class ClusterDownloads(msgspec.Struct, kw_only=True):
    files: list[ClusterFile]


def _store(kernel: Any) -> PgStore:
    store = kernel.store
    if not isinstance(store, PgStore):
        raise KernelError("The cluster view needs store.kind: postgres.")
    return store


async def read_nodes(store: PgStore, heartbeat_s: float) -> list[ClusterNode]:
    async def work(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
        cur = await conn.execute(
            "SELECT node_id, api_url, state,"
            " (extract(epoch FROM started_at) * 1000)::bigint,"
            " (extract(epoch FROM heartbeat_at) * 1000)::bigint,"
            " extract(epoch FROM now() - heartbeat_at)::float8"
            " FROM mk_nodes ORDER BY node_id"
        )
        return await cur.fetchall()

    nodes = []
    for node_id, api_url, state, started, beat, age in await store.run(work):
        shown: Literal["up", "stale", "stopped"] = (
            "stopped" if state != "up" else "up" if age <= 3 * heartbeat_s else "stale"
        )
        nodes.append(
            ClusterNode(
                node_id=node_id,
                api_url=api_url,
                state=shown,
                started_at=started,
                last_heartbeat=beat,
                seconds_since_heartbeat=round(max(age, 0.0), 3),
            )
        )
    return nodes


async def read_files(store: PgStore) -> list[ClusterFile]:
    async def work(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Any], list[Any]]:
        cur = await conn.execute(
            "SELECT node_id, record::text FROM mk_downloads ORDER BY node_id, model_id"
        )
        records = await cur.fetchall()
        cur = await conn.execute(
            "SELECT file_key, holder, token, lease_until > now(), state, done, size FROM mk_leases"
        )
        return records, await cur.fetchall()

    rows, lease_rows = await store.run(work)
    decoder = msgspec.json.Decoder(DownloadRecord)
    leases = {row[0]: row for row in lease_rows}
    files: dict[str, ClusterFile] = {}
    for node_id, text in rows:
        try:
            rec = decoder.decode(text)
        except msgspec.DecodeError:
            continue
        sha = rec.expected_sha256 or rec.sha256
        key = f"sha256:{sha}" if sha else rec.url
        entry = files.get(key)
        if entry is None:
            entry = files[key] = ClusterFile(
                file=redact_url(key),  # credentials in a URL are never shown
                url=redact_url(rec.url),
                sha256=sha,
                size=rec.total_bytes,
                nodes=[],
                copies=Copies(available=0, total=0, failed=0),
            )
        entry.size = entry.size or rec.total_bytes
        entry.nodes.append(
            NodeCopy(
                node_id=node_id,
                model_id=rec.model_id,
                status=rec.status,
                downloaded_bytes=rec.downloaded_bytes,
                total_bytes=rec.total_bytes,
            )
        )
        entry.copies.total += 1
        entry.copies.available += rec.status == "completed"
        entry.copies.failed += rec.status == "failed"
        lease = leases.get(key) or next(
            (row for k, row in leases.items() if k.startswith(f"url:{rec.url}#")), None
        )
        if lease is not None and entry.fetch is None:
            entry.fetch = FleetFetch(
                holder=lease[1],
                token=lease[2],
                live=lease[3],
                state=lease[4],
                done=lease[5],
                size=lease[6],
            )
    return list(files.values())


class ClusterController(Controller):
    path = "/v1/cluster"
    tags = ["cluster"]  # noqa: RUF012 - Litestar declares Controller.tags as a plain attribute

    @get("/nodes", summary="The fleet's nodes: last heartbeat and state")
    async def nodes(self, kernel: KernelDep) -> ClusterNodes:
        return ClusterNodes(
            nodes=await read_nodes(_store(kernel), kernel.settings.fleet.heartbeat_s)
        )

    @get("/downloads", summary="Each file across the fleet: per-node status, copies, the fetch")
    async def downloads(self, kernel: KernelDep) -> ClusterDownloads:
        return ClusterDownloads(files=await read_files(_store(kernel)))

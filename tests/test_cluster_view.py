"""The cluster view on a real PostgreSQL: two nodes' kernels share one database; either node
answers GET /v1/cluster/nodes and /v1/cluster/downloads. Without the postgres store the routes
do not exist."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from kernel.api.app import create_app
from kernel.config import FleetSettings, Settings, StoreSettings
from kernel.core import Kernel
from tests.conftest import make_settings
from tests.helpers.origin import Origin

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")


def node_settings(tmp_path: Path, dsn: str, node_id: str) -> Settings:
    settings = make_settings(tmp_path / node_id)
    settings.store = StoreSettings(kind="postgres", dsn=dsn)
    settings.fleet = FleetSettings(node_id=node_id, api_url=f"http://{node_id}:8080")
    return settings


async def completed(kernel: Kernel, model_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while kernel.downloads.get(model_id).status != "completed":  # noqa: ASYNC110
        assert loop.time() < deadline
        await asyncio.sleep(0.02)


async def test_every_node_shows_the_fleet(tmp_path: Path, pg_dsn: str, origin: Origin) -> None:
    data = b"c" * 200_000
    url = origin.add_file("cluster.bin", data)
    b = Kernel(node_settings(tmp_path, pg_dsn, "node-b"), load_entrypoints=False)
    await b.start()
    try:
        await b.downloads.create(model_id="shared", url=url)
        await completed(b, "shared")
        a = Kernel(node_settings(tmp_path, pg_dsn, "node-a"), load_entrypoints=False)
        async with AsyncTestClient(app=create_app(a)) as client:
            await a.downloads.create(model_id="mine", url=url)
            await completed(a, "mine")
            await a.downloads.flush()
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO mk_nodes(node_id, state, heartbeat_at)"
                    " VALUES ('node-gone', 'up', now() - interval '1 hour')"
                )
            response = await client.get("/v1/cluster/nodes")
            assert response.status_code == 200, response.text
            nodes = {n["node_id"]: n for n in response.json()["nodes"]}
            assert {k: v["state"] for k, v in nodes.items()} == {
                "node-a": "up",
                "node-b": "up",
                "node-gone": "stale",
            }
            assert nodes["node-a"]["api_url"] == "http://node-a:8080"
            assert nodes["node-gone"]["seconds_since_heartbeat"] >= 3600
            response = await client.get("/v1/cluster/downloads")
            assert response.status_code == 200, response.text
            (file,) = response.json()["files"]
            assert (file["file"], file["size"]) == (url, len(data))
            assert sorted((n["node_id"], n["model_id"], n["status"]) for n in file["nodes"]) == [
                ("node-a", "mine", "completed"),
                ("node-b", "shared", "completed"),
            ]
            assert file["copies"] == {"available": 2, "total": 2, "failed": 0}
            assert file["fetch"] is None
    finally:
        await b.stop()


async def test_without_the_shared_store_there_is_no_cluster_view(
    client: AsyncTestClient,  # type: ignore[type-arg]
) -> None:
    assert (await client.get("/v1/cluster/nodes")).status_code == 404
    assert (await client.get("/v1/cluster/downloads")).status_code == 404


async def test_the_cluster_view_never_shows_url_credentials(
    tmp_path: Path, pg_dsn: str, origin: Origin
) -> None:
    url = origin.add_file("secret-cluster.bin", b"s" * 10_000).replace("://", "://bob:hunter2@")
    a = Kernel(node_settings(tmp_path, pg_dsn, "node-a"), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(a)) as client:
        await a.downloads.create(model_id="secret", url=url)
        await completed(a, "secret")
        await a.downloads.flush()
        response = await client.get("/v1/cluster/downloads")
        assert response.status_code == 200, response.text
        assert "hunter2" not in response.text
        (file,) = [f for f in response.json()["files"] if "secret-cluster" in f["url"]]
        assert file["url"].startswith("http://***@127.0.0.1:")

"""The fleet end to end: three real modelkernel processes on loopback sharing a throwaway
PostgreSQL and a SeaweedFS bucket, fetching from an origin that counts the body bytes it sends.

1. Three nodes create the same 64 MiB download at once: the origin sends the file once, all
   three complete byte-identical.
2. The holder is killed (-9) at ~40%: another node takes over within the lease time plus a
   poll, the origin sends at most the size plus one part, and the killed node, restarted,
   finishes from the bucket with 0 bytes from the origin.

Each test prints its figures (origin bytes, takeover time) for the closing note.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from plugins.s3_cache.client import S3Client
from tests.helpers.origin import Origin
from tests.helpers.s3 import ACCESS_KEY, SECRET_KEY, Seaweed
from tests.helpers.server import ServerProcess

pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")

MiB = 1 << 20
SIZE = 64 * MiB
PART = 8 * MiB
LEASE_S = 3.0
POLL_S = 0.5


def make_bucket(seaweed: Seaweed) -> str:
    name = f"fleet-{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        client = S3Client(seaweed.endpoint, name, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        try:
            await client.create_bucket()
        finally:
            await client.aclose()

    asyncio.run(create())
    return name


def fleet_nodes(
    tmp_path: Path, dsn: str, seaweed: Seaweed, bucket: str, count: int = 3
) -> list[ServerProcess]:
    nodes = []
    for i in range(count):
        node_id = f"node-{i}"
        config = {
            "store": {"kind": "postgres", "dsn": dsn},
            "fleet": {
                "node_id": node_id,
                "lease_s": LEASE_S,
                "heartbeat_s": 0.5,
                "poll_s": POLL_S,
            },
            "cache": {"s3": {"endpoint": seaweed.endpoint, "bucket": bucket, "part_size": PART}},
            "downloads": {"retry": {"attempts": 20, "backoff_seconds": 0.1}},
        }
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        nodes.append(ServerProcess(tmp_path / node_id, config, env, start_timeout=60))
    return nodes


def start_all(nodes: list[ServerProcess]) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        for future in [pool.submit(node.start) for node in nodes]:
            future.result()


def stop_all(nodes: list[ServerProcess]) -> None:
    for node in nodes:
        try:
            node.stop(timeout=15)
        except TimeoutError:
            pass


def create(node: ServerProcess, model_id: str, url: str) -> dict[str, Any]:
    response = httpx.post(
        f"{node.url}/v1/downloads", json={"model_id": model_id, "url": url}, timeout=30
    )
    assert response.status_code == 202, response.text
    return response.json()


def detail(node: ServerProcess, model_id: str) -> dict[str, Any]:
    response = httpx.get(f"{node.url}/v1/downloads/{model_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_completed(nodes: list[ServerProcess], model_id: str, within: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    bodies: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        bodies = [detail(node, model_id) for node in nodes]
        if any(b["status"] in ("failed", "cancelled") for b in bodies):
            break
        if all(b["status"] == "completed" for b in bodies):
            return bodies
        time.sleep(0.1)
    logs = "\n".join(node.output()[-3000:] for node in nodes)
    raise AssertionError(f"not all completed: {[b['status'] for b in bodies]} {bodies}\n{logs}")


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def lease_row(dsn: str) -> tuple[Any, ...] | None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT holder, token, state, done FROM mk_leases").fetchone()


def test_three_nodes_fetch_one_file_once(
    tmp_path: Path, pg_dsn: str, seaweed: Seaweed, origin: Origin
) -> None:
    data = os.urandom(SIZE)
    url = origin.add_file("fleet-s1.bin", data)
    nodes = fleet_nodes(tmp_path, pg_dsn, seaweed, make_bucket(seaweed))
    start_all(nodes)
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda node: create(node, "model", url), nodes))
        bodies = wait_completed(nodes, "model")
        took = time.monotonic() - started
    finally:
        stop_all(nodes)
    sent = origin.body_bytes.get("fleet-s1.bin", 0)
    print(f"\nscenario 1: origin body bytes {sent} for a {SIZE}-byte file "
          f"({sent / SIZE:.3f} x), all three done in {took:.1f} s")
    assert sent <= SIZE  # the bytes once (headers are not body bytes)
    expected = hashlib.sha256(data).hexdigest()
    assert [digest(b["local_path"]) for b in bodies] == [expected] * 3
    assert lease_row(pg_dsn)[2] == "complete"  # type: ignore[index]


def test_the_holder_killed_at_40_percent_is_taken_over(
    tmp_path: Path, pg_dsn: str, seaweed: Seaweed, origin: Origin
) -> None:
    data = os.urandom(SIZE)
    url = origin.add_file("fleet-s2.bin", data)
    origin.faults.throttle_bps = 24 * MiB  # about 2.7 s for the whole file
    nodes = fleet_nodes(tmp_path, pg_dsn, seaweed, make_bucket(seaweed))
    start_all(nodes)
    try:
        create(nodes[0], "model", url)  # node-0 becomes the holder
        deadline = time.monotonic() + 60
        while (lease_row(pg_dsn) or (None,))[0] != "node-0":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for node in nodes[1:]:
            create(node, "model", url)
        while origin.body_bytes.get("fleet-s2.bin", 0) < 0.4 * SIZE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        nodes[0].kill()
        killed_at = time.monotonic()
        sent_at_kill = origin.body_bytes.get("fleet-s2.bin", 0)
        while True:  # another node holds the lease
            row = lease_row(pg_dsn)
            if row is not None and row[0] not in (None, "node-0"):
                break
            assert time.monotonic() < killed_at + 60, row
            time.sleep(0.02)
        takeover = time.monotonic() - killed_at
        origin.faults.throttle_bps = None
        bodies = wait_completed(nodes[1:], "model")
        sent_before_restart = origin.body_bytes.get("fleet-s2.bin", 0)
        nodes[0].start()
        restarted = wait_completed(nodes[:1], "model")
        sent_after = origin.body_bytes.get("fleet-s2.bin", 0)
    finally:
        origin.faults.throttle_bps = None
        stop_all(nodes)
    print(f"\nscenario 2: killed at {sent_at_kill / SIZE:.0%} of the origin bytes; takeover "
          f"after {takeover:.2f} s (lease {LEASE_S} s + poll {POLL_S} s); origin body bytes "
          f"{sent_before_restart} ({sent_before_restart / SIZE:.3f} x, bound size + one part = "
          f"{(SIZE + PART) / SIZE:.3f} x); restarted node took {sent_after - sent_before_restart}"
          " from the origin")
    assert takeover <= LEASE_S + POLL_S + 2.0  # + scheduling slack on a loaded machine
    assert sent_before_restart <= SIZE + PART
    assert sent_after == sent_before_restart  # the restarted node read only the bucket
    expected = hashlib.sha256(data).hexdigest()
    assert [digest(b["local_path"]) for b in bodies + restarted] == [expected] * 3

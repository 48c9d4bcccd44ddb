from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel._http_wire import close_idle_connections
from tests.helpers.origin import Origin
from tests.helpers.tls import TestCA


@pytest.fixture(autouse=True)
def no_kept_connections() -> Iterator[None]:
    """Connections kept alive by one test are closed after it (none outlives its origin)."""
    yield
    close_idle_connections()


@pytest.fixture(scope="session")
def origin_server() -> Iterator[Origin]:
    """One loopback origin server for the whole session."""
    with Origin() as server:
        yield server


@pytest.fixture
def origin(origin_server: Origin) -> Iterator[Origin]:
    """The shared origin; faults and request log are reset after each test."""
    try:
        yield origin_server
    finally:
        origin_server.reset()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A test certificate authority for one test module."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tls_server(ca: TestCA) -> Iterator[Origin]:
    """An HTTPS origin whose certificate ``ca`` issued (reset by the module's own fixture)."""
    with Origin(tls=ca.issue("origin")) as server:
        yield server


# --- the app over a real kernel (SQLite in tmp_path, builtin plugins) ------------------------

from collections.abc import AsyncIterator  # noqa: E402

from litestar.testing import AsyncTestClient  # noqa: E402

from kernel.api.app import create_app  # noqa: E402
from kernel.config import (  # noqa: E402
    DownloadSettings,
    RetrySettings,
    Settings,
    StorageSettings,
)
from kernel.core import Kernel  # noqa: E402


def make_settings(tmp_path: Path, **downloads: object) -> Settings:
    options: dict[str, object] = {
        "stall_timeout_s": 5.0,
        "retry": RetrySettings(attempts=3, backoff_seconds=0.02),
        **downloads,
    }
    return Settings(
        storage=StorageSettings(
            models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state")
        ),
        downloads=DownloadSettings(**options),  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    """An HTTP client on the app; the app's lifespan starts and stops the kernel."""
    kernel = Kernel(settings, load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as test_client:
        test_client.kernel = kernel  # type: ignore[attr-defined]
        yield test_client


# --- fleet: a throwaway PostgreSQL (and S3), started once per session when a test asks ------

from tests.helpers.fleet import pg_cluster, pg_dsn, s3_bucket, seaweed  # noqa: E402,F401

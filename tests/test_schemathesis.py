"""Schemathesis against ``/schema``: every operation, positive and negative data, no 5xx, and
every response conforms to the OpenAPI document (status code, content type, body schema).

Schemathesis drives the app in-process and runs its lifespan, so the kernel (SQLite in
``tmp_path``) starts and stops as under uvicorn. Generated create bodies carry arbitrary URLs:
:class:`OfflineSources` swaps whatever source a plugin resolves for one that fails at probe time,
so no generated URL is ever contacted.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from kernel import hookimpl
from kernel.api.app import create_app
from kernel.config import HubSettings, Settings, SourcesSettings
from kernel.core import Kernel
from kernel.errors import InvalidRequest, PermanentError
from kernel.types import Body, Probe, Source
from tests.conftest import make_settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# An SSE stream never ends; read what it sends in this long, then cut it.
EVENT_STREAM_READ_S = 0.05


class OfflineSource:
    """A Source that does no I/O: every download through it fails at probe time."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    async def probe(self) -> Probe:
        raise PermanentError(f"test: no network ({self.ref})")

    async def open(self, offset: int, validator: str | None) -> Body:
        raise PermanentError(f"test: no network ({self.ref})")

    async def aclose(self) -> None:
        return None


class OfflineSources:
    """Wraps ``resolve_source``: the plugins still decide which refs are valid (an unclaimed
    scheme or a malformed ``hf://`` ref stays a 400), but any source they return is swapped for
    an :class:`OfflineSource` before the kernel can probe it or list a repository."""

    @hookimpl(wrapper=True)
    def resolve_source(
        self, ref: str, settings: Settings
    ) -> Generator[None, Source | None, Source | None]:
        source = yield
        return None if source is None else OfflineSource(ref)


def _offline_settings(tmp_path: Path) -> Settings:
    base = make_settings(tmp_path)
    # Belt and braces: a hub source that somehow escaped the wrapper would reach a closed
    # loopback port, never the real hub, and would carry no real token.
    hub = HubSettings(endpoint="http://127.0.0.1:9", token="test-no-token")
    return msgspec.structs.replace(base, sources=SourcesSettings(huggingface=hub))


@pytest.fixture
def api_schema(tmp_path: Path) -> Any:
    kernel = Kernel(_offline_settings(tmp_path), load_entrypoints=False,
                    extra_plugins=[OfflineSources()])
    return schemathesis.openapi.from_asgi("/schema/openapi.json", create_app(kernel))


schema = schemathesis.pytest.from_fixture("api_schema")
bounded = settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _call(case: Any, checks: list[Any]) -> None:
    kwargs: dict[str, Any] = {}
    if case.path.endswith("/events"):
        kwargs["timeout"] = EVENT_STREAM_READ_S
    case.call_and_validate(checks=checks, **kwargs)


@schema.parametrize()
@bounded
def test_every_response_conforms_to_the_schema(case: Any) -> None:
    _call(case, CHECKS)


async def test_generated_urls_never_reach_a_real_source(tmp_path: Path) -> None:
    kernel = Kernel(_offline_settings(tmp_path), load_entrypoints=False,
                    extra_plugins=[OfflineSources()])
    for ref in ("https://example.com/m.gguf", "http://10.0.0.1/m.gguf",
                "hf://owner/repo/m.gguf", "https://huggingface.co/o/r/resolve/main/m.gguf"):
        source = kernel.plugins.resolve_source(ref)
        assert isinstance(source, OfflineSource)
        with pytest.raises(PermanentError, match="no network"):
            await source.probe()
    with pytest.raises(InvalidRequest):  # refs no plugin claims still fail as in production
        kernel.plugins.resolve_source("ftp://example.com/m.gguf")

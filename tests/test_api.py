"""The Kolosal Downloads API surface: both prefixes, every alias, bodies, CORS, auth, schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from kernel import hookimpl
from kernel.api.app import create_app
from kernel.config import AuthSettings, PluginSettings, Settings
from kernel.core import Kernel
from kernel.types import EngineSpec
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_for, wait_status
from tests.helpers.fakes import EchoEngine, EchoPlugin
from tests.helpers.origin import Origin

PREFIXES = ["/v1/downloads", "/downloads"]
CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
    "access-control-allow-headers": "Content-Type, Authorization, X-API-Key",
}


async def start_slow(client: Any, origin: Origin, model_id: str, **extra: Any) -> dict[str, Any]:
    origin.faults.throttle_bps = 50_000
    url = origin.add_file(f"{model_id}.bin", b"s" * 400_000)
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url, **extra})
    assert response.status_code == 202, response.text
    return await wait_for(client, model_id, lambda b: b["status"] == "downloading")


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_every_action_works_on_both_prefixes(client: Any, origin: Origin, prefix: str) -> None:
    await start_slow(client, origin, "both")
    assert (await client.get(f"{prefix}/both")).json()["model_id"] == "both"
    assert (await client.post(f"{prefix}/both/pause")).status_code == 200
    assert (await client.post(f"{prefix}/both/resume")).status_code == 200
    assert (await client.post(f"{prefix}/both/cancel")).json()["previous_status"] in ("downloading", "queued")
    listing = (await client.get(f"{prefix}?status=all")).json()
    assert [d["model_id"] for d in listing["active_downloads"]] == ["both"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("DELETE", "/v1/downloads", None),
        ("POST", "/v1/downloads/cancel", None),
        ("POST", "/v1/downloads", {"action": "cancel_all"}),
        ("DELETE", "/downloads", None),
        ("POST", "/downloads/cancel", None),
        ("POST", "/downloads", {"action": "cancel_all"}),
    ],
)
async def test_every_cancel_all_form_cancels(
    client: Any, origin: Origin, method: str, path: str, body: Any
) -> None:
    await start_slow(client, origin, "victim")
    response = await client.request(method, path, json=body)
    assert response.status_code == 200
    assert response.json()["summary"]["successful_cancellations"] == 1
    assert (await client.get("/v1/downloads/victim")).json()["status"] == "cancelled"


@pytest.mark.parametrize("method", ["DELETE", "POST"])
async def test_both_cancel_forms_cancel_one(client: Any, origin: Origin, method: str) -> None:
    await start_slow(client, origin, "one")
    path = "/v1/downloads/one" if method == "DELETE" else "/v1/downloads/one/cancel"
    body = (await client.request(method, path)).json()
    assert set(body) == {"success", "message", "model_id", "previous_status", "download_type", "timestamp"}


async def test_list_body_has_exactly_the_kolosal_shape(client: Any, origin: Origin) -> None:
    await start_slow(client, origin, "shape", model_type="embedding")
    listing = (await client.get("/v1/downloads")).json()
    assert set(listing) == {"active_downloads", "summary", "timestamp"}
    assert listing["summary"] == {
        "total_active": 1, "startup_downloads": 0, "regular_downloads": 1,
        "embedding_model_downloads": 1, "llm_model_downloads": 0,
    }
    item = listing["active_downloads"][0]
    assert {"model_id", "status", "download_type", "type", "url", "local_path", "progress", "timing"} <= set(item)
    assert item["type"] == "embedding" and item["download_type"] == "regular"
    assert set(item["progress"]) == {"downloaded_bytes", "total_bytes", "percentage", "download_speed_bps"}
    assert {"start_time", "elapsed_seconds"} <= set(item["timing"])
    assert "end_time" not in item["timing"] and "error_message" not in item
    assert "engine_creation" not in item
    assert isinstance(listing["timestamp"], int) and listing["timestamp"] > 1_600_000_000_000


async def test_list_shows_only_active_unless_status_widens_it(client: Any, origin: Origin) -> None:
    url = origin.add_file("ended.bin", b"e" * 10)
    await client.post("/v1/downloads", json={"model_id": "ended", "url": url})
    await wait_status(client, "ended", "completed")
    await start_slow(client, origin, "running")
    ids = lambda r: [d["model_id"] for d in r.json()["active_downloads"]]  # noqa: E731
    assert ids(await client.get("/v1/downloads")) == ["running"]
    assert ids(await client.get("/v1/downloads?status=all")) == ["ended", "running"]
    assert ids(await client.get("/v1/downloads?status=completed")) == ["ended"]
    assert ids(await client.get("/v1/downloads?status=completed,downloading")) == ["ended", "running"]
    summary = (await client.get("/v1/downloads?status=all")).json()["summary"]
    assert summary["total_active"] == 1
    assert_error(await client.get("/v1/downloads?status=bogus"), 400, "invalid_request_error", param="status")


async def test_running_download_reports_speed_and_eta(client: Any, origin: Origin) -> None:
    await start_slow(client, origin, "eta")
    body = await wait_for(client, "eta", lambda b: b["progress"]["download_speed_bps"] > 0)
    assert body["timing"]["estimated_remaining_seconds"] >= 0
    assert 0 < body["progress"]["percentage"] < 100


async def test_cors_headers_on_success_and_error_and_options_answers_204(client: Any) -> None:
    for response in (await client.get("/v1/downloads"), await client.get("/v1/downloads/nope")):
        for name, value in CORS.items():
            assert response.headers[name] == value
    for path in ("/v1/downloads", "/v1/downloads/x/pause", "/totally/unknown"):
        response = await client.options(path)
        assert response.status_code == 204 and response.content == b""
        assert response.headers["access-control-allow-origin"] == "*"


async def test_health_and_openapi_schema(client: Any) -> None:
    health = await client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/v1/downloads/{model_id}/pause" in schema["paths"]
    assert "/downloads/{model_id}" in schema["paths"]
    assert "Download" in schema["components"]["schemas"]


@pytest.fixture
async def keyed(tmp_path: Path) -> Any:
    settings = make_settings(tmp_path)
    settings = Settings(
        storage=settings.storage, downloads=settings.downloads,
        auth=AuthSettings(require_api_key=True, api_keys=["k1", "s3cret"]),
    )
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as c:
        yield c


async def test_api_key_is_required_when_configured(keyed: Any) -> None:
    assert_error(await keyed.get("/v1/downloads"), 401, "authentication_error", code="invalid_api_key")
    assert_error(await keyed.get("/v1/downloads", headers={"X-API-Key": "wrong"}), 401,
                 "authentication_error", code="invalid_api_key")
    assert_error(await keyed.get("/v1/downloads", headers={"Authorization": "Basic s3cret"}), 401,
                 "authentication_error", code="invalid_api_key")
    assert (await keyed.get("/v1/downloads", headers={"X-API-Key": "s3cret"})).status_code == 200
    assert (await keyed.get("/v1/downloads", headers={"Authorization": "Bearer k1"})).status_code == 200
    assert (await keyed.get("/health")).status_code == 200
    assert (await keyed.options("/v1/downloads")).status_code == 204


# --- a startup download, with a small real engine backend from a plugin -----------------------


@pytest.fixture
async def engine_client(tmp_path: Path) -> Any:
    plugin = EchoPlugin()
    kernel = Kernel(make_settings(tmp_path), load_entrypoints=False, extra_plugins=[plugin])
    async with AsyncTestClient(app=create_app(kernel)) as c:
        c.plugin = plugin
        c.kernel = kernel
        yield c


async def test_startup_download_creates_an_engine_then_completes(engine_client: Any, origin: Origin) -> None:
    client = engine_client
    client.plugin.backend.gate.clear()
    url = origin.add_file("startup.bin", b"m" * 1000)
    engine = {"load_immediately": True, "main_gpu_id": 0, "inference_engine": "echo"}
    created = await client.post("/v1/downloads", json={
        "model_id": "boot", "url": url, "model_type": "embedding", "engine_creation": engine})
    assert created.status_code == 202
    detail = await wait_status(client, "boot", "creating_engine")
    assert detail["download_type"] == "startup"
    assert detail["engine_creation"] == {
        "model_id": "boot", "load_immediately": True, "main_gpu_id": 0, "model_type": "embedding",
        "inference_engine": "echo",
        "embedding_features": {"normalization": True, "supports_batching": True, "optimized_for_retrieval": True},
        "recommended_usage": {"document_embedding": True, "semantic_search": True, "similarity_computation": True},
    }
    listed = (await client.get("/v1/downloads")).json()
    assert listed["active_downloads"][0]["engine_creation"] == {
        "model_id": "boot", "load_immediately": True, "main_gpu_id": 0}
    assert listed["summary"]["startup_downloads"] == 1
    client.plugin.backend.gate.set()
    await wait_status(client, "boot", "completed")
    assert "boot" in client.kernel.engines.engines


async def test_cancel_during_engine_creation_abandons_the_engine(engine_client: Any, origin: Origin) -> None:
    client = engine_client
    client.plugin.backend.gate.clear()
    url = origin.add_file("abandon.bin", b"m" * 1000)
    await client.post("/v1/downloads", json={
        "model_id": "abandon", "url": url, "engine_creation": {"inference_engine": "echo-cpu"}})
    detail = await wait_status(client, "abandon", "creating_engine")
    body = (await client.delete("/v1/downloads/abandon")).json()
    assert body["previous_status"] == "creating_engine"
    assert body["engine_creation"] == {"model_id": "abandon", "load_immediately": True, "main_gpu_id": 0}
    client.plugin.backend.gate.set()
    assert Path(detail["local_path"]).exists()  # the downloaded file stays
    assert "abandon" not in client.kernel.engines.engines


async def test_unknown_gpu_is_400_at_create_time(engine_client: Any, origin: Origin) -> None:
    url = origin.add_file("gpu.bin", b"m" * 10)
    response = await engine_client.post("/v1/downloads", json={
        "model_id": "gpu", "url": url, "engine_creation": {"inference_engine": "echo", "main_gpu_id": 7}})
    assert_error(response, 400, "invalid_request_error", param="engine_creation.main_gpu_id")


async def test_no_inference_engine_means_the_default_engine_for_downloads_and_models(
    tmp_path: Path, origin: Origin
) -> None:
    """POST /v1/downloads and POST /v1/models agree: the registry's default (here the only
    backend: engine_llamacpp is disabled), recorded by name."""
    settings = msgspec.structs.replace(
        make_settings(tmp_path), plugins=PluginSettings(disable=["engine_llamacpp"])
    )
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[EchoPlugin()])
    async with AsyncTestClient(app=create_app(kernel)) as client:
        engines = (await client.get("/v1/engines")).json()
        assert engines["default_engine"] == "echo"
        url = origin.add_file("default.bin", b"m" * 100)
        created = await client.post("/v1/downloads", json={
            "model_id": "dl", "url": url, "engine_creation": {"main_gpu_id": 0}})
        assert created.status_code == 202, created.text
        await wait_status(client, "dl", "completed")
        detail = (await client.get("/v1/downloads/dl")).json()
        assert detail["engine_creation"]["inference_engine"] == "echo"
        local = tmp_path / "local.bin"
        local.write_bytes(b"m" * 10)
        added = await client.post("/v1/models", json={"model_id": "local", "model_path": str(local)})
        assert added.status_code in (200, 201), added.text
        models = {m["model_id"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert models["local"]["inference_engine"] == "echo"
        assert models["dl"]["inference_engine"] == "echo"


class TypeRecordingBackend:
    """Records the model type each create was asked for; "auto" reads as an embedding."""

    name = "typed"
    aliases: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def create(self, model_id: str, path: str, model_type: str, spec: EngineSpec) -> EchoEngine:
        self.asked.append(model_type)
        return EchoEngine(model_id, "embedding" if model_type == "auto" else model_type)


class TypeRecordingPlugin:
    def __init__(self, backend: TypeRecordingBackend) -> None:
        self.backend = backend

    @hookimpl
    def register_engine_backends(self, settings: Settings) -> list[TypeRecordingBackend]:
        return [self.backend]


async def test_the_infer_model_type_intent_survives_a_restart(tmp_path: Path, origin: Origin) -> None:
    """POST /v1/models without model_type asks the backend to read the type from the file;
    the intent is kept in the record, so a download finished after a restart still does."""
    settings = msgspec.structs.replace(
        make_settings(tmp_path), plugins=PluginSettings(disable=["engine_llamacpp"])
    )
    url = origin.add_file("plainly-named.bin", b"m" * 200_000)
    origin.faults.throttle_bps = 50_000
    first = Kernel(settings, load_entrypoints=False,
                   extra_plugins=[TypeRecordingPlugin(TypeRecordingBackend())])
    async with AsyncTestClient(app=create_app(first)) as client:
        added = await client.post("/v1/models", json={"model_id": "typed", "model_path": url})
        assert added.status_code == 202, added.text
        assert (await client.post("/v1/downloads/typed/pause")).status_code == 200
    engine = first.downloads.get("typed").engine  # the kernel has stopped: read it directly
    assert engine is not None
    assert engine.infer_model_type is True
    origin.faults.throttle_bps = None
    backend = TypeRecordingBackend()
    again = Kernel(settings, load_entrypoints=False, extra_plugins=[TypeRecordingPlugin(backend)])
    async with AsyncTestClient(app=create_app(again)) as client:
        assert (await client.post("/v1/downloads/typed/resume")).status_code == 200
        await wait_status(client, "typed", "completed")
        models = {m["model_id"]: m for m in (await client.get("/v1/models")).json()["models"]}
    assert backend.asked == ["auto"]
    assert models["typed"]["model_type"] == "embedding"

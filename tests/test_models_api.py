"""Kolosal's /models and /engines, and the OpenAI /completions and /embeddings, over a real
kernel with the llama-cpp plugin and tiny GGUF models served by the loopback origin.

Tests that load a model need llama-cpp-python and skip without it; the rest (validation,
GGUF rejection, errors) run everywhere.
"""

from __future__ import annotations

import base64
import collections
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from kernel import hookimpl
from kernel.api.app import create_app
from kernel.config import ModelEntry, Settings
from kernel.core import Kernel
from kernel.types import TERMINAL, DownloadStatus, Event
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_status
from tests.helpers.gguf_models import EMBEDDING_LENGTH, corrupt_gguf_bytes, write_tiny_model
from tests.helpers.origin import Origin

PREFIXES = ["/v1", ""]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models-api")
    return {
        "llm": write_tiny_model(root / "tiny-llama.gguf"),
        "embedding": write_tiny_model(root / "tiny-embed.gguf", embedding=True),
    }


@pytest.fixture
def llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp")


async def add(client: Any, prefix: str = "/v1", **body: Any) -> Any:
    return await client.post(f"{prefix}/models", json=body)


class StatusLog:
    """Records every status each download goes through (observers run in the app's loop)."""

    def __init__(self) -> None:
        self.seen: collections.defaultdict[str, list[str]] = collections.defaultdict(list)

    @hookimpl
    def on_event(self, event: Event) -> None:
        if isinstance(event, DownloadStatus):
            self.seen[event.record.model_id].append(event.record.status)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Any]:
    """The app over a real kernel (builtin plugins, llama-cpp included) and a status log."""
    log = StatusLog()
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[log])
    async with AsyncTestClient(app=create_app(kernel)) as test_client:
        test_client.kernel = kernel  # type: ignore[attr-defined]
        test_client.statuses = log.seen  # type: ignore[attr-defined]
        yield test_client


async def statuses_until_done(client: Any, model_id: str) -> list[str]:
    await wait_status(client, model_id, *TERMINAL, timeout=60)
    return list(client.statuses[model_id])


# --- a URL: a startup download that ends in an engine -----------------------------------------


async def test_a_model_url_downloads_builds_the_engine_and_completes(
    llama_cpp: Any, client: Any, origin: Origin, gguf: dict[str, Path]
) -> None:
    url = origin.add_file("tiny-llama.gguf", gguf["llm"].read_bytes())
    created = await add(client, model_id="tiny", model_path=url, model_type="llm")
    assert created.status_code == 202, created.text
    assert await statuses_until_done(client, "tiny") == [
        "downloading", "creating_engine", "completed"]
    assert created.json() == {
        "model_id": "tiny", "model_type": "llm", "status": "downloading",
        "message": "Download started in background", "download_url": url,
        "local_path": str(Path(client.kernel.settings.storage.models_dir).resolve()
                          / "tiny" / "tiny-llama.gguf"),
    }
    started = time.perf_counter()
    response = await client.post("/v1/completions",
                                 json={"model": "tiny", "prompt": "hello world", "max_tokens": 8})
    latency = time.perf_counter() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-") and abs(body["created"] - time.time()) < 60
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["text"].strip()
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 2
    assert latency < 10
    listed = (await client.get("/v1/models")).json()
    assert listed["total_count"] == 1
    assert listed["models"][0]["status"] == "loaded" and listed["models"][0]["type"] == "llm"


async def test_a_model_url_without_a_type_becomes_what_its_metadata_says(
    llama_cpp: Any, client: Any, origin: Origin, gguf: dict[str, Path]
) -> None:
    url = origin.add_file("vectors.gguf", gguf["embedding"].read_bytes())
    assert (await add(client, model_id="vec", model_path=url)).status_code == 202
    assert (await statuses_until_done(client, "vec"))[-1] == "completed"
    model = (await client.get("/v1/models/vec")).json()
    assert model["model_type"] == "embedding" and model["status"] == "loaded"
    assert model["details"]["pooling_type"] == "mean"
    response = await client.post("/v1/embeddings", json={"model": "vec", "input": "hello world"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "vec"
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == EMBEDDING_LENGTH
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


async def test_not_gguf_bytes_fail_with_the_engines_reason_and_the_file_stays(
    client: Any, origin: Origin
) -> None:
    url = origin.add_file("weights.bin", b"<html>not a model</html>" * 40)
    assert (await add(client, model_id="html", model_path=url)).status_code == 202
    detail = await wait_status(client, "html", "failed")
    assert "weights.bin is not a GGUF file" in detail["error_message"]
    assert Path(detail["local_path"]).exists()
    assert_error(await client.get("/v1/models/html"), 404, "not_found_error",
                 param="model_id", code="model_not_found")


async def test_a_gguf_name_without_the_magic_is_rejected_by_the_download_itself(
    client: Any, origin: Origin
) -> None:
    url = origin.add_file("fake.gguf", b"PK\x03\x04 a zip file" * 20)
    assert (await add(client, model_id="fake", model_path=url)).status_code == 202
    detail = await wait_status(client, "fake", "failed")
    assert "not a valid GGUF model" in detail["error_message"]


async def test_a_damaged_gguf_header_fails_at_engine_creation_and_the_file_stays(
    client: Any, origin: Origin
) -> None:
    url = origin.add_file("damaged.gguf", corrupt_gguf_bytes())
    assert (await add(client, model_id="damaged", model_path=url)).status_code == 202
    assert await statuses_until_done(client, "damaged") == [
        "downloading", "creating_engine", "failed"]
    detail = (await client.get("/v1/downloads/damaged")).json()
    assert "has a GGUF magic but its header is unreadable" in detail["error_message"]
    assert Path(detail["local_path"]).read_bytes() == corrupt_gguf_bytes()


async def test_posting_the_same_url_again_reports_the_download_in_progress(
    client: Any, origin: Origin
) -> None:
    origin.faults.throttle_bps = 20_000
    url = origin.add_file("slow.gguf", b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 200_000)
    assert (await add(client, model_id="slow", model_path=url)).status_code == 202
    again = await add(client, model_id="slow", model_path=url)
    assert again.status_code == 202
    assert again.json()["message"].startswith("Model download already in progress")
    listed = (await client.get("/v1/models")).json()["models"]
    assert [(m["model_id"], m["available"]) for m in listed] == [("slow", False)]
    other = await add(client, model_id="slow", model_path=url + "?v=2")
    assert_error(other, 409, "invalid_request_error", param="model_id", code="download_exists")


async def test_delete_during_the_startup_download_cancels_it(client: Any, origin: Origin) -> None:
    origin.faults.throttle_bps = 20_000
    url = origin.add_file("gone.gguf", b"GGUF" + b"\x00" * 200_000)
    assert (await add(client, model_id="gone", model_path=url)).status_code == 202
    assert (await client.get("/v1/models/gone")).json()["status"] in ("queued", "downloading")
    removed = await client.delete("/v1/models/gone")
    assert removed.status_code == 200
    assert (await client.get("/v1/downloads/gone")).json()["status"] == "cancelled"
    assert_error(await client.get("/v1/models/gone"), 404, "not_found_error",
                 param="model_id", code="model_not_found")


# --- a local path: the engine now -------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_a_local_path_loads_at_once_and_answers_on_both_prefixes(
    llama_cpp: Any, client: Any, gguf: dict[str, Path], prefix: str
) -> None:
    response = await add(client, prefix, model_id="local", model_path=str(gguf["llm"]),
                         loading_parameters={"n_ctx": 256, "n_keep": 16, "warmup": False})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "loaded" and body["model_type"] == "llm"
    assert body["message"] == "Engine added successfully"
    assert body["inference_engine"] == "llama-cpp"
    details = body["details"]
    assert details["architecture"] == "llama" and details["quantization"] == "F16"
    assert details["context_length"] == 256 and details["n_ctx"] == 256
    assert details["load_seconds"] < 30
    completion = await client.post(f"{prefix}/completions",
                                   json={"model": "local", "prompt": ["a", "b"], "max_tokens": 3})
    assert [c["index"] for c in completion.json()["choices"]] == [0, 1]
    assert (await client.get(f"{prefix}/models/local")).json()["status"] == "loaded"


async def test_load_immediately_false_registers_then_loads_on_first_use(
    llama_cpp: Any, client: Any, gguf: dict[str, Path]
) -> None:
    response = await add(client, model_id="lazy", model_path=str(gguf["embedding"]),
                         load_immediately=False)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "created"
    assert response.json()["model_type"] == "embedding"  # from the metadata
    model = (await client.get("/v1/models/lazy")).json()
    assert model["status"] == "unloaded" and model["available"] is True
    assert model["details"]["load_seconds"] is None
    embedded = await client.post("/v1/embeddings", json={
        "model": "lazy", "input": ["one", "two"], "encoding_format": "base64"})
    assert embedded.status_code == 200, embedded.text
    first = base64.b64decode(embedded.json()["data"][0]["embedding"])
    assert len(struct.unpack(f"<{EMBEDDING_LENGTH}f", first)) == EMBEDDING_LENGTH
    assert len(embedded.json()["data"]) == 2
    assert (await client.get("/v1/models/lazy")).json()["status"] == "loaded"


async def test_delete_unloads_and_frees_the_engine(
    llama_cpp: Any, client: Any, gguf: dict[str, Path]
) -> None:
    assert (await add(client, model_id="freed", model_path=str(gguf["llm"]))).status_code == 201
    engine = client.kernel.engines.get("freed")
    assert engine.state == "loaded"
    removed = await client.delete("/v1/models/freed")
    assert removed.status_code == 200
    assert removed.json() == {"model_id": "freed", "status": "removed",
                              "message": "Model removed successfully"}
    assert engine.state == "unloaded" and "freed" not in client.kernel.engines.engines
    assert_error(await client.post("/v1/completions", json={"model": "freed", "prompt": "x"}),
                 404, "not_found_error", param="model", code="model_not_found")
    assert_error(await client.delete("/v1/models/freed"), 404, "not_found_error",
                 param="model_id", code="model_not_found")
    assert (await client.get("/v1/models")).json() == {
        "object": "list", "data": [], "models": [], "total_count": 0}


async def test_a_model_answers_only_its_own_kind_of_request(
    llama_cpp: Any, client: Any, gguf: dict[str, Path]
) -> None:
    await add(client, model_id="chat", model_path=str(gguf["llm"]), model_type="llm")
    await add(client, model_id="vecs", model_path=str(gguf["embedding"]))
    assert_error(await client.post("/v1/embeddings", json={"model": "chat", "input": "x"}),
                 400, "invalid_request_error", param="model")
    assert_error(await client.post("/v1/completions", json={"model": "vecs", "prompt": "x"}),
                 400, "invalid_request_error", param="model")
    again = await add(client, model_id="chat", model_path=str(gguf["llm"]))
    assert_error(again, 409, "invalid_request_error", param="model_id", code="model_exists")


async def test_main_gpu_minus_one_on_a_machine_without_gpus_uses_the_cpu(
    llama_cpp: Any, client: Any, gguf: dict[str, Path]
) -> None:
    client.kernel.engines.gpus = []
    response = await add(client, model_id="auto", model_path=str(gguf["llm"]), main_gpu_id=-1,
                         loading_parameters={"n_gpu_layers": 0})
    assert response.status_code == 201, response.text
    model = (await client.get("/v1/models/auto")).json()
    assert model["main_gpu_id"] == -1 and model["gpu_id"] == 0


async def test_config_models_with_local_paths_become_engines(
    llama_cpp: Any, tmp_path: Path, gguf: dict[str, Path]
) -> None:
    base = make_settings(tmp_path)
    settings = Settings(storage=base.storage, downloads=base.downloads, models=[
        ModelEntry(id="boot-embed", path=str(gguf["embedding"]), type="embedding",
                   load_immediately=False, inference_engine="llama-cpu"),
    ])
    async with AsyncTestClient(app=create_app(Kernel(settings, load_entrypoints=False))) as c:
        model = (await c.get("/v1/models/boot-embed")).json()
        assert model["status"] == "unloaded" and model["inference_engine"] == "llama-cpu"
        response = await c.post("/v1/embeddings", json={"model": "boot-embed", "input": "hi"})
        assert len(response.json()["data"][0]["embedding"]) == EMBEDDING_LENGTH


# --- validation and errors (no model is loaded) -----------------------------------------------


async def test_unknown_inference_engine_is_400(client: Any, origin: Origin) -> None:
    url = origin.add_file("e.gguf", b"GGUF")
    response = await add(client, model_id="e", model_path=url, inference_engine="vllm")
    error = assert_error(response, 400, "invalid_request_error", param="inference_engine")
    assert "llama-cpp" in error["message"]
    assert_error(await client.get("/v1/downloads/e"), 404, "not_found_error",
                 param="model_id", code="download_not_found")


@pytest.mark.parametrize("model_path", ["url", "local"])
async def test_unknown_main_gpu_id_is_400_at_create_time(
    client: Any, origin: Origin, gguf: dict[str, Path], model_path: str
) -> None:
    path = origin.add_file("g.gguf", b"GGUF") if model_path == "url" else str(gguf["llm"])
    response = await add(client, model_id="g", model_path=path, main_gpu_id=42)
    error = assert_error(response, 400, "invalid_request_error", param="main_gpu_id")
    assert error["message"].startswith("GPU 42 does not exist")
    assert "g" not in client.kernel.downloads.records


async def test_badly_typed_loading_parameters_are_400_naming_the_field(
    client: Any, gguf: dict[str, Path]
) -> None:
    response = await add(client, model_id="p", model_path=str(gguf["llm"]),
                         loading_parameters={"n_ctx": "4k"})
    assert_error(response, 400, "invalid_request_error", param="loading_parameters.n_ctx")


async def test_a_missing_local_path_is_400(client: Any, tmp_path: Path) -> None:
    response = await add(client, model_id="m", model_path=str(tmp_path / "nope.gguf"))
    assert_error(response, 400, "invalid_request_error", param="model_path",
                 code="model_path_not_found")


async def test_a_local_file_that_is_not_gguf_is_422(client: Any, tmp_path: Path) -> None:
    (tmp_path / "readme.gguf").write_text("hello")
    response = await add(client, model_id="m", model_path=str(tmp_path / "readme.gguf"))
    error = assert_error(response, 422, "invalid_request_error", param="model_path",
                         code="model_loading_failed")
    assert "is not a GGUF file" in error["message"]


async def test_bad_model_ids_and_unknown_fields_are_400(client: Any) -> None:
    assert_error(await add(client, model_id="../x", model_path="/tmp/x"), 400,
                 "invalid_request_error", param="model_id")
    assert_error(await add(client, model_id="x", model_path="/tmp/x", colour="red"), 400,
                 "invalid_request_error", param="colour")
    assert_error(await client.get("/v1/models/bad%20id"), 400, "invalid_request_error",
                 param="path", code="invalid_path_format")


@pytest.mark.parametrize("path", ["/v1/completions", "/completions"])
async def test_completions_for_an_unknown_model_are_404(client: Any, path: str) -> None:
    response = await client.post(path, json={"model": "ghost", "prompt": "hi"})
    assert_error(response, 404, "not_found_error", param="model", code="model_not_found",
                 message="Model not found: ghost")


async def test_embeddings_for_an_unknown_model_are_404(client: Any) -> None:
    response = await client.post("/v1/embeddings", json={"model": "ghost", "input": ["hi"]})
    assert_error(response, 404, "not_found_error", param="model", code="model_not_found")


async def test_bad_sampling_fields_and_empty_inputs_are_400(client: Any) -> None:
    for body, param in (
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "mixed"]}, "prompt"),
    ):
        request = {"model": "m", "prompt": "x", **body}
        assert_error(await client.post("/v1/completions", json=request), 400,
                     "invalid_request_error", param=param)
    assert_error(await client.post("/v1/chat/completions", json={"model": "m", "messages": []}),
                 400, "invalid_request_error", param="messages")
    assert_error(await client.post("/v1/embeddings", json={"model": "m", "input": [""]}),
                 400, "invalid_request_error", param="input")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/embeddings", {"input": "hi"}),
    ],
)
async def test_a_model_whose_download_is_running_is_409_saying_so(
    client: Any, origin: Origin, gguf: dict[str, Path], path: str, body: dict[str, Any]
) -> None:
    data = gguf["llm"].read_bytes()
    origin.faults.stall_after = len(data) // 2
    url = origin.add_file("slow-llama.gguf", data)
    assert (await add(client, model_id="slow", model_path=url)).status_code == 202
    await wait_status(client, "slow", "downloading")
    response = await client.post(path, json={"model": "slow", **body})
    assert_error(response, 409, "invalid_request_error", param="model", code="model_downloading")
    assert "Model slow is still downloading: its download is downloading" in (
        response.json()["error"]["message"]
    )
    await client.delete("/v1/models/slow")


async def test_a_regular_download_still_running_is_409_saying_how_to_serve_it(
    client: Any, origin: Origin, gguf: dict[str, Path]
) -> None:
    data = gguf["llm"].read_bytes()
    origin.faults.stall_after = len(data) // 2
    url = origin.add_file("plain-llama.gguf", data)
    created = await client.post("/v1/downloads", json={"model_id": "plain", "url": url})
    assert created.status_code == 202, created.text
    await wait_status(client, "plain", "downloading")
    response = await client.post("/v1/completions", json={"model": "plain", "prompt": "hi"})
    assert_error(response, 409, "invalid_request_error", param="model", code="model_downloading")
    assert "add the file with POST /v1/models" in response.json()["error"]["message"]
    await client.delete("/v1/downloads/plain")


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_engines_lists_the_llama_cpp_backend_as_default(client: Any, prefix: str) -> None:
    body = (await client.get(f"{prefix}/engines")).json()
    assert body["default_engine"] == "llama-cpp" and body["total_count"] == 1
    (engine,) = body["inference_engines"]
    assert engine["name"] == "llama-cpp" and engine["is_default"] is True
    assert engine["aliases"] == ["llama-cpu", "llama-cuda", "llama-vulkan"]
    assert isinstance(engine["available"], bool)
    assert body["gpus"] == [
        {"id": g.id, "name": g.name, "total_memory": g.total_memory, "free_memory": g.free_memory}
        for g in client.kernel.engines.gpus
    ]

"""The llama-cpp engine plugin: GGUF header reading, model-type inference, parameter mapping,
GPU discovery and selection, and (with llama-cpp-python installed) real loading, completion,
embedding, lazy loading and unloading of tiny models made by the tests."""

from __future__ import annotations

import asyncio
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

import plugins.engine_llamacpp as plugin
from kernel.engines import EngineRegistry
from kernel.errors import EngineError, InvalidRequest
from kernel.types import (
    ChatEngine,
    CheckingBackend,
    CountingEmbedder,
    CountingEngine,
    DescribedBackend,
    DescribedEngine,
    EngineSpec,
    GeneratingEngine,
    GpuInfo,
    LazyEngine,
)
from plugins.engine_llamacpp._gguf import infer_model_type, read_gguf
from plugins.engine_llamacpp._params import llama_kwargs
from plugins.engine_llamacpp.backend import NOT_INSTALLED, LlamaCppBackend, LlamaCppEngine
from tests.helpers.gguf_models import (
    CONTEXT_LENGTH,
    EMBEDDING_LENGTH,
    corrupt_gguf_bytes,
    write_tiny_model,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    corrupt = root / "corrupt.gguf"
    corrupt.write_bytes(corrupt_gguf_bytes())
    text = root / "notes.gguf"
    text.write_bytes(b"this is not a model\n" * 10)
    return {
        "llm": write_tiny_model(root / "tiny-llama.gguf"),
        "embedding": write_tiny_model(root / "tiny-embed.gguf", embedding=True),
        "corrupt": corrupt,
        "text": text,
    }


# --- the GGUF header --------------------------------------------------------------------------


def test_header_records_architecture_size_quantisation_and_context(models: dict[str, Path]) -> None:
    info = read_gguf(str(models["llm"]))
    assert info.architecture == "llama"
    assert info.name == "tiny-llama"
    assert info.quantization == "F16"
    assert info.context_length == CONTEXT_LENGTH
    assert info.embedding_length == EMBEDDING_LENGTH
    assert 100_000 < info.parameter_count < 200_000
    assert info.pooling_type is None and info.metadata_model_type() is None


def test_embedding_variant_is_an_embedding_model_by_its_metadata(models: dict[str, Path]) -> None:
    info = read_gguf(str(models["embedding"]))
    assert info.pooling_type == "mean" and info.causal_attention is False
    assert infer_model_type(info, None, "chat-model") == "embedding"  # metadata beats the name


def test_the_name_decides_only_when_the_metadata_is_silent(models: dict[str, Path]) -> None:
    info = read_gguf(str(models["llm"]))
    assert infer_model_type(info, None, "chat") == "llm"
    assert infer_model_type(info, None, "my-embedder") == "embedding"
    assert infer_model_type(info, "embedding", "chat") == "embedding"  # the request wins
    assert infer_model_type(read_gguf(str(models["embedding"])), "llm", "x") == "llm"


def test_encoder_only_architectures_are_embedding_models(models: dict[str, Path]) -> None:
    info = read_gguf(str(models["llm"]))
    info.architecture = "nomic-bert"
    assert infer_model_type(info, "auto", "anything") == "embedding"


def test_a_file_that_is_not_gguf_is_rejected_with_a_clear_reason(models: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match=r"notes.gguf is not a GGUF file .*b'this'"):
        read_gguf(str(models["text"]))


def test_a_damaged_header_is_rejected_with_the_reader_error(models: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match="has a GGUF magic but its header is unreadable"):
        read_gguf(str(models["corrupt"]))


# --- loading parameters -----------------------------------------------------------------------


def test_kolosal_parameters_map_onto_llama_cpp_and_unknown_ones_are_ignored() -> None:
    params = {
        "n_ctx": 512, "n_batch": 64, "n_ubatch": 32, "n_gpu_layers": 3, "use_mmap": False,
        "use_mlock": False, "n_keep": 10, "n_parallel": 4, "cont_batching": True, "warmup": False,
        "no_kv_offload": True, "cpuparams": {"n_threads": 2}, "some_future_knob": 1,
    }
    kwargs = llama_kwargs(params, main_gpu=1, embedding=True, context_length=256)
    assert kwargs["n_ctx"] == 512 and kwargs["n_batch"] == 64 and kwargs["n_ubatch"] == 32
    assert kwargs["n_gpu_layers"] == 3 and kwargs["use_mmap"] is False
    assert kwargs["main_gpu"] == 1 and kwargs["split_mode"] == 0  # the whole model on GPU 1
    assert kwargs["offload_kqv"] is False and kwargs["n_threads"] == 2
    assert kwargs["embedding"] is True and kwargs["verbose"] is False
    for ignored in ("n_keep", "n_parallel", "cont_batching", "warmup", "some_future_knob"):
        assert ignored not in kwargs


def test_defaults_follow_kolosal_capped_at_the_training_context() -> None:
    kwargs = llama_kwargs({}, main_gpu=0, embedding=False, context_length=256)
    assert kwargs["n_ctx"] == 256 and kwargs["n_gpu_layers"] == -1
    assert llama_kwargs({}, main_gpu=0, embedding=False, context_length=None)["n_ctx"] == 4096
    split = llama_kwargs({"tensor_split": [0.5, 0.5]}, main_gpu=0, embedding=False,
                         context_length=None)
    assert split["split_mode"] == 1 and split["tensor_split"] == [0.5, 0.5]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"n_ctx": "big"}, "loading_parameters.n_ctx"),
        ({"use_mmap": 1}, "loading_parameters.use_mmap"),
        ({"n_gpu_layers": True}, "loading_parameters.n_gpu_layers"),
        ({"tensor_split": "0.5,0.5"}, "loading_parameters.tensor_split"),
    ],
)
def test_a_badly_typed_parameter_is_rejected_naming_the_field(
    params: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        LlamaCppBackend().check(EngineSpec(loading_parameters=params), prefix="engine_creation.")
    assert caught.value.param == "engine_creation." + param


# --- GPUs -------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


def fake_pynvml(
    devices: list[tuple[str, int, int]], *, fail_init: bool = False
) -> types.ModuleType:
    """A stand-in for nvidia-ml-py with ``devices`` as (name, total, free)."""
    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]

    def init() -> None:
        if fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: devices[h][0]  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda h: f"GPU-{h:04d}-uuid"  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=devices[h][1], free=devices[h][2])
    return module


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``nvml(module)`` makes ``import pynvml`` give ``module`` (None: an ImportError)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(module: types.ModuleType | None) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", module)

    return install


def test_no_nvml_package_means_no_gpus(nvml: Any) -> None:
    nvml(None)  # import pynvml raises ImportError
    assert plugin.detect_gpus() == []


def test_an_nvml_failure_means_no_gpus(nvml: Any) -> None:
    nvml(fake_pynvml([("A100", 80, 70)], fail_init=True))
    assert plugin.detect_gpus() == []


def test_this_machine_reports_its_gpus_or_none_without_raising() -> None:
    gpus = plugin.detect_gpus()
    assert all(isinstance(g, GpuInfo) for g in gpus)


def test_nvml_gpus_are_reported_in_cuda_visible_devices_order(
    nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml(fake_pynvml([("L4", 24 << 30, 20 << 30), ("H100", 80 << 30, 79 << 30), ("T4", 16, 1)]))
    assert [(g.id, g.name) for g in plugin.detect_gpus()] == [(0, "L4"), (1, "H100"), (2, "T4")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-0001")
    assert [(g.id, g.name) for g in plugin.detect_gpus()] == [(0, "T4"), (1, "H100")]


def test_main_gpu_minus_one_picks_the_freest_gpu_or_the_cpu() -> None:
    gpus = [GpuInfo(id=0, name="a", total_memory=10, free_memory=2),
            GpuInfo(id=1, name="b", total_memory=10, free_memory=9)]
    assert EngineRegistry([], gpus).resolve_gpu(-1) == 1
    assert EngineRegistry([], []).resolve_gpu(-1) == 0
    fresh = EngineRegistry([], gpus, detect_gpus=lambda: gpus[:1])
    assert fresh.resolve_gpu(-1) == 0  # free memory is asked for again at create time
    with pytest.raises(InvalidRequest, match="GPU 5 does not exist; visible GPUs: 0"):
        fresh.check_gpu(5)


# --- the backend without llama-cpp-python -----------------------------------------------------


def test_the_backend_is_registered_with_kolosal_aliases() -> None:
    (backend,) = plugin.register_engine_backends(settings=None)  # type: ignore[arg-type]
    assert backend.name == "llama-cpp"
    assert backend.aliases == ("llama-cpu", "llama-cuda", "llama-vulkan")
    assert isinstance(backend, CheckingBackend)
    assert isinstance(backend, DescribedBackend)
    assert EngineRegistry([backend], []).backend("llama-cuda") is backend


async def test_create_without_llama_cpp_python_says_how_to_install_it(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(EngineError) as caught:
        await LlamaCppBackend().create("m", str(models["llm"]), "llm", EngineSpec())
    assert caught.value.message == NOT_INSTALLED


async def test_create_rejects_a_non_gguf_file_before_loading(models: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match="is not a GGUF file"):
        await LlamaCppBackend().create("m", str(models["text"]), "llm", EngineSpec())


async def test_a_directory_loads_its_first_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"No \.gguf model file found"):
        await LlamaCppBackend().create("m", str(tmp_path), "llm", EngineSpec())


# --- real engines (llama-cpp-python installed) ------------------------------------------------


@pytest.fixture
def llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp")


async def test_an_llm_loads_and_completes(llama_cpp: Any, models: dict[str, Path]) -> None:
    started = time.perf_counter()
    engine = await LlamaCppBackend().create("tiny", str(models["llm"]), "auto", EngineSpec())
    try:
        assert isinstance(engine, LlamaCppEngine)
        assert engine.model_type == "llm" and engine.state == "loaded"
        assert engine.load_seconds is not None and time.perf_counter() - started < 30
        result = await engine.complete_detailed("hello world", 8)
        assert isinstance(result["text"], str) and result["text"].strip()
        assert result["completion_tokens"] >= 1 and result["prompt_tokens"] >= 2
        with pytest.raises(InvalidRequest, match="needs an embedding model"):
            await engine.embed(["x"])
    finally:
        await engine.close()
    assert engine.state == "unloaded"
    with pytest.raises(EngineError, match="has been unloaded"):
        await engine.complete("hello", 2)


async def test_an_embedding_model_returns_one_unit_vector_per_input(
    llama_cpp: Any, models: dict[str, Path]
) -> None:
    engine = await LlamaCppBackend().create("emb", str(models["embedding"]), "auto", EngineSpec())
    try:
        assert engine.model_type == "embedding"
        vectors, tokens = await engine.embed_detailed(["hello world", "the model"])
        assert len(vectors) == 2 and tokens >= 4
        for vector in vectors:
            assert len(vector) == EMBEDDING_LENGTH
            assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)
        assert vectors[0] != vectors[1]
    finally:
        await engine.close()


async def test_load_immediately_false_loads_on_first_use_once(
    llama_cpp: Any, models: dict[str, Path]
) -> None:
    spec = EngineSpec(load_immediately=False, loading_parameters={"n_ctx": 128})
    engine = await LlamaCppBackend().create("lazy", str(models["llm"]), "llm", spec)
    try:
        # Every optional capability the registry uses is declared (kernel.types).
        for capability in (LazyEngine, DescribedEngine, GeneratingEngine, ChatEngine,
                           CountingEngine, CountingEmbedder):  # fmt: skip
            assert isinstance(engine, capability), capability
        assert engine.state == "unloaded" and engine.load_seconds is None
        texts = await asyncio.gather(*(engine.complete("hello", 4) for _ in range(3)))
        assert all(isinstance(t, str) for t in texts)
        assert engine.state == "loaded" and engine.kwargs["n_ctx"] == 128
    finally:
        await engine.close()


async def test_a_prompt_longer_than_the_context_is_a_bad_request(
    llama_cpp: Any, models: dict[str, Path]
) -> None:
    spec = EngineSpec(loading_parameters={"n_ctx": 32})
    engine = await LlamaCppBackend().create("short", str(models["llm"]), "llm", spec)
    try:
        with pytest.raises(InvalidRequest, match=r"The prompt is \d+ tokens; .* of 32") as caught:
            await engine.complete("hello " * 40, 16)
        assert caught.value.param == "prompt"
        result = await engine.complete_detailed("hello", 100)  # clipped at the context's end
        assert result["finish_reason"] == "length" and result["completion_tokens"] < 32
    finally:
        await engine.close()


async def test_closing_an_engine_never_loaded_is_a_no_op(models: dict[str, Path]) -> None:
    pytest.importorskip("llama_cpp")
    spec = EngineSpec(load_immediately=False)
    engine = await LlamaCppBackend().create("never", str(models["llm"]), "llm", spec)
    await engine.close()
    assert engine.state == "unloaded"

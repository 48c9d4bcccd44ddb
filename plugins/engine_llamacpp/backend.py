"""LlamaCppBackend builds LlamaCppEngines: GGUF models served by llama-cpp-python.

``create`` reads the GGUF header first (a file that is not GGUF fails here, with a reason the
user can act on), settles the model type, maps the loading parameters, and then loads the
model in a worker thread, or, with ``load_immediately: false``, leaves the load to the first
request. ``llama_cpp`` is imported only here, so the plugin imports without the extra.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from kernel.errors import EngineError, InvalidRequest
from kernel.types import EngineSpec
from plugins.engine_llamacpp._gguf import GgufInfo, find_model_file, infer_model_type, read_gguf
from plugins.engine_llamacpp._params import check_parameters, llama_kwargs

__all__ = ["LlamaCppBackend", "LlamaCppEngine"]

log = structlog.get_logger()

NOT_INSTALLED = "llama-cpp-python is not installed: pip install 'modelkernel[llamacpp]'"
POOLING_MEAN = 1


def import_llama_cpp() -> Any:
    """``llama_cpp``, or EngineError saying how to install it. CUDA devices are numbered in
    PCI bus order, the order NVML (and so ``detect_gpus`` and ``main_gpu_id``) uses."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise EngineError(NOT_INSTALLED) from exc


class LlamaCppBackend:
    name = "llama-cpp"
    aliases: tuple[str, ...] = ("llama-cpu", "llama-cuda", "llama-vulkan")
    description = "GGUF models on llama.cpp through llama-cpp-python (CPU, CUDA, Vulkan, Metal)"

    @property
    def available(self) -> bool:
        """Whether llama-cpp-python is installed (checked without importing it)."""
        return importlib.util.find_spec("llama_cpp") is not None

    @property
    def version(self) -> str | None:
        try:
            return importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            return None

    def check(self, spec: EngineSpec, *, prefix: str = "") -> None:
        """Reject bad ``loading_parameters`` when the request is made (InvalidRequest)."""
        check_parameters(spec.loading_parameters, prefix=prefix)

    async def create(
        self, model_id: str, path: str, model_type: str, spec: EngineSpec
    ) -> LlamaCppEngine:
        """``model_type`` is ``llm`` or ``embedding``, or anything else (``auto``) to infer it
        from the GGUF metadata, then from the file name."""
        file = await asyncio.to_thread(find_model_file, path)
        info = await asyncio.to_thread(read_gguf, file)  # a bad file fails before the import
        llama_cpp = await asyncio.to_thread(import_llama_cpp)
        kind = infer_model_type(info, model_type, model_id)
        params = spec.loading_parameters
        kwargs = llama_kwargs(
            params,
            main_gpu=spec.main_gpu_id,
            embedding=kind == "embedding",
            context_length=info.context_length,
        )
        if (
            kind == "embedding"
            and "pooling_type" not in params
            and info.pooling_type in (None, "none")
        ):
            kwargs["pooling_type"] = POOLING_MEAN  # one vector per input, not one per token
        engine = LlamaCppEngine(
            model_id,
            kind,
            info,
            _supported(llama_cpp.Llama, kwargs),
            llama_cpp.Llama,
            normalize=params.get("embd_normalize", 2) != -1,
        )
        log.info(
            "engine.registered",
            model_id=model_id,
            model_type=kind,
            path=file,
            architecture=info.architecture,
            quantization=info.quantization,
            parameters=info.parameter_count,
            load_immediately=spec.load_immediately,
        )
        if spec.load_immediately:
            await engine.load()
        return engine


def _supported(llama_cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop keywords this llama-cpp-python version does not take (logged, not fatal)."""
    accepted = inspect.signature(llama_cls.__init__).parameters
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:
        log.info("engine.parameters_unsupported", parameters=dropped)
    return {k: v for k, v in kwargs.items() if k in accepted}


class LlamaCppEngine:
    """One GGUF model. Loads on ``load()`` or on first use; one llama.cpp call at a time."""

    def __init__(
        self,
        model_id: str,
        model_type: str,
        info: GgufInfo,
        kwargs: dict[str, Any],
        llama_cls: Callable[..., Any],
        *,
        normalize: bool = True,
    ) -> None:
        self.model_id = model_id
        self.model_type = model_type
        self.info = info
        self.kwargs = kwargs
        self.normalize = normalize
        self.load_seconds: float | None = None
        self._llama_cls = llama_cls
        self._llama: Any = None
        self._load_task: asyncio.Future[Any] | None = None
        self._lock = asyncio.Lock()  # one loader at a time (lazy engines load on first use)
        self._use = threading.Lock()  # a llama.cpp context is not thread-safe
        self._closed = False

    @property
    def state(self) -> str:
        if self._llama is not None:
            return "loaded"
        if self._load_task is not None and not self._load_task.done():
            return "loading"
        return "unloaded"

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    @property
    def details(self) -> dict[str, Any]:
        """What ``GET /v1/models/{id}`` shows: the GGUF facts and how it was loaded."""
        facts: dict[str, Any] = msgspec.to_builtins(self.info)
        facts["n_ctx"] = self.kwargs.get("n_ctx")
        facts["n_gpu_layers"] = self.kwargs.get("n_gpu_layers")
        facts["main_gpu"] = self.kwargs.get("main_gpu")
        facts["load_seconds"] = self.load_seconds
        return facts

    async def load(self) -> Any:
        """Load the model now (in a worker thread) unless it is loaded; returns the Llama.
        A cancelled caller does not cancel the load: the next caller gets its result."""
        async with self._lock:
            if self._closed:
                raise EngineError(f"Model {self.model_id} has been unloaded.")
            if self._llama is None:
                if self._load_task is None:
                    self._load_task = asyncio.ensure_future(asyncio.to_thread(self._construct))
                try:
                    self._llama = await asyncio.shield(self._load_task)
                except EngineError:
                    self._load_task = None
                    raise
            return self._llama

    def _construct(self) -> Any:
        started = time.perf_counter()
        try:
            llama = self._llama_cls(model_path=self.info.path, **self.kwargs)
        except Exception as exc:  # llama-cpp-python reports failures as assorted errors
            raise EngineError(
                f"llama.cpp could not load {os.path.basename(self.info.path)}: {exc}"
            ) from exc
        self.load_seconds = round(time.perf_counter() - started, 4)
        log.info("engine.loaded", model_id=self.model_id, seconds=self.load_seconds)
        return llama

    def _call(self, method: str, *args: Any) -> Any:
        """Run ``_<method>_sync`` in this worker thread, never two at once nor after close."""
        with self._use:
            if self._closed or self._llama is None:
                raise EngineError(f"Model {self.model_id} has been unloaded.")
            return getattr(self, f"_{method}_sync")(self._llama, *args)

    def _complete_sync(self, llama: Any, prompt: str, max_tokens: int) -> Any:
        n_prompt = len(llama.tokenize(prompt.encode("utf-8"), add_bos=True))
        # llama.cpp may pad the context (to 256); llama-cpp-python's buffers keep the size
        # asked for, so the smaller of the two is what fits.
        n_ctx = min(int(llama.n_ctx()), int(getattr(llama.context_params, "n_ctx", 0)) or 1 << 30)
        if n_prompt >= n_ctx:
            raise InvalidRequest(
                f"The prompt is {n_prompt} tokens; model {self.model_id} has a context of "
                f"{n_ctx} tokens (loading_parameters.n_ctx).",
                param="prompt",
            )
        # Stop one token short of the context's end (llama-cpp-python 0.3 fails on the very
        # last slot); a clipped completion ends with finish_reason "length".
        max_tokens = min(max_tokens, n_ctx - n_prompt - 1)
        return llama.create_completion(prompt=prompt, max_tokens=max_tokens)

    def _embed_sync(self, llama: Any, texts: list[str]) -> Any:
        return llama.embed(texts, normalize=self.normalize, truncate=True, return_count=True)

    def _require(self, kind: str, endpoint: str) -> None:
        if self.model_type != kind:
            raise InvalidRequest(
                f"Model {self.model_id} is an {self.model_type} model; {endpoint} needs an "
                f"{kind} model.",
                param="model",
            )

    async def complete_detailed(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """``{text, finish_reason, prompt_tokens, completion_tokens}`` for one prompt."""
        self._require("llm", "/v1/completions")
        await self.load()
        result = await asyncio.to_thread(self._call, "complete", prompt, max_tokens)
        choice = result["choices"][0]
        usage = result.get("usage") or {}
        return {
            "text": choice["text"],
            "finish_reason": choice.get("finish_reason") or "stop",
            "prompt_tokens": int(usage.get("prompt_tokens", 0)),
            "completion_tokens": int(usage.get("completion_tokens", 0)),
        }

    async def complete(self, prompt: str, max_tokens: int) -> str:
        return str((await self.complete_detailed(prompt, max_tokens))["text"])

    async def embed_detailed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One vector per text (mean-pooled if the model gives one per token) and the number
        of prompt tokens."""
        self._require("embedding", "/v1/embeddings")
        await self.load()
        vectors, tokens = await asyncio.to_thread(self._call, "embed", texts)
        return [_pooled(v, self.normalize) for v in vectors], int(tokens)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return (await self.embed_detailed(texts))[0]

    async def close(self) -> None:
        """Free the model (after any load or call in flight); later calls fail cleanly."""
        self._closed = True
        task = self._load_task
        if task is not None and not task.done():
            await asyncio.wait({task})
        llama = self._llama
        if llama is None and task is not None and task.done() and not task.cancelled():
            llama = task.result() if task.exception() is None else None
        self._llama = None
        if llama is not None:
            await asyncio.to_thread(self._free, llama)
            log.info("engine.unloaded", model_id=self.model_id)

    def _free(self, llama: Any) -> None:
        with self._use:
            close = getattr(llama, "close", None)
            if close is not None:
                close()


def _pooled(vector: list[Any], normalize: bool) -> list[float]:
    """A per-token embedding (a list of vectors) mean-pooled into one vector."""
    if not vector or not isinstance(vector[0], list):
        return [float(x) for x in vector]
    width = len(vector[0])
    mean = [sum(tok[i] for tok in vector) / len(vector) for i in range(width)]
    if normalize:
        norm = math.sqrt(sum(x * x for x in mean)) or 1.0
        mean = [x / norm for x in mean]
    return mean

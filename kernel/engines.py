"""EngineRegistry: engine backends from all plugins, and the engines built with them.

A backend (returned by the ``register_engine_backends`` hook) turns a model file into an
:class:`~kernel.types.Engine`. The registry picks the backend by ``inference_engine`` name or
alias, settles ``main_gpu_id`` (``-1``: the visible GPU with the most free memory, or 0 when
there is none), keeps one engine per model id, and routes completions and embeddings to it.

Beyond the ``EngineBackend`` / ``Engine`` protocols, a backend or engine may declare the
optional capabilities of :mod:`kernel.types` (checked with isinstance, nothing else):
``CheckingBackend`` (reject bad ``loading_parameters`` at request time), ``VerifyingBackend``
(check downloaded files: :meth:`EngineRegistry.verifier`), ``ModelFileBackend`` (which file
of a set to load, asked through :meth:`EngineRegistry.loader`), ``DescribedBackend``
(description, version, availability for ``GET /v1/engines``), ``LazyEngine`` (``state``),
``DescribedEngine`` (``details``), ``CountingEngine`` / ``CountingEmbedder`` (token counts for
the OpenAI ``usage`` block), ``GeneratingEngine`` (streamed completions honouring
:class:`~kernel.types.Sampling`) and ``ChatEngine`` (chat completions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import msgspec
import structlog

from kernel.errors import EngineError, InvalidRequest
from kernel.types import (
    ChatEngine,
    CheckingBackend,
    CountingEmbedder,
    CountingEngine,
    DescribedEngine,
    Engine,
    EngineBackend,
    EngineCreated,
    EngineSpec,
    Event,
    GeneratingEngine,
    GpuInfo,
    LazyEngine,
    Piece,
    Sampling,
    VerifyingBackend,
)

__all__ = ["AUTO_TYPE", "Completion", "EngineEntry", "EngineRegistry"]

log = structlog.get_logger()

AUTO_TYPE = "auto"  # model_type that asks the backend to infer it from the model file


class EngineEntry(msgspec.Struct, kw_only=True):
    """How one registered engine was made."""

    model_id: str
    path: str
    model_type: str
    inference_engine: str  # as requested (may be an alias)
    backend: str  # the backend's own name
    main_gpu_id: int  # as requested
    gpu_id: int  # as used: -1 resolved to a GPU id
    load_immediately: bool
    loading_parameters: dict[str, Any]
    created_at: int  # ms since the epoch


class Completion(msgspec.Struct, kw_only=True):
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EngineRegistry:
    def __init__(
        self,
        backends: list[EngineBackend],
        gpus: list[GpuInfo],
        *,
        detect_gpus: Callable[[], list[GpuInfo]] | None = None,
        publish: Callable[[Event], object] | None = None,
    ) -> None:
        self._publish = publish  # the bus: engine.created for every engine built
        self._backends: dict[str, EngineBackend] = {}
        for backend in backends:
            for name in (backend.name, *backend.aliases):
                if name in self._backends:
                    raise RuntimeError(f"Two plugins provide the engine backend {name!r}.")
                self._backends[name] = backend
        self.backend_list = list(backends)
        self.gpus = gpus
        self._detect_gpus = detect_gpus
        self.engines: dict[str, Engine] = {}
        self.entries: dict[str, EngineEntry] = {}

    # --- backends and GPUs ----------------------------------------------------------------

    @property
    def default_backend(self) -> str | None:
        """The first backend the ``register_engine_backends`` hook offers (plugins order
        themselves with tryfirst/trylast), or None when no plugin offers one."""
        return self.backend_list[0].name if self.backend_list else None

    def backend(self, name: str, *, param: str = "inference_engine") -> EngineBackend:
        """The backend ``name`` (or alias) selects; ``""`` selects the default backend."""
        try:
            return self._backends[name or self.default_backend or ""]
        except KeyError:
            if not name:
                raise InvalidRequest(
                    "No inference engine is installed: add an engine plugin.", param=param
                ) from None
            known = ", ".join(sorted(self._backends)) or "none"
            raise InvalidRequest(
                f"Unknown inference engine {name!r}; available: {known}.", param=param
            ) from None

    def loader(self, spec: EngineSpec | None) -> EngineBackend | None:
        """The backend that will load a download's files: the one its ``engine_creation``
        names, else the default backend (None when there is none)."""
        name = spec.inference_engine if spec is not None else ""
        return self._backends.get(name or self.default_backend or "")

    def verifier(self, spec: EngineSpec | None) -> VerifyingBackend | None:
        """The loader, when it checks downloaded files."""
        backend = self.loader(spec)
        return backend if isinstance(backend, VerifyingBackend) else None

    def check_gpu(self, gpu_id: int, *, param: str = "main_gpu_id") -> None:
        """-1 (pick the freest) and 0 (the default device, or the CPU) are always valid."""
        if gpu_id in (-1, 0) or any(g.id == gpu_id for g in self.gpus):
            return
        visible = ", ".join(str(g.id) for g in self.gpus) or "none"
        raise InvalidRequest(f"GPU {gpu_id} does not exist; visible GPUs: {visible}.", param=param)

    def refresh_gpus(self) -> list[GpuInfo]:
        """Ask the plugins again (free memory changes); keeps the old list without a detector."""
        if self._detect_gpus is not None:
            self.gpus = self._detect_gpus()
        return self.gpus

    def resolve_gpu(self, gpu_id: int) -> int:
        """``-1``: the GPU with the most free memory right now, or 0 (CPU) when there is none."""
        if gpu_id != -1:
            return gpu_id
        gpus = self.refresh_gpus()
        if not gpus:
            return 0
        return max(gpus, key=lambda g: (g.free_memory, -g.id)).id

    def validate(self, spec: EngineSpec, *, prefix: str = "engine_creation.") -> EngineSpec:
        """Check ``spec`` (InvalidRequest naming the field); returns it with the engine named:
        no ``inference_engine`` means the default backend, wherever the spec comes from."""
        backend = self.backend(spec.inference_engine, param=prefix + "inference_engine")
        self.check_gpu(spec.main_gpu_id, param=prefix + "main_gpu_id")
        if isinstance(backend, CheckingBackend):
            backend.check(spec, prefix=prefix)
        if spec.inference_engine:
            return spec
        return msgspec.structs.replace(spec, inference_engine=backend.name)

    # --- engines ----------------------------------------------------------------------------

    async def create(self, model_id: str, path: str, model_type: str, spec: EngineSpec) -> Engine:
        """Build an engine: the one way every caller (a startup download, POST /v1/models, a
        config ``models:`` entry) creates one; publishes ``engine.created``. With
        ``spec.infer_model_type`` the backend reads the type from the file, whatever type the
        caller passes. If the caller is cancelled meanwhile, the engine is closed when the
        backend finishes, so an abandoned engine never leaks."""
        backend = self.backend(spec.inference_engine)
        if spec.infer_model_type:
            model_type = AUTO_TYPE
        started = time.monotonic()
        gpu_id = self.resolve_gpu(spec.main_gpu_id)
        used = msgspec.structs.replace(spec, main_gpu_id=gpu_id)
        job = asyncio.ensure_future(backend.create(model_id, path, model_type, used))
        try:
            engine = await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(_close_abandoned)
            raise
        except (EngineError, InvalidRequest):
            raise
        except Exception as exc:
            raise EngineError(f"Engine creation failed: {exc}") from exc
        old = self.engines.pop(model_id, None)
        if old is not None:
            await old.close()
        self.engines[model_id] = engine
        self.entries[model_id] = EngineEntry(
            model_id=model_id,
            path=path,
            model_type=engine.model_type,
            inference_engine=spec.inference_engine or backend.name,
            backend=backend.name,
            main_gpu_id=spec.main_gpu_id,
            gpu_id=gpu_id,
            load_immediately=spec.load_immediately,
            loading_parameters=dict(spec.loading_parameters),
            created_at=int(time.time() * 1000),
        )
        seconds = time.monotonic() - started
        log.info("engine.created", model_id=model_id, seconds=round(seconds, 3))
        if self._publish is not None:
            name = spec.inference_engine or backend.name
            self._publish(EngineCreated(model_id, engine.model_type, name, seconds=seconds))
        return engine

    def get(self, model_id: str) -> Engine | None:
        return self.engines.get(model_id)

    def state(self, model_id: str) -> str:
        """``loaded``, ``loading`` or ``unloaded`` (registered, loads on first use)."""
        engine = self.engines[model_id]
        return engine.state if isinstance(engine, LazyEngine) else "loaded"

    def details(self, model_id: str) -> dict[str, Any] | None:
        engine = self.engines[model_id]
        details = engine.details if isinstance(engine, DescribedEngine) else None
        return dict(details) if details else None

    def supports_chat(self, model_id: str) -> bool | None:
        """Whether chat completions work for the model; None when it has no engine (yet)."""
        engine = self.engines.get(model_id)
        if engine is None:
            return None
        return (
            engine.model_type == "llm" and isinstance(engine, ChatEngine) and engine.supports_chat
        )

    def registered(self) -> list[EngineEntry]:
        """Every engine's entry, in creation order."""
        return [self.entries[m] for m in self.engines if m in self.entries]

    async def remove(self, model_id: str) -> bool:
        self.entries.pop(model_id, None)
        engine = self.engines.pop(model_id, None)
        if engine is None:
            return False
        await engine.close()
        log.info("engine.removed", model_id=model_id)
        return True

    async def close(self) -> None:
        for model_id in list(self.engines):
            await self.remove(model_id)

    # --- inference --------------------------------------------------------------------------

    def _engine_of(self, model_id: str, kind: str, endpoint: str) -> Engine:
        engine = self.engines.get(model_id)
        if engine is None:
            raise InvalidRequest(f"Model not found: {model_id}", param="model")
        if engine.model_type not in (kind, AUTO_TYPE):
            raise InvalidRequest(
                f"Model {model_id} is an {engine.model_type} model; {endpoint} needs an "
                f"{kind} model.",
                param="model",
            )
        return engine

    async def complete(self, model_id: str, prompt: str, max_tokens: int) -> Completion:
        engine = self._engine_of(model_id, "llm", "/v1/completions")
        if not isinstance(engine, CountingEngine):
            text = await engine.complete(prompt, max_tokens)
            return Completion(text=text, finish_reason="length")
        return msgspec.convert(await engine.complete_detailed(prompt, max_tokens), Completion)

    async def generate(
        self, model_id: str, prompt: str | list[int], sampling: Sampling
    ) -> AsyncGenerator[Piece, None]:
        """The engine's pieces for ``prompt``; an engine without ``generate`` answers in one
        piece from ``complete`` (its own sampling; a text prompt only)."""
        engine = self._engine_of(model_id, "llm", "/v1/completions")
        if isinstance(engine, GeneratingEngine):
            async with _closing_pieces(engine.generate(prompt, sampling)) as pieces:
                async for piece in pieces:
                    yield piece
            return
        if not isinstance(prompt, str):
            raise InvalidRequest(
                f"Model {model_id}'s engine takes text prompts only.", param="prompt"
            )
        result = await self.complete(model_id, prompt, sampling.max_tokens or 16)
        yield Piece(text=result.text)
        yield Piece(
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )

    async def chat(
        self, model_id: str, messages: list[dict[str, Any]], sampling: Sampling
    ) -> AsyncGenerator[Piece, None]:
        """The engine's pieces answering ``messages`` (InvalidRequest when it cannot chat)."""
        engine = self._engine_of(model_id, "llm", "/v1/chat/completions")
        if not isinstance(engine, ChatEngine):
            raise InvalidRequest(
                f"Model {model_id}'s engine does not support chat completions; use "
                "/v1/completions.",
                param="model",
            )
        async with _closing_pieces(engine.chat(messages, sampling)) as pieces:
            async for piece in pieces:
                yield piece

    async def embed(
        self, model_id: str, texts: list[str] | list[list[int]]
    ) -> tuple[list[list[float]], int]:
        """One vector per text (or list of token ids), and the prompt token count (0 when the
        engine does not say)."""
        engine = self._engine_of(model_id, "embedding", "/v1/embeddings")
        if not isinstance(engine, CountingEmbedder):
            if not all(isinstance(t, str) for t in texts):
                raise InvalidRequest(
                    f"Model {model_id}'s engine takes text input only.", param="input"
                )
            return await engine.embed(texts), 0  # type: ignore[arg-type]
        vectors, tokens = await engine.embed_detailed(texts)
        return vectors, int(tokens)


_closing: set[asyncio.Future[None]] = set()  # strong references until each close ends


def _close_abandoned(job: asyncio.Future[Engine]) -> None:
    if job.cancelled() or job.exception() is not None:
        return
    closing = asyncio.ensure_future(job.result().close())
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


def _closing_pieces(pieces: AsyncIterator[Piece]) -> contextlib.AbstractAsyncContextManager[Any]:
    """Close an engine's piece generator when the caller stops reading (a client left)."""
    if isinstance(pieces, AsyncGenerator):
        return contextlib.aclosing(pieces)
    return contextlib.nullcontext(pieces)

"""EngineRegistry: engine backends from all plugins, and the engines built with them."""

from __future__ import annotations

import asyncio

import structlog

from kernel.errors import EngineError, InvalidRequest
from kernel.types import Engine, EngineBackend, EngineSpec, GpuInfo

__all__ = ["EngineRegistry"]

log = structlog.get_logger()


class EngineRegistry:
    def __init__(self, backends: list[EngineBackend], gpus: list[GpuInfo]) -> None:
        self._backends: dict[str, EngineBackend] = {}
        for backend in backends:
            for name in (backend.name, *getattr(backend, "aliases", ())):
                if name in self._backends:
                    raise RuntimeError(f"Two plugins provide the engine backend {name!r}.")
                self._backends[name] = backend
        self.backend_list = list(backends)
        self.gpus = gpus
        self.engines: dict[str, Engine] = {}

    def backend(self, name: str, *, param: str = "inference_engine") -> EngineBackend:
        try:
            return self._backends[name]
        except KeyError:
            known = ", ".join(sorted(self._backends)) or "none (install modelkernel[llamacpp])"
            raise InvalidRequest(
                f"Unknown inference engine {name!r}; available: {known}.", param=param
            ) from None

    def check_gpu(self, gpu_id: int, *, param: str = "main_gpu_id") -> None:
        """-1 (pick the freest) and 0 (the default device, or the CPU) are always valid."""
        if gpu_id in (-1, 0) or any(g.id == gpu_id for g in self.gpus):
            return
        visible = ", ".join(str(g.id) for g in self.gpus) or "none"
        raise InvalidRequest(f"GPU {gpu_id} does not exist; visible GPUs: {visible}.", param=param)

    def validate(self, spec: EngineSpec, *, prefix: str = "engine_creation.") -> None:
        self.backend(spec.inference_engine, param=prefix + "inference_engine")
        self.check_gpu(spec.main_gpu_id, param=prefix + "main_gpu_id")

    async def create(self, model_id: str, path: str, model_type: str, spec: EngineSpec) -> Engine:
        """Build an engine; if the caller is cancelled meanwhile, the engine is closed when the
        backend finishes, so an abandoned engine never leaks."""
        backend = self.backend(spec.inference_engine)
        job = asyncio.ensure_future(backend.create(model_id, path, model_type, spec))
        try:
            engine = await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(_close_abandoned)
            raise
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"Engine creation failed: {exc}") from exc
        old = self.engines.pop(model_id, None)
        if old is not None:
            await old.close()
        self.engines[model_id] = engine
        return engine

    async def remove(self, model_id: str) -> bool:
        engine = self.engines.pop(model_id, None)
        if engine is None:
            return False
        await engine.close()
        return True

    async def close(self) -> None:
        for model_id in list(self.engines):
            await self.remove(model_id)


def _close_abandoned(job: asyncio.Future[Engine]) -> None:
    if job.cancelled() or job.exception() is not None:
        return
    asyncio.ensure_future(job.result().close())

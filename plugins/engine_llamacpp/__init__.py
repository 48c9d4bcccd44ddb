"""engine_llamacpp: the ``llama-cpp`` inference engine backend and NVIDIA GPU discovery.

Adds the backend ``llama-cpp`` (Kolosal's ``llama-cpu``, ``llama-cuda`` and ``llama-vulkan``
are aliases) that serves GGUF models with llama-cpp-python, installed with the extra
``pip install 'modelkernel[llamacpp]'``; without it the plugin still loads and engine creation
fails with that hint. GPUs are discovered with NVML (``nvidia-ml-py``) when it is present.
Reads no settings; each engine's ``loading_parameters`` and ``main_gpu_id`` come with its
request. See docs/engines.md.
"""

from __future__ import annotations

from kernel import hookimpl
from kernel.config import Settings
from kernel.types import EngineBackend, GpuInfo
from plugins.engine_llamacpp._nvml import nvml_gpus
from plugins.engine_llamacpp.backend import LlamaCppBackend, LlamaCppEngine

__all__ = ["LlamaCppBackend", "LlamaCppEngine", "detect_gpus", "register_engine_backends"]


@hookimpl(tryfirst=True)  # offered first: the default engine, unless another plugin says so
def register_engine_backends(settings: Settings) -> list[EngineBackend]:
    return [LlamaCppBackend()]


@hookimpl
def detect_gpus() -> list[GpuInfo]:
    return nvml_gpus()

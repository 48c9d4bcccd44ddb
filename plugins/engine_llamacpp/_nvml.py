"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package), or none.

No package, no driver, no device, or any NVML error: an empty list, never an exception, so a
CPU-only machine starts cleanly. When ``CUDA_VISIBLE_DEVICES`` restricts the devices, only
those are reported, numbered as CUDA (and so llama.cpp) numbers them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import structlog

from kernel.types import GpuInfo

__all__ = ["nvml_gpus"]

log = structlog.get_logger()


def nvml_gpus() -> list[GpuInfo]:
    try:
        import pynvml  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        log.debug("gpu.nvml_unavailable", error=str(exc))
        return []
    try:
        devices = [_device(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except (pynvml.NVMLError, OSError) as exc:
        log.warning("gpu.nvml_failed", error=str(exc))
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    visible = _visible(devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return [
        GpuInfo(id=i, name=d["name"], total_memory=d["total"], free_memory=d["free"])
        for i, d in enumerate(visible)
    ]


def _device(pynvml: Any, index: int) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    name = pynvml.nvmlDeviceGetName(handle)
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
        "total": int(memory.total),
        "free": int(memory.free),
    }


def _visible(devices: list[dict[str, Any]], spec: str | None) -> list[dict[str, Any]]:
    """The devices CUDA_VISIBLE_DEVICES names, in its order (indices or UUID prefixes)."""
    if spec is None:
        return devices
    chosen: list[dict[str, Any]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            break
        if item.isdigit():
            match = [d for d in devices if d["index"] == int(item)]
        else:
            match = [d for d in devices if d["uuid"].startswith(item)]
        if not match:
            break  # CUDA stops at the first invalid entry
        chosen.append(match[0])
    return chosen

"""Models and engines: Kolosal's ``/models`` and ``/engines`` (``GET /models`` also in OpenAI's
list shape). The OpenAI inference endpoints live in :mod:`kernel.api.inference`.

``POST /v1/models`` with a URL ``model_path`` starts a ``startup`` download (202): the engine
is built once the file is verified. A local path builds the engine at once (201).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody
from msgspec import UNSET, UnsetType

from kernel.api.deps import KernelDep
from kernel.api.errors import error_responses
from kernel.core import Kernel
from kernel.engines import EngineEntry
from kernel.errors import (
    Conflict,
    DownloadExists,
    EngineError,
    InvalidRequest,
    ModelLoadingFailed,
    NotFound,
)
from kernel.types import TERMINAL, DescribedBackend, DownloadRecord, EngineSpec
from kernel.validation import redact_url, validate_model_id

__all__ = ["ModelsController"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class _Wire(msgspec.Struct, kw_only=True):
    pass


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


# --- /models ----------------------------------------------------------------------------------


class AddModelRequest(_Request):
    model_id: str
    model_path: str
    model_type: Literal["llm", "embedding"] | None = None  # None: read it from the model file
    inference_engine: str | None = None  # None: the default engine
    main_gpu_id: int = 0
    load_immediately: bool = True
    loading_parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ModelAdded(_Wire):
    """201: the engine exists (``loaded``, or ``created`` to load on first use)."""

    model_id: str
    model_path: str
    model_type: str
    status: str
    load_immediately: bool
    loading_parameters: dict[str, Any]
    main_gpu_id: int
    inference_engine: str
    message: str
    details: dict[str, Any] | UnsetType = UNSET


class ModelDownloadStarted(_Wire):
    """202: a startup download will build the engine."""

    model_id: str
    model_type: str
    status: str
    message: str
    download_url: str
    local_path: str


OWNED_BY = "modelkernel"


class OpenAIModel(_Wire):
    """OpenAI's model object."""

    id: str
    object: str = "model"
    created: int = 0  # seconds since the epoch
    owned_by: str = OWNED_BY


class ModelView(_Wire):
    # OpenAI's model object fields, beside Kolosal's
    id: str
    object: str
    created: int
    owned_by: str
    model_id: str
    status: str  # loaded | loading | unloaded, or the startup download's status
    available: bool  # an engine is registered and can answer
    model_type: str
    type: str  # the same, under the key Kolosal's model list uses
    inference_engine: str
    model_path: str
    main_gpu_id: int
    load_immediately: bool
    loading_parameters: dict[str, Any]
    message: str
    gpu_id: int | UnsetType = UNSET
    download_url: str | UnsetType = UNSET
    created_at: int | UnsetType = UNSET
    details: dict[str, Any] | UnsetType = UNSET


class ModelList(_Wire):
    """Kolosal's ``models``/``total_count`` and OpenAI's ``object``/``data`` in one body;
    ``data`` holds the models that can answer now (registered engines)."""

    object: str
    data: list[OpenAIModel]
    models: list[ModelView]
    total_count: int


class ModelRemoved(_Wire):
    model_id: str
    status: str
    message: str


# --- /engines ---------------------------------------------------------------------------------


class BackendView(_Wire):
    name: str
    aliases: list[str]
    description: str | None
    version: str | None
    available: bool
    is_default: bool


class GpuView(_Wire):
    id: int
    name: str
    total_memory: int
    free_memory: int


class EngineList(_Wire):
    inference_engines: list[BackendView]
    default_engine: str | None
    total_count: int
    gpus: list[GpuView]


# --- helpers ----------------------------------------------------------------------------------


def _path_id(model_id: str) -> str:
    validate_model_id(model_id, param="path", code="invalid_path_format")
    return model_id


def _not_found(model_id: str, param: str) -> NotFound:
    return NotFound(f"Model not found: {model_id}", param=param, code="model_not_found")


def _guess_type(model_id: str, url: str) -> str:
    """Kolosal's name heuristic, for the download record until the engine reads the file."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]).lower()
    return "embedding" if "embed" in name or "embed" in model_id.lower() else "llm"


def _active_startup(kernel: Kernel, model_id: str) -> DownloadRecord | None:
    rec = kernel.downloads.records.get(model_id)
    if rec is None or rec.status in TERMINAL or rec.download_type != "startup":
        return None
    return rec


def _engine_view(kernel: Kernel, entry: EngineEntry) -> ModelView:
    state = kernel.engines.state(entry.model_id)
    details = kernel.engines.details(entry.model_id)
    return ModelView(
        id=entry.model_id,
        object="model",
        created=entry.created_at // 1000,
        owned_by=OWNED_BY,
        model_id=entry.model_id,
        status=state,
        available=True,
        model_type=entry.model_type,
        type=entry.model_type,
        inference_engine=entry.inference_engine,
        model_path=entry.path,
        main_gpu_id=entry.main_gpu_id,
        load_immediately=entry.load_immediately,
        loading_parameters=entry.loading_parameters,
        message="Model is loaded and ready"
        if state == "loaded"
        else "Model is loading"
        if state == "loading"
        else "Model exists but is currently unloaded; it loads on first use",
        gpu_id=entry.gpu_id,
        created_at=entry.created_at,
        details=details if details is not None else UNSET,
    )


def _download_view(rec: DownloadRecord) -> ModelView:
    spec = rec.engine or EngineSpec()
    return ModelView(
        id=rec.model_id,
        object="model",
        created=rec.created_at // 1000,
        owned_by=OWNED_BY,
        model_id=rec.model_id,
        status=rec.status,
        available=False,
        model_type=rec.model_type,
        type=rec.model_type,
        inference_engine=spec.inference_engine,
        model_path=rec.local_path,
        main_gpu_id=spec.main_gpu_id,
        load_immediately=spec.load_immediately,
        loading_parameters=spec.loading_parameters,
        message=f"The model's startup download is {rec.status}; see /v1/downloads/{rec.model_id}",
        download_url=redact_url(rec.url),
    )


async def _start_download(kernel: Kernel, body: AddModelRequest, spec: EngineSpec) -> Response[Any]:
    url = body.model_path
    existing = kernel.downloads.records.get(body.model_id)
    if existing is not None and existing.status not in TERMINAL and existing.url == url:
        return Response(
            ModelDownloadStarted(
                model_id=body.model_id,
                model_type=existing.model_type,
                status=existing.status,
                message=f"Model download already in progress. Use /downloads/{body.model_id} to "
                "check status.",
                download_url=redact_url(url),
                local_path=existing.local_path,
            ),
            status_code=202,
        )
    model_type = body.model_type or _guess_type(body.model_id, url)
    rec = await kernel.downloads.create(
        model_id=body.model_id,
        url=url,
        model_type=model_type,  # type: ignore[arg-type]
        engine=msgspec.structs.replace(spec, infer_model_type=body.model_type is None),
    )
    return Response(
        ModelDownloadStarted(
            model_id=rec.model_id,
            model_type=rec.model_type,
            status="downloading",
            message="Download started in background",
            download_url=redact_url(url),
            local_path=rec.local_path,
        ),
        status_code=202,
    )


async def _create_local(kernel: Kernel, body: AddModelRequest, spec: EngineSpec) -> Response[Any]:
    path = await asyncio.to_thread(_existing_path, body.model_path)
    if path is None:
        raise InvalidRequest(
            f"Model path '{body.model_path}' does not exist. Please verify the path is correct.",
            param="model_path",
            code="model_path_not_found",
        )
    pending = kernel.downloads.records.get(body.model_id)
    if pending is not None and pending.status not in TERMINAL:
        raise DownloadExists(body.model_id, pending.status)
    spec = msgspec.structs.replace(spec, infer_model_type=body.model_type is None)
    try:  # the registry publishes engine.created
        engine = await kernel.engines.create(body.model_id, path, body.model_type or "llm", spec)
    except EngineError as exc:  # a file the request named: the request's fault
        raise ModelLoadingFailed(exc.message, param="model_path") from exc
    state = kernel.engines.state(body.model_id)
    details = kernel.engines.details(body.model_id)
    return Response(
        ModelAdded(
            model_id=body.model_id,
            model_path=path,
            model_type=engine.model_type,
            status="loaded" if state == "loaded" else "created",
            load_immediately=spec.load_immediately,
            loading_parameters=spec.loading_parameters,
            main_gpu_id=spec.main_gpu_id,
            inference_engine=spec.inference_engine,
            message="Engine added successfully",
            details=details if details is not None else UNSET,
        ),
        status_code=201,
    )


def _existing_path(path: str) -> str | None:
    """The absolute form of a local ``model_path``, or None when nothing is there."""
    full = os.path.abspath(os.path.expanduser(path))
    return full if os.path.exists(full) else None


# --- the controller ---------------------------------------------------------------------------


class ModelsController(Controller):
    """Mounted under ``/v1`` and ``/`` like the downloads controller."""

    path = "/"

    @post(
        "/models",
        status_code=201,
        tags=["models"],
        summary="Add a model: a URL starts a download (202), a local path loads now (201)",
        responses={
            202: ResponseSpec(
                ModelDownloadStarted,
                description="A startup download began",
                generate_examples=False,
            ),
            **error_responses(400, 409, 413, 422),
        },
    )
    async def add_model(
        self, data: JSONBody[dict[str, Any]], kernel: KernelDep
    ) -> Response[ModelAdded | ModelDownloadStarted]:
        body = msgspec.convert(data, AddModelRequest)  # a 400 names the offending field
        validate_model_id(body.model_id)
        spec = EngineSpec(
            load_immediately=body.load_immediately,
            main_gpu_id=body.main_gpu_id,
            inference_engine=body.inference_engine or "",
            loading_parameters=body.loading_parameters,
        )
        spec = kernel.engines.validate(spec, prefix="")
        if kernel.engines.get(body.model_id) is not None:
            raise Conflict(
                f"Model ID '{body.model_id}' is already registered; remove it first with "
                f"DELETE /v1/models/{body.model_id}.",
                param="model_id",
                code="model_exists",
            )
        if _URL.match(body.model_path):
            return await _start_download(kernel, body, spec)
        return await _create_local(kernel, body, spec)

    @get(
        "/models",
        tags=["models"],
        summary="Registered models and startup downloads under way",
        responses=error_responses(),
    )
    async def list_models(self, kernel: KernelDep) -> ModelList:
        views = [_engine_view(kernel, entry) for entry in kernel.engines.registered()]
        seen = {view.model_id for view in views}
        views += [
            _download_view(rec)
            for rec in kernel.downloads.list()
            if rec.download_type == "startup" and rec.model_id not in seen
        ]
        data = [OpenAIModel(id=v.model_id, created=v.created) for v in views if v.available]
        return ModelList(object="list", data=data, models=views, total_count=len(views))

    @get(
        "/models/{model_id:str}",
        tags=["models"],
        summary="One model",
        responses=error_responses(400, 404),
    )
    async def get_model(self, model_id: FromPath[str], kernel: KernelDep) -> ModelView:
        _path_id(model_id)
        entry = kernel.engines.entries.get(model_id)
        if entry is not None and kernel.engines.get(model_id) is not None:
            return _engine_view(kernel, entry)
        rec = _active_startup(kernel, model_id)
        if rec is None:
            raise _not_found(model_id, "model_id")
        return _download_view(rec)

    @delete(
        "/models/{model_id:str}",
        status_code=200,
        tags=["models"],
        summary="Unload and forget a model (cancelling its startup download if under way)",
        responses=error_responses(400, 404),
    )
    async def remove_model(self, model_id: FromPath[str], kernel: KernelDep) -> ModelRemoved:
        _path_id(model_id)
        cancelled = False
        if _active_startup(kernel, model_id) is not None:
            await kernel.downloads.cancel(model_id)
            cancelled = True
        if not await kernel.engines.remove(model_id) and not cancelled:
            raise _not_found(model_id, "model_id")
        return ModelRemoved(
            model_id=model_id, status="removed", message="Model removed successfully"
        )

    @get(
        "/engines",
        tags=["engines"],
        summary="Inference engine backends and visible GPUs",
        responses=error_responses(),
    )
    async def list_engines(self, kernel: KernelDep) -> EngineList:
        default = kernel.engines.default_backend
        backends = [
            BackendView(
                name=b.name,
                aliases=list(b.aliases),
                description=b.description if isinstance(b, DescribedBackend) else None,
                version=b.version if isinstance(b, DescribedBackend) else None,
                available=b.available if isinstance(b, DescribedBackend) else True,
                is_default=b.name == default,
            )
            for b in kernel.engines.backend_list
        ]
        gpus = [
            GpuView(id=g.id, name=g.name, total_memory=g.total_memory, free_memory=g.free_memory)
            for g in kernel.engines.gpus
        ]
        return EngineList(
            inference_engines=backends, default_engine=default, total_count=len(backends), gpus=gpus
        )

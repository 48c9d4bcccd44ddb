"""Operator endpoints: health, readiness, metrics, runtime settings."""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Annotated, Any, TypeAlias

from litestar import Controller, Response, delete, get, patch
from litestar.enums import RequestEncodingType
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Reference
from litestar.params import Body

from kernel import __version__
from kernel.api.deps import KernelDep
from kernel.api.errors import error_responses
from kernel.api.schemas import Health, Readiness, RuntimeSettings
from kernel.errors import InvalidRequest
from kernel.metrics import CONTENT_TYPE
from kernel.types import QuarantiningStore

__all__ = ["MIN_FREE_BYTES", "SettingsController", "SystemController"]

MIN_FREE_BYTES = 256 << 20  # readiness fails below this much free disk in models_dir

# The patch is merged by hand into the settings in force, so its schema is given here: any
# subset of the downloads section (every DownloadSettings field has a default, so a partial
# section is a valid DownloadSettings document).
SettingsPatch: TypeAlias = Annotated[
    dict[str, Any],
    Body(
        media_type=RequestEncodingType.JSON,
        description="Any subset of the downloads section; nested objects (retry) merge too",
        schema_extra={
            "properties": {"downloads": Reference("#/components/schemas/DownloadSettings")},
            "additional_properties": False,
        },
    ),
]


class SystemController(Controller):
    tags = ["system"]  # noqa: RUF012 - Litestar declares Controller.tags as a plain attribute

    @get("/health", summary="Liveness (no auth)")
    async def health(self) -> Health:
        return Health(status="ok", version=__version__)

    @get(
        "/health/ready",
        summary="Readiness: store, models_dir writable, free disk",
        responses={
            503: ResponseSpec(Readiness, description="Not ready: `checks` says what failed"),
            **error_responses(),
        },
    )
    async def ready(self, kernel: KernelDep) -> Response[Readiness]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(kernel.store.get_meta("readiness-probe"), timeout=2)
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any store failure means not ready
            checks["store"] = f"unreachable: {exc or type(exc).__name__}"
        models_dir = kernel.settings.storage.models_dir
        writable = await asyncio.to_thread(os.access, models_dir, os.W_OK)
        checks["models_dir"] = "ok" if writable else f"{models_dir} is not writable"
        free = (await asyncio.to_thread(shutil.disk_usage, models_dir)).free
        checks["disk"] = (
            "ok"
            if free >= MIN_FREE_BYTES
            else f"only {free} bytes free in {models_dir} (need {MIN_FREE_BYTES})"
        )
        ready = all(value == "ok" for value in checks.values())
        # Records the store could not read were set aside; the rest works, so this is
        # reported without taking the server out of service.
        store = kernel.store
        quarantined = store.quarantined if isinstance(store, QuarantiningStore) else []
        checks["records"] = (
            f"{len(quarantined)} unreadable record(s) quarantined: {'; '.join(quarantined[:5])}"
            if quarantined
            else "ok"
        )
        body = Readiness(status="ready" if ready else "not_ready", checks=checks)
        return Response(body, status_code=200 if ready else 503)

    @get(
        "/metrics",
        summary="Prometheus metrics",
        media_type=CONTENT_TYPE,
        responses=error_responses(),
    )
    async def metrics(self, kernel: KernelDep) -> Response[bytes]:
        downloads = kernel.downloads
        body = kernel.metrics.render(
            downloads.records.values(),
            downloads.running(),
            kernel.settings.downloads.max_bytes_per_second,
        )
        return Response(body, media_type=CONTENT_TYPE)


class SettingsController(Controller):
    path = "/settings"
    tags = ["settings"]  # noqa: RUF012 - Litestar declares Controller.tags as a plain attribute

    @get("/", summary="The downloads settings in force", responses=error_responses())
    async def get_settings(self, kernel: KernelDep) -> RuntimeSettings:
        return RuntimeSettings(downloads=kernel.settings.downloads)

    @patch(
        "/",
        status_code=200,
        summary="Change downloads settings at run time (persisted)",
        responses=error_responses(400, 413),
    )
    async def patch_settings(self, data: SettingsPatch, kernel: KernelDep) -> RuntimeSettings:
        unknown = set(data) - {"downloads"}
        if unknown:
            raise InvalidRequest(
                f"Only the downloads section can change at run time, not {sorted(unknown)[0]!r}.",
                param=sorted(unknown)[0],
            )
        section = data.get("downloads", {})
        if not isinstance(section, dict):
            raise InvalidRequest("downloads must be an object.", param="downloads")
        return RuntimeSettings(downloads=await kernel.update_download_settings(section))

    @delete(
        "/",
        status_code=200,
        summary="Forget run-time changes: back to the config file's values (persisted)",
        responses=error_responses(),
    )
    async def reset_settings(self, kernel: KernelDep) -> RuntimeSettings:
        return RuntimeSettings(downloads=await kernel.reset_download_settings())

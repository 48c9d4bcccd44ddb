"""The Litestar app factory: ``create_app(kernel)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import RedocRenderPlugin, SwaggerRenderPlugin

from kernel import __version__
from kernel.api.dashboard import dashboard_handlers
from kernel.api.downloads import DownloadsController
from kernel.api.edge import Edge
from kernel.api.errors import handle_error
from kernel.api.events import EVENTS_STATE_KEY, EventsController, EventStreams
from kernel.api.inference import InferenceController
from kernel.api.models import ModelsController
from kernel.api.system import SettingsController, SystemController
from kernel.core import Kernel
from kernel.downloads import DownloadManager

__all__ = ["App", "create_app"]


class App(Litestar):
    """Litestar with the edge (CORS, OPTIONS, API keys) in front of routing."""

    edge: Edge

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.edge(super().__call__, scope, receive, send)


def create_app(kernel: Kernel, *, manage_kernel: bool = True) -> App:
    """The app over ``kernel``. With ``manage_kernel`` the app's lifespan starts and stops it."""

    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        if manage_kernel:
            await kernel.start()
        try:
            yield
        finally:
            if manage_kernel:
                await kernel.stop()

    def provide_downloads() -> DownloadManager:
        return kernel.downloads

    def provide_kernel() -> Kernel:
        return kernel

    api = [
        DownloadsController,
        EventsController,
        SettingsController,
        ModelsController,
        InferenceController,
    ]
    app = App(
        route_handlers=[
            Router(path="/v1", route_handlers=api),
            Router(path="/", route_handlers=api),
            SystemController,
            *dashboard_handlers(),
            *kernel.plugins.routes(),
        ],
        state=State(
            {
                EVENTS_STATE_KEY: EventStreams(
                    kernel.bus,
                    queue_position=lambda model_id: kernel.downloads.queue_position(model_id),
                )
            }
        ),
        dependencies={
            "downloads": Provide(provide_downloads, sync_to_thread=False),
            "kernel": Provide(provide_kernel, sync_to_thread=False),
        },
        exception_handlers={Exception: handle_error},
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="modelkernel",
            version=__version__,
            path="/schema",
            render_plugins=[RedocRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
        logging_config=None,
        request_max_body_size=kernel.settings.auth.max_body_bytes,
    )
    app.edge = Edge(kernel.settings, kernel.metrics)
    return app

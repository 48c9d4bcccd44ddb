"""``GET /``: the web dashboard, plain static files from ``kernel/api/static/``.

The page needs no key to load (``/`` and ``/static/...`` are exempt in the edge); it asks for
the API key itself and sends it on every call. A strict Content-Security-Policy allows only
same-origin scripts, styles and connections, so no server string can ever run as code.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

__all__ = ["STATIC_DIR", "dashboard_handlers"]

STATIC_DIR = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@get("/", include_in_schema=False, media_type="text/html")
async def index() -> Response[bytes]:
    body = (STATIC_DIR / "index.html").read_bytes()
    return Response(body, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


def dashboard_handlers() -> list[ControllerRouterHandler]:
    static = create_static_files_router(
        path="/static",
        directories=[STATIC_DIR],
        include_in_schema=False,
        cache_control=CacheControlHeader(no_cache=True),
        name="dashboard-static",
    )
    return [index, static]

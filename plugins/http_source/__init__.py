"""http_source: fetches plain ``http://`` and ``https://`` URLs with httpx.

Reads ``downloads.stall_timeout_s`` (the read timeout: no byte for that long is a transient
fault). Redirects are followed; resumes use ``Range`` + ``If-Range``.
"""

from __future__ import annotations

from kernel import hookimpl
from kernel.config import Settings
from kernel.types import Source
from plugins.http_source.source import HttpSource

__all__ = ["HttpSource", "resolve_source"]


@hookimpl
def resolve_source(ref: str, settings: Settings) -> Source | None:
    if not ref.lower().startswith(("http://", "https://")):
        return None
    return HttpSource(ref, stall_timeout_s=settings.downloads.stall_timeout_s)

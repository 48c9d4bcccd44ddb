"""HTTP helpers shared by the source plugins: what an answer's status and headers mean.

Plugins may import this module (like ``kernel.errors`` and ``kernel.types``) instead of
importing each other: ``hf_source`` and ``http_source`` read validators, Retry-After and error
statuses the same way through it. The kernel itself never speaks HTTP to an origin.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Protocol

from kernel.errors import PermanentError, TransientError

__all__ = [
    "USER_AGENT",
    "check_status",
    "retry_after_seconds",
    "validator_of",
]

USER_AGENT = "modelkernel/0.1"


class _Answer(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


def validator_of(response: _Answer) -> str | None:
    """A strong ETag, else Last-Modified: what If-Range can use to pin the file."""
    etag = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("last-modified")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (delta or HTTP date); None when absent or unreadable."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check_status(status: int, headers: Mapping[str, str], url: str) -> None:
    """Map an HTTP error status to the typed source errors: 408, 429 and 5xx are transient
    (with the server's Retry-After), 401/403/404 and the other 4xx are permanent."""
    if status < 400:
        return
    if status in (408, 429) or status >= 500:
        raise TransientError(
            f"The server answered HTTP {status} for {url}.",
            retry_after=retry_after_seconds(headers),
            reason=f"http_{status}",
        )
    if status in (401, 403):
        raise PermanentError(
            f"Access denied (HTTP {status}) for {url}: the server requires credentials."
        )
    if status == 404:
        raise PermanentError(f"Not found (HTTP 404): {url}")
    raise PermanentError(f"The server refused the request with HTTP {status} for {url}.")

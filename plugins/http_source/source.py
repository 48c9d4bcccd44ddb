"""HttpSource: one remote file over HTTP(S), probed with HEAD and fetched with ranges."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import httpx

from kernel.errors import PermanentError, TransientError, ValidatorChanged
from kernel.types import Probe

__all__ = ["HttpBody", "HttpSource", "raise_for_status", "validator_of"]

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_USER_AGENT = "modelkernel/0.1"


def validator_of(response: httpx.Response) -> str | None:
    """A strong ETag, else Last-Modified: what If-Range can use to pin the file."""
    etag = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("last-modified")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.isdigit():
        return float(value)
    when = email.utils.parsedate_to_datetime(value) if value else None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def raise_for_status(response: httpx.Response, url: str) -> None:
    """Map an HTTP error status to the typed source errors."""
    status = response.status_code
    if status < 400:
        return
    if status in (408, 429) or status >= 500:
        raise TransientError(
            f"The server answered HTTP {status} for {url}.",
            retry_after=_retry_after(response),
            reason=f"http_{status}",
        )
    if status in (401, 403):
        raise PermanentError(
            f"Access denied (HTTP {status}) for {url}: the server requires credentials."
        )
    if status == 404:
        raise PermanentError(f"Not found (HTTP 404): {url}")
    raise PermanentError(f"The server refused the request with HTTP {status} for {url}.")


def _transport_error(exc: httpx.TransportError, url: str) -> TransientError:
    kind = type(exc).__name__
    if isinstance(exc, httpx.ReadTimeout):
        return TransientError(
            f"No data from {url} for longer than the stall timeout; reconnecting.", reason="stall"
        )
    return TransientError(
        f"Network error ({kind}) while fetching {url}: {exc or 'no detail'}", reason="network"
    )


class HttpBody:
    def __init__(self, response: httpx.Response, start: int, total: int | None, url: str) -> None:
        self.response = response
        self.start = start
        self.total = total
        self.validator = validator_of(response)
        self._url = url

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            raise _transport_error(exc, self._url) from exc

    async def aclose(self) -> None:
        await self.response.aclose()


class HttpSource:
    def __init__(
        self,
        ref: str,
        *,
        stall_timeout_s: float = 30.0,
        headers: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.ref = ref
        self.url = ref
        self.filename = _basename(ref)
        self._headers = {"user-agent": _USER_AGENT, "accept-encoding": "identity", **(headers or {})}
        self._timeout = httpx.Timeout(connect=10.0, read=stall_timeout_s, write=30.0, pool=10.0)
        self._client = client
        self._own_client = client is None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=True, timeout=self._timeout, headers=self._headers
            )
        return self._client

    async def probe(self) -> Probe:
        try:
            response = await self.client.head(self.url)
            if response.status_code in (405, 501) or (
                response.status_code < 400 and "content-length" not in response.headers
            ):
                response = await self._probe_with_get()
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.url) from exc
        raise_for_status(response, self.url)
        size: int | None = None
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            size = int(match.group(3)) if match and match.group(3) != "*" else None
        elif "content-length" in response.headers:
            size = int(response.headers["content-length"])
        accepts = response.status_code == 206 or response.headers.get("accept-ranges") == "bytes"
        final_url = str(response.url)
        return Probe(
            size=size,
            validator=validator_of(response),
            accept_ranges=accepts,
            final_url=final_url,
            filename=_filename(response) or _basename(final_url),
        )

    async def _probe_with_get(self) -> httpx.Response:
        request = self.client.build_request("GET", self.url, headers={"range": "bytes=0-0"})
        response = await self.client.send(request, stream=True)
        await response.aclose()
        return response

    async def open(self, offset: int, validator: str | None) -> HttpBody:
        headers: dict[str, str] = {}
        if offset > 0:
            headers["range"] = f"bytes={offset}-"
            if validator:
                headers["if-range"] = validator
        request = self.client.build_request("GET", self.url, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.url) from exc
        try:
            if response.status_code == 416 and offset > 0:
                raise ValidatorChanged(f"The server cannot resume {self.url} at byte {offset}.")
            raise_for_status(response, self.url)
        except BaseException:
            await response.aclose()
            raise
        length = response.headers.get("content-length")
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != offset:
                await response.aclose()
                raise ValidatorChanged(f"The server sent an unexpected range for {self.url}.")
            total = int(match.group(3)) if match.group(3) != "*" else None
            return HttpBody(response, offset, total, self.url)
        return HttpBody(response, 0, int(length) if length else None, self.url)

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None


def _filename(response: httpx.Response) -> str | None:
    disposition = response.headers.get("content-disposition", "")
    match = re.search(r"filename\*=UTF-8''([^;]+)|filename=\"?([^\";]+)\"?", disposition)
    if match is None:
        return None
    return unquote(match.group(1) or match.group(2)).strip() or None


def _basename(url: str) -> str | None:
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return name or None

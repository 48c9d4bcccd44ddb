"""HttpSource: one remote file over HTTP(S), probed with HEAD and fetched with ranges.

The shared HTTP client of the source plugins: ``http_source`` returns it for http(s) URLs and
``hf_source`` fetches each hub or CDN file through it, so neither plugin imports the other.
The kernel itself never calls it.

httpx does the probes (HEAD, or a one-byte GET) and resolves redirects; the body is then
opened on the fast path (``kernel._http_wire``: a blocking socket read by the kernel's pump in
a worker thread), at the final URL, also for https and through proxies. httpx reads a body
only when the source was given a client of its own, or the origin sends it chunked."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from urllib.parse import unquote, urlsplit

import httpx

from kernel._http_wire import CheckAddress, NeedsHttpx, Response, open_response
from kernel.errors import PermanentError, SourceError, TransientError, ValidatorChanged
from kernel.http import USER_AGENT, check_status, validator_of
from kernel.netpolicy import NetPolicy, guarded_transport
from kernel.pump import run_in_thread
from kernel.tls import tls_context, tls_failure
from kernel.types import Probe
from kernel.validation import http_url_problem

__all__ = [
    "HttpBody",
    "HttpSource",
    "WireBody",
    "raise_for_status",
]

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
MAX_REDIRECTS = 20


def raise_for_status(response: httpx.Response, url: str) -> None:
    check_status(response.status_code, response.headers, url)


def _transport_error(exc: httpx.TransportError, url: str) -> SourceError:
    """A refused certificate is permanent; other transport faults are worth a retry."""
    refused = (
        tls_failure(exc, urlsplit(url).netloc) if isinstance(exc, httpx.ConnectError) else None
    )
    if refused is not None:
        return refused
    kind = type(exc).__name__
    if isinstance(exc, httpx.ReadTimeout):
        return TransientError(
            f"No data from {url} for longer than the stall timeout; reconnecting.", reason="stall"
        )
    return TransientError(
        f"Network error ({kind}) while fetching {url}: {exc or 'no detail'}", reason="network"
    )


@contextlib.contextmanager
def _request_errors(url: str) -> Iterator[None]:
    """httpx's request errors as source errors; a redirect loop or a redirect to a malformed
    URL is permanent, with a message that says so."""
    try:
        yield
    except httpx.TooManyRedirects as exc:
        raise PermanentError(
            f"Too many redirects from {url}: the server redirects in a loop "
            f"(more than {MAX_REDIRECTS} hops)."
        ) from exc
    except httpx.UnsupportedProtocol as exc:
        raise PermanentError(f"The server redirected {url} to a URL that is not http(s).") from exc
    except httpx.TransportError as exc:
        raise _transport_error(exc, url) from exc
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise PermanentError(f"The server redirected {url} to an invalid URL: {exc}.") from exc


def _hop_checker(policy: NetPolicy | None) -> Callable[[httpx.Request], Awaitable[None]]:
    async def check_hop(request: httpx.Request) -> None:
        """Every request (each redirect hop too) goes to a well-formed URL, and to a host
        the policy does not refuse by name (its addresses are checked at connect time)."""
        problem = http_url_problem(str(request.url))
        if problem is not None:
            raise PermanentError(
                f"The server redirected to a URL that cannot be fetched: {problem}"
            )
        if policy is not None:
            policy.check_name(request.url.host)

    return check_hop


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


class WireBody:
    """A body on the fast path: the kernel's pump reads it in a worker thread, straight into
    its own block buffer (kernel.pump.BlockingBody)."""

    def __init__(
        self, response: Response, start: int, total: int | None, url: str, stall_timeout: float
    ) -> None:
        self.response = response
        self.start = start
        self.total = total
        self.validator = validator_of(response)
        self._url = url
        self._stall = stall_timeout

    def readinto_blocking(self, view: memoryview, flush_s: float) -> int:
        try:
            return self.response.readinto_blocking(view, flush_s)
        except TimeoutError as exc:
            raise TransientError(
                f"No data from {self._url} for longer than the stall timeout; reconnecting.",
                reason="stall",
            ) from exc
        except (OSError, ValueError) as exc:
            raise TransientError(
                f"Network error ({type(exc).__name__}) while fetching {self._url}: {exc}",
                reason="network",
            ) from exc

    def interrupt(self) -> None:
        self.response.interrupt()

    def queued(self) -> int:
        """Bytes waiting in the socket (see _wire.Response.queued); read by the pump."""
        return self.response.queued()

    async def chunks(self) -> AsyncIterator[bytes]:
        """For callers that want chunks (the kernel uses readinto_blocking)."""
        buffer = bytearray(1 << 20)
        while n := await asyncio.to_thread(self.readinto_blocking, memoryview(buffer), 0.25):
            yield bytes(buffer[:n])

    async def aclose(self) -> None:
        self.response.close()


class HttpSource:
    def __init__(
        self,
        ref: str,
        *,
        stall_timeout_s: float = 30.0,
        headers: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
        ca_bundle: str | None = None,
        check_address: CheckAddress | None = None,
        policy: NetPolicy | None = None,
    ) -> None:
        self.ref = ref
        self._ca_bundle = ca_bundle
        self.url = ref
        self.filename = _basename(ref)
        self._headers = {
            "user-agent": USER_AGENT,
            "accept-encoding": "identity",
            **(headers or {}),
        }
        self._timeout = httpx.Timeout(connect=10.0, read=stall_timeout_s, write=30.0, pool=10.0)
        self._client = client
        self._own_client = client is None
        self._stall = stall_timeout_s
        self._final_url: str | None = None
        self._policy = policy
        self._check_address = check_address or (policy.check_address if policy else None)
        self.fast = client is None  # bodies on the fast path (see the module's docstring)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                timeout=self._timeout,
                headers=self._headers,
                verify=tls_context(self._ca_bundle),
                event_hooks={"request": [_hop_checker(self._policy)]},
            )
            if self._policy is not None:
                # The direct connections go through the policy; set after construction, as
                # passing transport= would make httpx ignore the proxies from the environment.
                self._client._transport = guarded_transport(
                    self._policy, tls_context(self._ca_bundle)
                )
        return self._client

    async def probe(self) -> Probe:
        with _request_errors(self.url):
            response = await self.client.head(self.url)
            if response.status_code in (405, 501) or (
                response.status_code < 400 and "content-length" not in response.headers
            ):
                response = await self._probe_with_get()
        raise_for_status(response, self.url)
        size: int | None = None
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            size = int(match.group(3)) if match and match.group(3) != "*" else None
        elif "content-length" in response.headers:
            size = int(response.headers["content-length"])
        accepts = response.status_code == 206 or response.headers.get("accept-ranges") == "bytes"
        final_url = self._final_url = str(response.url)
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

    supports_segments = True

    async def open(
        self, offset: int, validator: str | None, end: int | None = None
    ) -> HttpBody | WireBody:
        headers: dict[str, str] = {}
        if offset > 0 or end is not None:
            headers["range"] = f"bytes={offset}-{'' if end is None else end}"
            if validator:
                headers["if-range"] = validator
        url = self._final_url or self.url
        if self.fast:
            try:
                return await self._open_wire(url, headers, offset)
            except NeedsHttpx as moved:
                url = moved.url
        return await self._open_httpx(url, headers, offset)

    async def _open_wire(self, url: str, headers: dict[str, str], offset: int) -> WireBody:
        opening = run_in_thread(
            functools.partial(
                open_response, url, {**self._headers, **headers},
                tls=tls_context(self._ca_bundle), connect_timeout=self._timeout.connect or 10.0,
                read_timeout=self._stall, check_address=self._check_address,
            ),
            name="modelkernel-connect",
        )  # fmt: skip
        try:
            response = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        try:
            self._check_body_status(response.status_code, response.headers, offset, url)
            if response.chunked:
                raise NeedsHttpx(response.url)  # httpx decodes the framing
            start, total = self._span(response.status_code, response.headers, url, offset)
        except BaseException:
            response.close()
            raise
        return WireBody(response, start, total, url, self._stall)

    def _check_body_status(
        self, status: int, headers: Mapping[str, str], offset: int, url: str
    ) -> None:
        if status == 416 and offset > 0:
            raise ValidatorChanged(f"The server cannot resume {url} at byte {offset}.")
        check_status(status, headers, url)

    def _span(
        self, status: int, headers: Mapping[str, str], url: str, offset: int
    ) -> tuple[int, int | None]:
        """(first byte offset, total size) of a 200 or 206 body."""
        if status == 206:
            match = _CONTENT_RANGE.match(headers.get("content-range", ""))
            if match is None or int(match.group(1)) != offset:
                raise ValidatorChanged(f"The server sent an unexpected range for {url}.")
            return offset, int(match.group(3)) if match.group(3) != "*" else None
        length = headers.get("content-length")
        return 0, int(length) if length else None

    async def _open_httpx(self, url: str, headers: dict[str, str], offset: int) -> HttpBody:
        request = self.client.build_request("GET", url, headers=headers)
        with _request_errors(self.url):
            response = await self.client.send(request, stream=True)
        try:
            self._check_body_status(response.status_code, response.headers, offset, url)
            start, total = self._span(response.status_code, response.headers, url, offset)
        except BaseException:
            await response.aclose()
            raise
        return HttpBody(response, start, total, url)

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None


def _close_opened(opening: asyncio.Future[Response]) -> None:
    """A connection that finished opening after its caller was cancelled: close it."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _filename(response: httpx.Response) -> str | None:
    disposition = response.headers.get("content-disposition", "")
    match = re.search(r"filename\*=UTF-8''([^;]+)|filename=\"?([^\";]+)\"?", disposition)
    if match is None:
        return None
    return unquote(match.group(1) or match.group(2)).strip() or None


def _basename(url: str) -> str | None:
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return name or None

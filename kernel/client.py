"""A Python client for a modelkernel server: ``Client`` (sync) and ``AsyncClient``, on httpx.

Results are the wire Structs of ``kernel.api.schemas`` (``Download``, ``DownloadList``, ...).
Every failure is an ``ApiError``: an HTTP error carries the status and the API's error body
(``message``, ``type``, ``param``, ``code``); a server that cannot be reached is an
``ApiConnectionError`` (status 0)::

    from kernel.client import AsyncClient

    async with AsyncClient("http://127.0.0.1:8080", api_key="k") as mk:
        await mk.create("tiny", "https://example.com/tiny.bin")
        async for event in mk.watch(model_id="tiny"):
            print(event.event, event.download.progress.percentage if event.download else "")
        done = await mk.wait("tiny")
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any, TypeVar, cast
from urllib.parse import quote

import httpx
import msgspec

from kernel.api.schemas import (
    ActionResult,
    BulkCancelResult,
    CancelResult,
    Download,
    DownloadList,
    Health,
    PurgeResult,
)
from kernel.types import TERMINAL

__all__ = [
    "DEFAULT_SERVER",
    "ApiConnectionError",
    "ApiError",
    "AsyncClient",
    "Client",
    "EngineInfo",
    "ModelInfo",
    "StreamEvent",
]

DEFAULT_SERVER = "http://127.0.0.1:8080"
POLL_INTERVAL_S = 0.5
T = TypeVar("T")


class ApiError(Exception):
    """The server answered with an error (or could not be reached: see ApiConnectionError).

    ``status`` is the HTTP status; ``message``, ``type``, ``param`` and ``code`` come from the
    API's error body, which is kept whole in ``body``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "server_error",
        param: str | None = None,
        code: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = (
            body
            if body is not None
            else {"error": {"message": message, "type": type, "param": param, "code": code}}
        )

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status}, {self.type})" if self.status else self.message

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
            error = body["error"]
            return cls(
                response.status_code, str(error["message"]), str(error.get("type")),
                error.get("param"), error.get("code"), body,
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(response.status_code, f"HTTP {response.status_code}: {text}")


class ApiConnectionError(ApiError):
    """The server could not be reached (refused, unresolvable, timed out, dropped)."""

    def __init__(self, url: str, exc: BaseException) -> None:
        detail = str(exc) or type(exc).__name__
        super().__init__(0, f"Cannot connect to {url}: {detail}", "connection_error")
        self.url = url


class EngineInfo(msgspec.Struct, kw_only=True):
    """The data of an ``engine.created`` event."""

    model_id: str
    model_type: str
    inference_engine: str


class ModelInfo(msgspec.Struct, kw_only=True):
    """One model of ``GET /v1/models`` (the fields the client shows; others are ignored)."""

    model_id: str
    status: str
    available: bool
    model_type: str
    inference_engine: str
    model_path: str


class _ModelList(msgspec.Struct, kw_only=True):
    models: list[ModelInfo]


class StreamEvent(msgspec.Struct, kw_only=True):
    """One Server-Sent Event: ``event`` is ``download.created``, ``download.status``,
    ``download.progress`` (``data`` is a Download), ``engine.created`` (an EngineInfo),
    ``download.retry`` (``{model_id, attempt, reason, error, delay_s}``) or ``resync``
    (refetch; events were lost)."""

    id: str | None
    event: str
    data: Download | EngineInfo | dict[str, Any]

    @property
    def download(self) -> Download | None:
        return self.data if isinstance(self.data, Download) else None


class _SseParser:
    """Feeds lines of an ``text/event-stream`` body; yields complete events (spec-compatible
    enough for our server: ``id``, ``event``, multi-line ``data``, comments, ``retry``)."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = _decode_event(self.last_id, self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


_DOWNLOAD_EVENTS = frozenset({"download.created", "download.status", "download.progress"})


def _decode_event(id_: str | None, name: str, data: str) -> StreamEvent:
    value: Download | EngineInfo | dict[str, Any]
    if name in _DOWNLOAD_EVENTS:
        value = msgspec.json.decode(data, type=Download)
    elif name == "engine.created":
        value = msgspec.json.decode(data, type=EngineInfo)
    else:
        decoded = msgspec.json.decode(data) if data else {}
        value = decoded if isinstance(decoded, dict) else {"value": decoded}
    return StreamEvent(id=id_, event=name, data=value)


def _path(model_id: str) -> str:
    return "/v1/downloads/" + quote(model_id, safe="")


def _list_params(all: bool, status: str | None) -> dict[str, str]:
    if status:
        return {"status": status}
    return {"status": "all"} if all else {}


def _create_body(model_id: str, url: str, opts: dict[str, Any]) -> dict[str, Any]:
    body = {"model_id": model_id, "url": url}
    body.update({k: v for k, v in opts.items() if v is not None})
    return body


def _events_params(model_id: str | None, last_event_id: str | int | None) -> dict[str, str]:
    params = {}
    if model_id is not None:
        params["model_id"] = model_id
    if last_event_id is not None:
        params["last_event_id"] = str(last_event_id)
    return params


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "modelkernel-client", "Accept": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    return headers


def _decode(response: httpx.Response, type_: type[T]) -> T:
    if response.is_error:
        raise ApiError.from_response(response)
    try:
        return msgspec.json.decode(response.content, type=type_)
    except msgspec.DecodeError as exc:
        raise ApiError(response.status_code, f"Unexpected response from the server: {exc}") from exc


def _terminal(download: Download) -> bool:
    return download.status in TERMINAL


class _Request(msgspec.Struct, frozen=True):
    """One API call: built once here for both clients, sent by each its own way."""

    method: str
    path: str
    type: Any  # what the answer decodes to
    params: dict[str, str] | None = None
    json: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"params": self.params, "json": self.json}


class _Requests:
    """Every endpoint's request; ``Client`` and ``AsyncClient`` only send them."""

    @staticmethod
    def health() -> _Request:
        return _Request("GET", "/health", Health)

    @staticmethod
    def list(all: bool, status: str | None) -> _Request:
        return _Request("GET", "/v1/downloads", DownloadList, params=_list_params(all, status))

    @staticmethod
    def get(model_id: str) -> _Request:
        return _Request("GET", _path(model_id), Download)

    @staticmethod
    def create(model_id: str, url: str, opts: dict[str, Any]) -> _Request:
        return _Request("POST", "/v1/downloads", Download, json=_create_body(model_id, url, opts))

    @staticmethod
    def action(model_id: str, action: str, type_: Any) -> _Request:
        return _Request("POST", f"{_path(model_id)}/{action}", type_)

    @staticmethod
    def cancel_all() -> _Request:
        return _Request("POST", "/v1/downloads/cancel", BulkCancelResult)

    @staticmethod
    def purge(model_id: str, delete_file: bool) -> _Request:
        params = {"purge": "true", "delete_file": "true" if delete_file else "false"}
        return _Request("DELETE", _path(model_id), PurgeResult, params=params)

    @staticmethod
    def models() -> _Request:
        return _Request("GET", "/v1/models", _ModelList)

    @staticmethod
    def set_priority(model_id: str, priority: int) -> _Request:
        return _Request(
            "POST", _path(model_id) + "/priority", Download, json={"priority": priority}
        )

    @staticmethod
    def set_limit(model_id: str, max_bytes_per_second: int) -> _Request:
        body = {"max_bytes_per_second": max_bytes_per_second}
        return _Request("POST", _path(model_id) + "/limit", Download, json=body)

    @staticmethod
    def events(model_id: str | None, last_event_id: str | int | None) -> _Request:
        return _Request("GET", "/v1/events", None, params=_events_params(model_id, last_event_id))


class _Follow:
    """What ``follow`` does between reads, for both clients: a deadline, and which state an
    event stands for (None: look it up now)."""

    def __init__(self, model_id: str, timeout: float | None) -> None:
        self.model_id, self.timeout = model_id, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float:
        return STREAM_READ_TIMEOUT_S if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"{self.model_id} did not finish within {self.timeout}s")

    def read_timeout(self) -> float:
        return max(0.1, min(self.left(), 20.0))

    def pause(self) -> float:
        return max(0.0, min(POLL_INTERVAL_S, self.left()))


STREAM_READ_TIMEOUT_S = 45.0  # well over the server's 15 s heartbeat
# No stream (connection dropped, or a server without /v1/events): poll instead.
FALL_BACK_TO_POLLING = frozenset({0, 404, 405, 501})


class Client:
    """Synchronous client. ``Client(server, api_key=None, timeout=30.0)``; use as a context
    manager or call ``close()``. Extra keyword arguments go to ``httpx.Client``."""

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        **httpx_options: Any,
    ) -> None:
        self.server = server.rstrip("/")
        self._http = httpx.Client(
            base_url=self.server, headers=_headers(api_key), timeout=timeout, **httpx_options
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: _Request) -> Any:
        try:
            response = self._http.request(request.method, request.path, **request.kwargs())
        except httpx.TransportError as exc:
            raise ApiConnectionError(self.server, exc) from exc
        return _decode(response, request.type)

    # --- endpoints (each request is built by _Requests, shared with AsyncClient) -------------

    def health(self) -> Health:
        return cast(Health, self._send(_Requests.health()))

    def list(self, all: bool = False, status: str | None = None) -> DownloadList:
        """Active downloads; ``all=True`` includes ended ones; ``status`` is a comma list."""
        return cast(DownloadList, self._send(_Requests.list(all, status)))

    def get(self, model_id: str) -> Download:
        return cast(Download, self._send(_Requests.get(model_id)))

    def create(self, model_id: str, url: str, **opts: Any) -> Download:
        """Start a download. ``opts``: model_type, sha256, filename, priority,
        max_bytes_per_second, engine_creation (a dict); None values are left out."""
        return cast(Download, self._send(_Requests.create(model_id, url, opts)))

    def pause(self, model_id: str) -> ActionResult:
        return cast(ActionResult, self._send(_Requests.action(model_id, "pause", ActionResult)))

    def resume(self, model_id: str) -> ActionResult:
        return cast(ActionResult, self._send(_Requests.action(model_id, "resume", ActionResult)))

    def cancel(self, model_id: str) -> CancelResult:
        return cast(CancelResult, self._send(_Requests.action(model_id, "cancel", CancelResult)))

    def cancel_all(self) -> BulkCancelResult:
        return cast(BulkCancelResult, self._send(_Requests.cancel_all()))

    def purge(self, model_id: str, delete_file: bool = False) -> PurgeResult:
        """Forget an ended download (and delete its file with ``delete_file``)."""
        return cast(PurgeResult, self._send(_Requests.purge(model_id, delete_file)))

    def models(self) -> builtins.list[ModelInfo]:
        """The models the server has engines for (or is downloading for one)."""
        return cast(_ModelList, self._send(_Requests.models())).models

    def set_priority(self, model_id: str, priority: int) -> Download:
        return cast(Download, self._send(_Requests.set_priority(model_id, priority)))

    def set_limit(self, model_id: str, max_bytes_per_second: int) -> Download:
        return cast(Download, self._send(_Requests.set_limit(model_id, max_bytes_per_second)))

    # --- events ---------------------------------------------------------------------------

    def watch(
        self,
        model_id: str | None = None,
        last_event_id: str | int | None = None,
        *,
        read_timeout: float = STREAM_READ_TIMEOUT_S,
    ) -> Iterator[StreamEvent]:
        """Events as they happen, until the server ends the stream (then resume with the
        last event's ``id`` as ``last_event_id``)."""
        for item in self._stream(model_id, last_event_id, read_timeout):
            if item is not None:
                yield item

    def _stream(
        self, model_id: str | None, last_event_id: str | int | None, read_timeout: float
    ) -> Generator[StreamEvent | None, None, None]:
        """Like watch(), plus a None first, once the server has subscribed us."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
        request = _Requests.events(model_id, last_event_id)
        headers = {"Accept": "text/event-stream"}
        parser = _SseParser()
        try:
            with self._http.stream(
                request.method, request.path, params=request.params, headers=headers,
                timeout=timeout,
            ) as response:  # fmt: skip
                if response.is_error:
                    response.read()
                    raise ApiError.from_response(response)
                opened = False
                for line in response.iter_lines():
                    if not opened and line.startswith("retry:"):
                        opened = True
                        yield None
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise ApiConnectionError(self.server, exc) from exc

    def follow(
        self, model_id: str, timeout: float | None = None
    ) -> Generator[Download, None, None]:
        """The download's successive states, ending with the terminal one. Follows the event
        stream and falls back to polling when the stream is unavailable or drops;
        TimeoutError past ``timeout`` seconds."""
        state = _Follow(model_id, timeout)
        stream = self._stream(model_id, None, state.read_timeout())
        try:
            with contextlib.closing(stream):
                for item in stream:
                    if item is None or item.event == "resync":  # subscribed, or events lost
                        current: Download | None = self.get(model_id)  # so look now
                    else:
                        current = item.download
                    if current is not None:
                        yield current
                        if _terminal(current):
                            return
                    state.check()
        except ApiError as exc:
            if exc.status not in FALL_BACK_TO_POLLING:
                raise
        while True:
            state.check()
            current = self.get(model_id)
            yield current
            if _terminal(current):
                return
            time.sleep(state.pause())

    def wait(self, model_id: str, timeout: float | None = None) -> Download:
        """Block until the download is terminal and return it; TimeoutError past ``timeout``."""
        last: Download | None = None
        for state in self.follow(model_id, timeout):
            last = state
        assert last is not None  # follow() always yields at least the terminal state
        return last


class AsyncClient:
    """Asynchronous client with the same methods as ``Client``, as coroutines."""

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        **httpx_options: Any,
    ) -> None:
        self.server = server.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.server, headers=_headers(api_key), timeout=timeout, **httpx_options
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: _Request) -> Any:
        try:
            response = await self._http.request(request.method, request.path, **request.kwargs())
        except httpx.TransportError as exc:
            raise ApiConnectionError(self.server, exc) from exc
        return _decode(response, request.type)

    # --- endpoints (each request is built by _Requests, shared with Client) -----------------

    async def health(self) -> Health:
        return cast(Health, await self._send(_Requests.health()))

    async def list(self, all: bool = False, status: str | None = None) -> DownloadList:
        """Active downloads; ``all=True`` includes ended ones; ``status`` is a comma list."""
        return cast(DownloadList, await self._send(_Requests.list(all, status)))

    async def get(self, model_id: str) -> Download:
        return cast(Download, await self._send(_Requests.get(model_id)))

    async def create(self, model_id: str, url: str, **opts: Any) -> Download:
        """Start a download. ``opts``: model_type, sha256, filename, priority,
        max_bytes_per_second, engine_creation (a dict); None values are left out."""
        return cast(Download, await self._send(_Requests.create(model_id, url, opts)))

    async def pause(self, model_id: str) -> ActionResult:
        request = _Requests.action(model_id, "pause", ActionResult)
        return cast(ActionResult, await self._send(request))

    async def resume(self, model_id: str) -> ActionResult:
        request = _Requests.action(model_id, "resume", ActionResult)
        return cast(ActionResult, await self._send(request))

    async def cancel(self, model_id: str) -> CancelResult:
        request = _Requests.action(model_id, "cancel", CancelResult)
        return cast(CancelResult, await self._send(request))

    async def cancel_all(self) -> BulkCancelResult:
        return cast(BulkCancelResult, await self._send(_Requests.cancel_all()))

    async def purge(self, model_id: str, delete_file: bool = False) -> PurgeResult:
        """Forget an ended download (and delete its file with ``delete_file``)."""
        return cast(PurgeResult, await self._send(_Requests.purge(model_id, delete_file)))

    async def models(self) -> builtins.list[ModelInfo]:
        """The models the server has engines for (or is downloading for one)."""
        return cast(_ModelList, await self._send(_Requests.models())).models

    async def set_priority(self, model_id: str, priority: int) -> Download:
        return cast(Download, await self._send(_Requests.set_priority(model_id, priority)))

    async def set_limit(self, model_id: str, max_bytes_per_second: int) -> Download:
        request = _Requests.set_limit(model_id, max_bytes_per_second)
        return cast(Download, await self._send(request))

    # --- events ---------------------------------------------------------------------------

    async def watch(
        self,
        model_id: str | None = None,
        last_event_id: str | int | None = None,
        *,
        read_timeout: float = STREAM_READ_TIMEOUT_S,
    ) -> AsyncIterator[StreamEvent]:
        """Events as they happen, until the server ends the stream (then resume with the
        last event's ``id`` as ``last_event_id``)."""
        async for item in self._stream(model_id, last_event_id, read_timeout):
            if item is not None:
                yield item

    async def _stream(
        self, model_id: str | None, last_event_id: str | int | None, read_timeout: float
    ) -> AsyncGenerator[StreamEvent | None, None]:
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
        request = _Requests.events(model_id, last_event_id)
        headers = {"Accept": "text/event-stream"}
        parser = _SseParser()
        try:
            async with self._http.stream(
                request.method, request.path, params=request.params, headers=headers,
                timeout=timeout,
            ) as response:  # fmt: skip
                if response.is_error:
                    await response.aread()
                    raise ApiError.from_response(response)
                opened = False
                async for line in response.aiter_lines():
                    if not opened and line.startswith("retry:"):
                        opened = True
                        yield None
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise ApiConnectionError(self.server, exc) from exc

    async def follow(
        self,
        model_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.follow
    ) -> AsyncGenerator[Download, None]:
        """The download's successive states, ending with the terminal one. Follows the event
        stream and falls back to polling when the stream is unavailable or drops;
        TimeoutError past ``timeout`` seconds."""
        state = _Follow(model_id, timeout)
        try:
            async with contextlib.aclosing(
                self._stream(model_id, None, state.read_timeout())
            ) as stream:
                async for item in stream:
                    if item is None or item.event == "resync":  # as in Client.follow
                        current: Download | None = await self.get(model_id)
                    else:
                        current = item.download
                    if current is not None:
                        yield current
                        if _terminal(current):
                            return
                    state.check()
        except ApiError as exc:
            if exc.status not in FALL_BACK_TO_POLLING:
                raise
        while True:
            state.check()
            current = await self.get(model_id)
            yield current
            if _terminal(current):
                return
            await asyncio.sleep(state.pause())

    async def wait(
        self,
        model_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.wait
    ) -> Download:
        """The download once terminal; TimeoutError past ``timeout`` seconds."""
        last: Download | None = None
        async with contextlib.aclosing(self.follow(model_id, timeout)) as states:
            async for state in states:
                last = state
        assert last is not None  # follow() always yields at least the terminal state
        return last

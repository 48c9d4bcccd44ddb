"""Client and AsyncClient are one client: the same methods, with the same parameters, sending
the same requests (both build them with kernel.client._Requests). Recorded with httpx's
MockTransport, which answers each request with a canned body of the right shape."""

from __future__ import annotations

import contextlib
import inspect
import json
from typing import Any

import httpx

from kernel.client import ApiError, AsyncClient, Client

DOWNLOAD = {
    "model_id": "m", "url": "https://example.test/m.bin", "local_path": "/m/m.bin",
    "status": "completed", "download_type": "regular", "priority": 0,
    "progress": {"downloaded_bytes": 1, "total_bytes": 1, "percentage": 100.0,
                 "download_speed_bps": 0.0, "eta_seconds": None},
    "created_at": 1, "start_time": 1, "end_time": 1, "elapsed_seconds": 0.0,
    "error_message": None, "engine_creation": None,
}  # fmt: skip

# (method, arguments) for every endpoint method of the clients
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("health", (), {}),
    ("list", (), {"all": True}),
    ("list", (), {"status": "failed,cancelled"}),
    ("get", ("a/b c",), {}),
    ("create", ("m", "https://example.test/m.bin"), {"priority": 3, "sha256": None}),
    ("pause", ("m",), {}),
    ("resume", ("m",), {}),
    ("cancel", ("m",), {}),
    ("cancel_all", (), {}),
    ("purge", ("m",), {"delete_file": True}),
    ("models", (), {}),
    ("set_priority", ("m", 5), {}),
    ("set_limit", ("m", 1000), {}),
]


def public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


def test_both_clients_have_the_same_methods_with_the_same_parameters() -> None:
    sync, asynchronous = public(Client), public(AsyncClient)
    sync.pop("close"), asynchronous.pop("aclose")  # each closes its own way
    assert sorted(sync) == sorted(asynchronous)
    for name, signature in sync.items():
        assert list(signature.parameters.values()) == list(
            asynchronous[name].parameters.values()
        ), name
    assert {n for n, _, _ in CALLS} == set(sync) - {"watch", "follow", "wait"}


def answer(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/health":
        body: Any = {"status": "ok", "version": "x", "uptime_seconds": 0.0, "downloads": {}}
    elif path == "/v1/models":
        body = {"models": []}
    elif request.method == "GET" and path == "/v1/downloads":
        body = {"downloads": []}
    else:
        body = DOWNLOAD
    return httpx.Response(200, json=body)


def seen(request: httpx.Request) -> tuple[str, str, Any]:
    body = json.loads(request.content) if request.content else None
    return request.method, str(request.url), body


async def test_both_clients_send_the_same_request_for_every_endpoint() -> None:
    sync_requests: list[httpx.Request] = []
    async_requests: list[httpx.Request] = []

    def record(into: list[httpx.Request]) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            into.append(request)
            return answer(request)

        return httpx.MockTransport(handler)

    sync = Client("http://mk.test", api_key="k", transport=record(sync_requests))
    asynchronous = AsyncClient("http://mk.test", api_key="k", transport=record(async_requests))
    try:
        for name, args, kwargs in CALLS:
            # A canned body that does not decode is an ApiError; the request was sent all the same.
            with contextlib.suppress(ApiError):
                getattr(sync, name)(*args, **kwargs)
            with contextlib.suppress(ApiError):
                await getattr(asynchronous, name)(*args, **kwargs)
    finally:
        sync.close()
        await asynchronous.aclose()
    assert len(sync_requests) == len(CALLS)
    assert [seen(r) for r in sync_requests] == [seen(r) for r in async_requests]
    assert all(r.headers["x-api-key"] == "k" for r in sync_requests + async_requests)
    assert seen(sync_requests[3])[1] == "http://mk.test/v1/downloads/a%2Fb%20c"
    assert seen(sync_requests[4])[2] == {
        "model_id": "m", "url": "https://example.test/m.bin", "priority": 3}  # fmt: skip

"""Helpers for API tests: the one error-shape assertion, and waiting with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["assert_error", "wait_for", "wait_status"]

ERROR_TYPES = {
    "invalid_request_error",
    "not_found_error",
    "authentication_error",
    "rate_limit_error",
    "server_error",
}


def assert_error(
    response: httpx.Response,
    status: int,
    type_: str,
    *,
    code: str | None = None,
    param: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """The response is exactly API.md's error body with these values; CORS included."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and type_ in ERROR_TYPES
    assert error["code"] == code
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    if message is not None:
        assert error["message"] == message
    assert "Traceback" not in response.text
    assert response.headers["access-control-allow-origin"] == "*"
    return error


async def wait_for(
    client: Any, model_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """Poll the detail endpoint until ``predicate(body)`` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/v1/downloads/{model_id}")
        body = response.json()
        if response.status_code == 200 and predicate(body):
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting on {model_id}; last body: {body}")


async def wait_status(
    client: Any, model_id: str, *statuses: str, timeout: float = 10.0
) -> dict[str, Any]:
    return await wait_for(client, model_id, lambda b: b["status"] in statuses, timeout)

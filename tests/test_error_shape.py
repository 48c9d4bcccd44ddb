"""Every row of API.md's error table, through one assert_error() helper."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.api import assert_error, wait_status
from tests.helpers.origin import Origin

PREFIXES = ["/v1/downloads", "/downloads"]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_unknown_id_on_get_is_404_download_not_found(client: Any, prefix: str) -> None:
    assert_error(
        await client.get(f"{prefix}/ghost"), 404, "not_found_error",
        code="download_not_found", param="model_id",
        message="No download found for model ID: ghost",
    )


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("DELETE", ""), ("POST", "/cancel"), ("POST", "/pause"), ("POST", "/resume")],
)
async def test_unknown_id_on_actions_is_404_with_null_code(
    client: Any, prefix: str, method: str, suffix: str
) -> None:
    response = await client.request(method, f"{prefix}/ghost{suffix}")
    assert_error(response, 404, "not_found_error", code=None, param=None)


async def test_cancel_of_terminal_download_is_400_naming_the_status(client: Any, origin: Origin) -> None:
    url = origin.add_file("t.bin", b"t" * 100)
    await client.post("/v1/downloads", json={"model_id": "term", "url": url})
    await wait_status(client, "term", "completed")
    error = assert_error(await client.post("/v1/downloads/term/cancel"), 400, "invalid_request_error")
    assert "completed" in error["message"]


async def test_pause_and_resume_in_wrong_status_are_400(client: Any, origin: Origin) -> None:
    url = origin.add_file("w.bin", b"w" * 100)
    await client.post("/v1/downloads", json={"model_id": "wrong", "url": url})
    await wait_status(client, "wrong", "completed")
    for action in ("pause", "resume"):
        error = assert_error(await client.post(f"/v1/downloads/wrong/{action}"), 400, "invalid_request_error")
        assert "completed" in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/downloads/a/b"),
        ("GET", "/downloads/a/b/c"),
        ("POST", "/v1/downloads/a/explode"),
        ("GET", "/v1/downloads/a/pause/more"),
    ],
)
async def test_unknown_path_under_downloads_is_400_invalid_endpoint(
    client: Any, method: str, path: str
) -> None:
    assert_error(await client.request(method, path), 400, "invalid_request_error", code="invalid_endpoint")


@pytest.mark.parametrize(
    "path", ["/v1/downloads/%2E%2E", "/v1/downloads/.x/pause", "/downloads/a%20b", "/v1/downloads//pause"]
)
async def test_bad_id_segment_is_400_invalid_path_format(client: Any, path: str) -> None:
    method = "POST" if path.endswith("pause") else "GET"
    assert_error(
        await client.request(method, path), 400, "invalid_request_error",
        code="invalid_path_format", param="path",
    )


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("DELETE", "/"),
        ("POST", "//cancel"),
        ("DELETE", "//"),
        ("POST", "//pause"),
        ("GET", "/a%2Fb"),
        ("DELETE", "/a%2fb"),
        ("DELETE", "/..%2F..%2Fetc"),
        ("POST", "/a%2Fb/cancel"),
        ("POST", "/a%2Fb/pause"),
    ],
)
async def test_empty_or_slashed_id_is_a_bad_id_never_the_bulk_cancel(
    client: Any, origin: Origin, prefix: str, method: str, suffix: str
) -> None:
    url = origin.add_file("keep.bin", b"k" * 100_000)
    origin.faults.stall_after = 100  # stays downloading until the origin's reset: a bulk
    # cancel would end it
    assert (await client.post("/v1/downloads", json={"model_id": "keep", "url": url})).status_code == 202
    assert_error(
        await client.request(method, f"{prefix}{suffix}"), 400, "invalid_request_error",
        code="invalid_path_format", param="path",
    )
    body = (await client.get("/v1/downloads/keep")).json()
    assert body["status"] in {"queued", "downloading"}


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_cancel_all_body_on_the_slashed_path_is_a_bad_id(client: Any, prefix: str) -> None:
    response = await client.post(f"{prefix}/", json={"action": "cancel_all"})
    assert_error(response, 400, "invalid_request_error", code="invalid_path_format", param="path")


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_list_with_a_trailing_slash_still_lists(client: Any, prefix: str) -> None:
    response = await client.get(f"{prefix}/")
    assert response.status_code == 200 and "active_downloads" in response.json()


async def test_internal_exception_is_500_without_a_traceback(client: Any, origin: Origin) -> None:
    def explode(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("secret internals /etc/shadow")

    client.kernel.downloads.list = explode  # a real failure inside the handler's kernel call
    response = await client.get("/v1/downloads")
    error = assert_error(response, 500, "server_error")
    assert "secret" not in response.text and "shadow" not in response.text
    assert error["message"] == "Server error: Internal processing failed"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "http://127.0.0.1/x"}, "model_id"),
        ({"model_id": "ok"}, "url"),
        ({"model_id": "ok", "url": "ftp://127.0.0.1/x"}, "url"),
        ({"model_id": "ok", "url": "http://127.0.0.1/x", "priority": "high"}, "priority"),
        ({"model_id": "ok", "url": "http://127.0.0.1/x", "surprise": 1}, "surprise"),
        ({"model_id": "ok", "url": "http://127.0.0.1/x", "model_type": "vision"}, "model_type"),
        ({"model_id": "ok", "url": "http://127.0.0.1/x", "sha256": "abc"}, "sha256"),
        ({"model_id": "ok", "url": "http://127.0.0.1/x", "engine_creation": {"inference_engine": "nope"}},
         "engine_creation.inference_engine"),
        ({"model_id": "ok", "url": "http://127.0.0.1/x", "engine_creation": {"gpu": 1}},
         "engine_creation.gpu"),
        ({"action": "explode"}, "action"),
    ],
)
async def test_bad_create_bodies_are_400_naming_the_field(client: Any, body: dict[str, Any], param: str) -> None:
    assert_error(await client.post("/v1/downloads", json=body), 400, "invalid_request_error", param=param)


async def test_malformed_json_is_400(client: Any) -> None:
    response = await client.post(
        "/v1/downloads", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_request_error")


async def test_unknown_route_outside_downloads_is_404_in_the_error_shape(client: Any) -> None:
    assert_error(await client.get("/nowhere"), 404, "not_found_error", code="not_found")


async def test_wrong_method_is_405_in_the_error_shape(client: Any) -> None:
    response = await client.put("/v1/downloads")
    assert_error(response, 405, "invalid_request_error", code="method_not_allowed")

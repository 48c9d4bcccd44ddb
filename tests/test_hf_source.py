"""hf_source: hub references end to end against an emulated hub, and the exact requests.

The end-to-end tests drive the API against the loopback hub (tests/helpers/hub.py), which
302-redirects LFS files to the loopback origin acting as the CDN. The pytest-httpx tests at the
bottom pin the requests the source sends to a hub and a CDN that are only names.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pytest_httpx import HTTPXMock

from kernel import httpclient as http_source_module
from kernel.config import HubSettings, NetworkSettings, Settings, SourcesSettings
from kernel.core import Kernel
from kernel.errors import InvalidRequest, PermanentError, TransientError, ValidatorChanged
from kernel.pump import is_blocking
from plugins import hf_source
from plugins.hf_source import HubSource
from plugins.http_source import HttpSource
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_for, wait_status
from tests.helpers.hub import Hub, gguf_blob
from tests.helpers.origin import Origin
from tests.helpers.tls import TestCA

TOKEN = "hf_test_token_0123456789"
AUTH = f"Bearer {TOKEN}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def create(client: Any, model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url, **extra})
    assert response.status_code == 202, response.text
    return response.json()


async def failed_with(client: Any, model_id: str, url: str, **extra: Any) -> str:
    await create(client, model_id, url, **extra)
    failed = await wait_status(client, model_id, "failed", "completed")
    assert failed["status"] == "failed", failed
    assert not os.path.exists(failed["local_path"])
    assert not os.path.exists(failed["local_path"] + ".part")
    message: str = failed["error_message"]
    return message


def hub_settings(tmp_path: Path, endpoint: str | None, token: str | None) -> Settings:
    return msgspec.structs.replace(
        make_settings(tmp_path),
        sources=SourcesSettings(huggingface=HubSettings(endpoint=endpoint, token=token)),
    )


@pytest.fixture(autouse=True)
def hf_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token or endpoint leaks in from the machine running the tests."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture(scope="module")
def hub_server(origin_server: Origin) -> Iterator[Hub]:
    with Hub(cdn=origin_server) as server:
        yield server


@pytest.fixture
def hub(hub_server: Hub, origin: Origin) -> Iterator[Hub]:
    """The emulated hub, knowing TOKEN; repositories, faults and log reset after each test."""
    hub_server.tokens.add(TOKEN)
    try:
        yield hub_server
    finally:
        hub_server.reset()


@pytest.fixture
def token() -> str | None:
    return TOKEN  # parametrize "token" to run a test with another one, or none


@pytest.fixture
def settings(tmp_path: Path, hub: Hub, token: str | None) -> Settings:
    """What the `client` fixture builds the app from: the emulated hub as the endpoint."""
    return hub_settings(tmp_path, hub.base_url, token)


def hub_paths(hub: Hub) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in hub.requests]


# --- downloads end to end ------------------------------------------------------------------------


async def test_hf_ref_downloads_verifies_and_reports_the_file(
    client: Any, hub: Hub, origin: Origin, tmp_path: Path
) -> None:
    data = gguf_blob(2 << 20, 1)
    commit = hub.add_repo("owner/repo", {"model.gguf": data, "README.md": b"# a model\n"})
    created = await create(client, "q", "hf://owner/repo/model.gguf@main")
    assert created["url"] == "hf://owner/repo/model.gguf@main"
    assert created["local_path"] == str(tmp_path / "models" / "q" / "model.gguf")
    done = await wait_status(client, "q", "completed")
    assert done["sha256"] == sha(data)
    assert Path(done["local_path"]).read_bytes() == data
    assert not os.path.exists(done["local_path"] + ".part")
    assert done["progress"]["total_bytes"] == len(data)
    assert done["progress"]["percentage"] == 100.0
    assert hub_paths(hub) == [
        ("HEAD", "/owner/repo/resolve/main/model.gguf"),  # probe: the revision -> commit
        ("HEAD", f"/owner/repo/resolve/{commit}/model.gguf"),  # open: pinned to the commit
    ]
    assert all(r.headers["authorization"] == AUTH for r in hub.requests)
    cdn = origin.requests_for(Hub.blob_name(data))
    assert [r.method for r in cdn] == ["GET"]
    assert "authorization" not in cdn[0].headers


@pytest.mark.parametrize(
    "url",
    [
        "https://huggingface.co/owner/repo/resolve/main/model.gguf",
        "https://huggingface.co/owner/repo/resolve/main/model.gguf?download=true",
        "https://huggingface.co/owner/repo/blob/main/model.gguf",
        "ENDPOINT/owner/repo/resolve/main/model.gguf",
    ],
)
async def test_hub_resolve_urls_are_fetched_through_the_configured_endpoint(
    client: Any, hub: Hub, url: str
) -> None:
    data = gguf_blob(300_000, 2)
    hub.add_repo("owner/repo", {"model.gguf": data})
    url = url.replace("ENDPOINT", hub.base_url)
    created = await create(client, "viaurl", url)
    assert created["url"] == url  # the record keeps the user's reference
    done = await wait_status(client, "viaurl", "completed")
    assert Path(done["local_path"]).name == "model.gguf"
    assert done["sha256"] == sha(data)
    assert hub_paths(hub)[0] == ("HEAD", "/owner/repo/resolve/main/model.gguf")


async def test_pause_and_resume_across_the_redirect_sends_range_to_the_cdn(
    client: Any, hub: Hub, origin: Origin
) -> None:
    data = gguf_blob(600_000, 3)
    commit = hub.add_repo("owner/repo", {"model.gguf": data})
    blob = Hub.blob_name(data)
    origin.faults.throttle_bps = 400_000
    await create(client, "pausable", "hf://owner/repo/model.gguf")
    await wait_for(client, "pausable", lambda b: b["progress"]["downloaded_bytes"] > 0)
    response = await client.post("/v1/downloads/pausable/pause")
    assert response.status_code == 200
    paused = (await client.get("/v1/downloads/pausable")).json()
    size_at_pause = Path(paused["local_path"] + ".part").stat().st_size
    assert 0 < size_at_pause < len(data)
    gets_at_pause = len(origin.requests_for(blob))
    hub.requests.clear()

    origin.faults.throttle_bps = None
    await client.post("/v1/downloads/pausable/resume")
    done = await wait_status(client, "pausable", "completed")
    assert Path(done["local_path"]).read_bytes() == data
    assert hub_paths(hub) == [
        ("HEAD", "/owner/repo/resolve/main/model.gguf"),
        ("HEAD", f"/owner/repo/resolve/{commit}/model.gguf"),
    ]
    resumed = origin.requests_for(blob)[gets_at_pause:]
    assert [r.method for r in resumed] == ["GET"]
    assert resumed[0].headers["range"] == f"bytes={size_at_pause}-"
    assert "authorization" not in resumed[0].headers
    # If-Range, when sent at all, is a validator the CDN issued, so the range is honoured.
    assert resumed[0].headers.get("if-range", origin._files[blob].etag) == origin._files[blob].etag


async def test_resume_restarts_from_zero_when_the_branch_moved_to_another_version(
    client: Any, hub: Hub, origin: Origin
) -> None:
    old, new = gguf_blob(500_000, 4), gguf_blob(500_000, 5)
    hub.add_repo("owner/repo", {"model.gguf": old})
    origin.faults.throttle_bps = 300_000
    await create(client, "moved", "hf://owner/repo/model.gguf@main")
    await wait_for(client, "moved", lambda b: b["progress"]["downloaded_bytes"] > 0)
    await client.post("/v1/downloads/moved/pause")
    new_commit = hub.commit("owner/repo", {"model.gguf": new})
    origin.faults.throttle_bps = None
    await client.post("/v1/downloads/moved/resume")
    done = await wait_status(client, "moved", "completed")
    assert Path(done["local_path"]).read_bytes() == new  # never spliced with the old version
    assert done["sha256"] == sha(new)
    gets = origin.requests_for(Hub.blob_name(new))
    assert len(gets) == 1
    assert "range" not in gets[0].headers
    assert ("HEAD", f"/owner/repo/resolve/{new_commit}/model.gguf") in hub_paths(hub)


async def test_resume_continues_when_the_branch_moved_but_the_file_did_not(
    client: Any, hub: Hub, origin: Origin
) -> None:
    data = gguf_blob(500_000, 6)
    hub.add_repo("owner/repo", {"model.gguf": data})
    origin.faults.throttle_bps = 300_000
    await create(client, "same", "hf://owner/repo/model.gguf")
    await wait_for(client, "same", lambda b: b["progress"]["downloaded_bytes"] > 0)
    await client.post("/v1/downloads/same/pause")
    part = Path((await client.get("/v1/downloads/same")).json()["local_path"] + ".part")
    size_at_pause = part.stat().st_size
    new_commit = hub.commit("owner/repo", {"README.md": b"docs changed\n"})
    origin.faults.throttle_bps = None
    await client.post("/v1/downloads/same/resume")
    done = await wait_status(client, "same", "completed")
    assert Path(done["local_path"]).read_bytes() == data
    last = origin.requests_for(Hub.blob_name(data))[-1]
    assert last.headers["range"] == f"bytes={size_at_pause}-"
    assert ("HEAD", f"/owner/repo/resolve/{new_commit}/model.gguf") in hub_paths(hub)


async def test_tampered_cdn_body_fails_verification_naming_only_the_expected_digest(
    client: Any, hub: Hub, origin: Origin
) -> None:
    data = gguf_blob(400_000, 7)
    tampered = data[:-16] + b"\x00" * 16  # same size, still GGUF: only the digest can tell
    hub.add_repo("owner/repo", {"model.gguf": data})
    origin.replace_file(Hub.blob_name(data), tampered)
    message = await failed_with(client, "tampered", "hf://owner/repo/model.gguf")
    assert "Checksum mismatch" in message
    assert sha(data) in message
    assert sha(tampered) not in message  # what was fetched stays in the server log


async def test_small_files_are_served_by_the_hub_itself_with_the_token(
    client: Any, hub: Hub, origin: Origin
) -> None:
    readme = b"# model card\n" * 100
    commit = hub.add_repo("owner/repo", {"README.md": readme})
    await create(client, "card", "hf://owner/repo/README.md")
    done = await wait_status(client, "card", "completed")
    assert Path(done["local_path"]).read_bytes() == readme
    assert "sha256" not in done or done["sha256"] is None  # the hub's ETag is a git id, not sha256
    assert hub_paths(hub)[-1] == ("GET", f"/owner/repo/resolve/{commit}/README.md")
    assert all(r.headers["authorization"] == AUTH for r in hub.requests)


async def test_a_renamed_repository_is_followed_on_the_hub(client: Any, hub: Hub) -> None:
    data = gguf_blob(100_000, 8)
    hub.add_repo("owner/repo", {"model.gguf": data})
    hub.rename("owner/old-name", "owner/repo")
    await create(client, "renamed", "hf://owner/old-name/model.gguf")
    done = await wait_status(client, "renamed", "completed")
    assert Path(done["local_path"]).read_bytes() == data
    assert hub_paths(hub)[:2] == [
        ("HEAD", "/owner/old-name/resolve/main/model.gguf"),
        ("HEAD", "/owner/repo/resolve/main/model.gguf"),
    ]
    assert all(r.headers["authorization"] == AUTH for r in hub.requests)


async def test_a_verified_file_completes_again_without_the_cdn(
    client: Any, hub: Hub, origin: Origin
) -> None:
    data = gguf_blob(200_000, 9)
    hub.add_repo("owner/repo", {"model.gguf": data})
    await create(client, "again", "hf://owner/repo/model.gguf")
    await wait_status(client, "again", "completed")
    origin.requests.clear()
    await create(client, "again", "hf://owner/repo/model.gguf")
    done = await wait_status(client, "again", "completed")
    assert done["sha256"] == sha(data)
    assert origin.requests_for(Hub.blob_name(data)) == []


# --- errors, each with its own message -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "hf://owner/nope/model.gguf",
            "Repository owner/nope was not found on ENDPOINT (HTTP 404): check its name; "
            "if it is private, the configured token cannot read it.",
        ),
        ("hf://owner/repo/model.gguf@v9", "Revision 'v9' was not found in repository owner/repo."),
        (
            "hf://owner/repo/missing.gguf",
            "File 'missing.gguf' was not found in repository owner/repo at revision 'main'.",
        ),
    ],
)
async def test_missing_repo_revision_and_file_fail_at_once_with_their_own_message(
    client: Any, hub: Hub, url: str, expected: str
) -> None:
    hub.add_repo("owner/repo", {"model.gguf": gguf_blob(1000)})
    message = await failed_with(client, "missing", url)
    assert message == expected.replace("ENDPOINT", hub.base_url)
    assert len(hub.requests) == 1  # a permanent error is not retried


@pytest.mark.parametrize("token", [None])
async def test_gated_repo_without_a_token_says_to_set_hf_token(client: Any, hub: Hub) -> None:
    hub.add_repo("owner/gated", {"model.gguf": gguf_blob(1000)}, gated=True, readers=(TOKEN,))
    message = await failed_with(client, "gated", "hf://owner/gated/model.gguf")
    assert message.startswith(
        "Repository owner/gated is gated and no token is configured (HTTP 401)"
    )
    assert "set HF_TOKEN" in message
    assert f"{hub.base_url}/owner/gated" in message
    assert "authorization" not in hub.requests[0].headers


async def test_gated_repo_with_a_token_not_granted_access_says_so(client: Any, hub: Hub) -> None:
    hub.add_repo("owner/gated", {"model.gguf": gguf_blob(1000)}, gated=True)
    message = await failed_with(client, "gated", "hf://owner/gated/model.gguf")
    assert message.startswith(
        "Repository owner/gated is gated and the configured token has not been granted access "
        "(HTTP 403)"
    )
    assert "set HF_TOKEN" in message


async def test_gated_repo_downloads_with_a_token_granted_access(client: Any, hub: Hub) -> None:
    data = gguf_blob(50_000, 10)
    hub.add_repo("owner/gated", {"model.gguf": data}, gated=True, readers=(TOKEN,))
    await create(client, "gated", "hf://owner/gated/model.gguf")
    done = await wait_status(client, "gated", "completed")
    assert Path(done["local_path"]).read_bytes() == data


@pytest.mark.parametrize("token", [None])
async def test_private_repo_without_a_token_says_to_set_hf_token(client: Any, hub: Hub) -> None:
    hub.add_repo("owner/private", {"model.gguf": gguf_blob(1000)}, private=True, readers=(TOKEN,))
    message = await failed_with(client, "private", "hf://owner/private/model.gguf")
    assert message == (
        f"Repository owner/private was not found on {hub.base_url} (HTTP 401): check its name; "
        "if it is private, set HF_TOKEN (or sources.huggingface.token) to a token that can read it."
    )


@pytest.mark.parametrize("token", ["hf_not_a_real_token"])
async def test_an_invalid_token_is_reported_as_such(client: Any, hub: Hub) -> None:
    hub.add_repo("owner/repo", {"model.gguf": gguf_blob(1000)})
    message = await failed_with(client, "badtoken", "hf://owner/repo/model.gguf")
    assert message == (
        "The hub refused access to owner/repo (HTTP 401: Invalid credentials in Authorization "
        "header): set HF_TOKEN (or sources.huggingface.token) to a valid token with read access."
    )


async def test_rate_limited_hub_is_retried_after_retry_after(client: Any, hub: Hub) -> None:
    data = gguf_blob(50_000, 11)
    hub.add_repo("owner/repo", {"model.gguf": data})
    hub.faults.fail_statuses = [429]
    hub.faults.retry_after = 0
    await create(client, "limited", "hf://owner/repo/model.gguf")
    done = await wait_status(client, "limited", "completed")
    assert Path(done["local_path"]).read_bytes() == data
    assert hub_paths(hub)[:2] == [("HEAD", "/owner/repo/resolve/main/model.gguf")] * 2


async def test_rate_limited_hub_fails_after_the_retries_with_a_clear_message(
    client: Any, hub: Hub
) -> None:
    hub.add_repo("owner/repo", {"model.gguf": gguf_blob(1000)})
    hub.faults.fail_statuses = [429] * 10
    hub.faults.retry_after = 0
    message = await failed_with(client, "limited", "hf://owner/repo/model.gguf")
    assert message == (
        f"Download failed after 4 attempts: The Hugging Face hub at {hub.base_url} is rate "
        "limiting requests (HTTP 429); retrying after 0 s."
    )


async def test_malformed_hf_reference_is_a_400_naming_the_url(client: Any, hub: Hub) -> None:
    response = await client.post("/v1/downloads", json={"model_id": "bad", "url": "hf://justowner"})
    error = assert_error(response, 400, "invalid_request_error", param="url")
    assert "hf://owner/repo/path/in/repo.gguf[@revision]" in error["message"]


# --- a repository reference plus a filename pattern ----------------------------------------------

PATTERN_FILES = {
    "model-Q4_K_M.gguf": gguf_blob(40_000, 20),
    "model-Q5_K_M.gguf": gguf_blob(40_000, 21),
    "sub/model-Q8_0.gguf": gguf_blob(40_000, 22),
    "README.md": b"# card\n",
}


@pytest.mark.parametrize(
    ("pattern", "path"),
    [("*Q4_K_M.gguf", "model-Q4_K_M.gguf"), ("*q8_0.gguf", "sub/model-Q8_0.gguf"),
     ("model-Q5_K_M.gguf", "model-Q5_K_M.gguf")],
)  # fmt: skip
async def test_filename_pattern_picks_one_file_of_the_repository(
    client: Any, hub: Hub, tmp_path: Path, pattern: str, path: str
) -> None:
    hub.add_repo("owner/repo", PATTERN_FILES)
    created = await create(client, "pat", "hf://owner/repo@main", filename=pattern)
    name = path.rsplit("/", 1)[-1]
    assert created["local_path"] == str(tmp_path / "models" / "pat" / name)
    assert created["url"] == f"hf://owner/repo/{path}@main"  # the file the pattern picked
    done = await wait_status(client, "pat", "completed")
    assert Path(done["local_path"]).read_bytes() == PATTERN_FILES[path]
    assert done["sha256"] == sha(PATTERN_FILES[path])
    listing = hub.requests[0]
    assert (listing.method, listing.path) == ("GET", "/api/models/owner/repo/revision/main")
    assert listing.headers["authorization"] == AUTH


async def test_pattern_matching_several_files_is_a_400_listing_them(client: Any, hub: Hub) -> None:
    hub.add_repo("owner/repo", PATTERN_FILES)
    response = await client.post(
        "/v1/downloads",
        json={"model_id": "pat", "url": "hf://owner/repo", "filename": "*K_M.gguf"},
    )
    error = assert_error(response, 400, "invalid_request_error", param="filename")
    assert error["message"] == (
        "The filename '*K_M.gguf' matches 2 files in owner/repo@main: model-Q4_K_M.gguf, "
        "model-Q5_K_M.gguf; give a pattern that matches one model (one file, or the shards of "
        "one split GGUF)."
    )
    assert (await client.get("/v1/downloads/pat")).status_code == 404


async def test_pattern_matching_nothing_is_a_400_listing_the_files(client: Any, hub: Hub) -> None:
    hub.add_repo("owner/repo", PATTERN_FILES)
    response = await client.post(
        "/v1/downloads",
        json={"model_id": "pat", "url": "hf://owner/repo@main", "filename": "*Q2_K.gguf"},
    )
    error = assert_error(response, 400, "invalid_request_error", param="filename")
    assert error["message"] == (
        "No file in owner/repo@main matches the filename '*Q2_K.gguf'. Files: README.md, "
        "model-Q4_K_M.gguf, model-Q5_K_M.gguf, sub/model-Q8_0.gguf."
    )


async def test_repository_reference_without_filename_is_a_400_listing_the_models(
    client: Any, hub: Hub
) -> None:
    hub.add_repo("owner/repo", PATTERN_FILES)
    response = await client.post(
        "/v1/downloads", json={"model_id": "pat", "url": "hf://owner/repo"}
    )
    error = assert_error(response, 400, "invalid_request_error", param="filename")
    assert "names a repository, not a file" in error["message"]
    assert error["message"].endswith(
        "Files in owner/repo@main: model-Q4_K_M.gguf, model-Q5_K_M.gguf, sub/model-Q8_0.gguf."
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("hf://owner/nope", "Repository owner/nope was not found"),
        ("hf://owner/repo@v9", "Revision 'v9' was not found in repository owner/repo."),
    ],
)
async def test_pattern_on_a_missing_repo_or_revision_is_a_400_naming_the_url(
    client: Any, hub: Hub, url: str, expected: str
) -> None:
    hub.add_repo("owner/repo", PATTERN_FILES)
    response = await client.post(
        "/v1/downloads", json={"model_id": "pat", "url": url, "filename": "*.gguf"}
    )
    error = assert_error(response, 400, "invalid_request_error", param="url")
    assert error["message"].startswith(expected)


async def test_pattern_with_a_file_reference_is_a_400(client: Any, hub: Hub) -> None:
    response = await client.post(
        "/v1/downloads",
        json={"model_id": "pat", "url": "hf://owner/repo/a.gguf", "filename": "*.gguf"},
    )
    assert_error(response, 400, "invalid_request_error", param="filename")
    assert hub.requests == []


# --- plugin order --------------------------------------------------------------------------------


def test_hub_urls_reach_hf_source_before_http_source(tmp_path: Path) -> None:
    kernel = Kernel(hub_settings(tmp_path, None, None), load_entrypoints=False)
    assert {"hf_source", "http_source"} <= set(kernel.plugins.names())
    for ref in ("hf://o/r/m.gguf", "https://huggingface.co/o/r/resolve/main/m.gguf",
                "https://hf.co/o/r/resolve/v1/m.gguf"):  # fmt: skip
        assert isinstance(kernel.plugins.resolve_source(ref), HubSource), ref
    for ref in ("https://example.com/m.gguf", "https://huggingface.co/o/r"):
        assert isinstance(kernel.plugins.resolve_source(ref), HttpSource), ref
    with pytest.raises(InvalidRequest) as excinfo:
        kernel.plugins.resolve_source("hf://o/r/../etc/passwd")
    assert excinfo.value.param == "url"


# --- the exact requests (pytest-httpx) -----------------------------------------------------------

HF = "https://huggingface.co"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DATA = gguf_blob(4096, 30)
LFS_SHA = sha(DATA)
CDN = f"https://cdn-lfs.hf.co/repos/aa/bb/{LFS_SHA}"
SIGNED = f"{CDN}?X-Amz-Expires=3600&X-Amz-Signature=s3cr3t"


def source_for(
    ref: str, *, endpoint: str | None = None, token: str | None = "hf_pin",
    ca_bundle: str | None = None,
) -> HubSource:  # fmt: skip
    settings = Settings(
        sources=SourcesSettings(huggingface=HubSettings(endpoint=endpoint, token=token)),
        network=NetworkSettings(ca_bundle=ca_bundle),
    )
    source = hf_source.resolve_source(ref=ref, settings=settings)
    assert isinstance(source, HubSource)
    return source


def redirect_headers(location: str = SIGNED) -> dict[str, str]:
    return {
        "location": location, "x-repo-commit": COMMIT, "x-linked-size": str(len(DATA)),
        "x-linked-etag": f'"{LFS_SHA}"', "etag": f'"{LFS_SHA}"', "content-length": "0",
    }  # fmt: skip


def add_lfs_file(httpx_mock: HTTPXMock, base: str = HF, revision: str = "main") -> None:
    for rev in (revision, COMMIT):
        httpx_mock.add_response(
            method="HEAD", url=f"{base}/owner/repo/resolve/{rev}/model.gguf", status_code=302,
            headers=redirect_headers(),
        )  # fmt: skip


async def read_all(source: HubSource, offset: int = 0, validator: str | None = None) -> bytes:
    body = await source.open(offset, validator)
    try:
        return b"".join([chunk async for chunk in body.chunks()])
    finally:
        await body.aclose()


async def test_open_with_another_files_validator_restarts_without_fetching(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(method="HEAD", url=f"{HF}/owner/repo/resolve/main/model.gguf",
                            status_code=302, headers=redirect_headers())  # fmt: skip
    source = source_for("hf://owner/repo/model.gguf")
    try:
        await source.probe()
        with pytest.raises(ValidatorChanged):
            await source.open(100, '"an-older-version"')
    finally:
        await source.aclose()
    assert len(httpx_mock.get_requests()) == 1


async def test_revision_and_path_are_quoted_in_the_resolve_path(httpx_mock: HTTPXMock) -> None:
    url = f"{HF}/owner/repo/resolve/refs%2Fpr%2F1/dir/model%20file.gguf"
    httpx_mock.add_response(method="HEAD", url=url, status_code=302, headers=redirect_headers())
    source = source_for("hf://owner/repo/dir/model file.gguf@refs/pr/1")
    try:
        await source.probe()
    finally:
        await source.aclose()
    assert httpx_mock.get_requests()[0].url.raw_path == (
        b"/owner/repo/resolve/refs%2Fpr%2F1/dir/model%20file.gguf"
    )
    assert source.filename == "model file.gguf"


async def test_a_huggingface_co_url_goes_to_the_configured_mirror(httpx_mock: HTTPXMock) -> None:
    mirror = "https://mirror.example/hf"
    httpx_mock.add_response(method="HEAD", url=f"{mirror}/owner/repo/resolve/v2/model.gguf",
                            status_code=302, headers=redirect_headers())  # fmt: skip
    source = source_for(f"{HF}/owner/repo/resolve/v2/model.gguf", endpoint=mirror + "/")
    try:
        await source.probe()
    finally:
        await source.aclose()
    assert httpx_mock.get_requests()[0].headers["authorization"] == "Bearer hf_pin"


@pytest.mark.parametrize(
    ("setting", "env", "file", "sent"),
    [
        ("hf_setting", "hf_env", "hf_file", "Bearer hf_setting"),
        (None, "hf_env", "hf_file", "Bearer hf_env"),
        (None, None, "hf_file\n", "Bearer hf_file"),
        (None, None, None, None),
    ],
)
async def test_token_comes_from_settings_then_hf_token_then_the_token_file(
    httpx_mock: HTTPXMock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    setting: str | None, env: str | None, file: str | None, sent: str | None,
) -> None:  # fmt: skip
    if env is not None:
        monkeypatch.setenv("HF_TOKEN", env)
    if file is not None:
        (tmp_path / "hf-home").mkdir()
        (tmp_path / "hf-home" / "token").write_text(file)
    monkeypatch.setenv("HF_ENDPOINT", "https://env-endpoint.example")
    url = "https://env-endpoint.example/owner/repo/resolve/main/m.gguf"
    httpx_mock.add_response(method="HEAD", url=url, status_code=302, headers=redirect_headers())
    source = source_for("hf://owner/repo/m.gguf", token=setting)
    try:
        await source.probe()
    finally:
        await source.aclose()
    assert httpx_mock.get_requests()[0].headers.get("authorization") == sent


async def test_relative_redirects_stay_on_the_hub_and_absolute_ones_are_the_cdn(
    httpx_mock: HTTPXMock,
) -> None:
    moved = {"location": "/owner/repo/resolve/main/model.gguf"}
    old = f"{HF}/owner/old/resolve/main/model.gguf"
    httpx_mock.add_response(method="HEAD", url=old, status_code=307, headers=moved)
    httpx_mock.add_response(method="HEAD", url=f"{HF}/owner/repo/resolve/main/model.gguf",
                            status_code=302, headers=redirect_headers())  # fmt: skip
    source = source_for("hf://owner/old/model.gguf")
    try:
        probe = await source.probe()
    finally:
        await source.aclose()
    assert probe.sha256 == LFS_SHA
    assert [r.headers["authorization"] for r in httpx_mock.get_requests()] == ["Bearer hf_pin"] * 2


@pytest.mark.parametrize(
    ("status", "headers", "error", "text"),
    [
        (429, {"retry-after": "7"}, TransientError, "(HTTP 429); retrying after 7 s"),
        (503, {}, TransientError, "answered HTTP 503"),
        (401, {"x-error-code": "RepoNotFound"}, PermanentError, "Repository owner/repo was not"),
        (404, {"x-error-code": "RevisionNotFound"}, PermanentError, "Revision 'main' was not"),
        (404, {"x-error-code": "EntryNotFound"}, PermanentError, "File 'model.gguf' was not found"),
        (403, {"x-error-code": "GatedRepo"}, PermanentError, "is gated and the configured token"),
        (403, {"x-error-message": "Access to this resource is disabled."}, PermanentError,
         "has been disabled"),
        (403, {}, PermanentError, "The hub refused access to owner/repo (HTTP 403)"),
    ],
)  # fmt: skip
async def test_hub_error_answers_become_typed_errors(
    httpx_mock: HTTPXMock, status: int, headers: dict[str, str], error: type[Exception], text: str
) -> None:
    httpx_mock.add_response(method="HEAD", url=f"{HF}/owner/repo/resolve/main/model.gguf",
                            status_code=status, headers=headers)  # fmt: skip
    source = source_for("hf://owner/repo/model.gguf")
    try:
        with pytest.raises(error) as excinfo:
            await source.probe()
    finally:
        await source.aclose()
    assert text in str(excinfo.value)
    if status == 429:
        assert isinstance(excinfo.value, TransientError)
        assert excinfo.value.retry_after == 7.0


# --- over TLS: a loopback hub and CDN with a test CA, bodies on the fast path ---------------------


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("hf-ca"))


@pytest.fixture(scope="module")
def tls_cdn_server(test_ca: TestCA) -> Iterator[Origin]:
    with Origin(tls=test_ca.issue("cdn", ("localhost",)), host="localhost") as server:
        yield server


@pytest.fixture(scope="module")
def tls_hub_server(tls_cdn_server: Origin, test_ca: TestCA) -> Iterator[Hub]:
    with Hub(cdn=tls_cdn_server, tls=test_ca.issue("hub")) as server:
        yield server


@pytest.fixture
def tls_hub(tls_hub_server: Hub) -> Iterator[Hub]:
    """A hub on https://127.0.0.1 whose CDN is another origin, https://localhost."""
    tls_hub_server.tokens.add(TOKEN)
    try:
        yield tls_hub_server
    finally:
        tls_hub_server.cdn.reset()
        tls_hub_server.reset()


def tls_source(hub: Hub, ca: TestCA, ref: str = "hf://owner/repo/model.gguf@main") -> HubSource:
    return source_for(ref, endpoint=hub.base_url, token=TOKEN, ca_bundle=str(ca.ca_file))


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL a body was opened at on the fast path (the real function, watched)."""
    seen: list[str] = []
    real = http_source_module.open_response

    def watched(url: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(http_source_module, "open_response", watched)

    async def no_httpx(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a body was read through httpx")

    monkeypatch.setattr(HttpSource, "_open_httpx", no_httpx)
    return seen


async def test_hf_download_over_tls_takes_the_fast_path_to_the_cdn(
    tmp_path: Path, tls_hub: Hub, test_ca: TestCA, opened: list[str]
) -> None:
    from litestar.testing import AsyncTestClient

    from kernel.api.app import create_app

    data = gguf_blob(3 << 20, 40)
    commit = tls_hub.add_repo("owner/repo", {"model.gguf": data})
    settings = msgspec.structs.replace(
        hub_settings(tmp_path, tls_hub.base_url, TOKEN),
        network=NetworkSettings(ca_bundle=str(test_ca.ca_file)),
    )
    kernel = Kernel(settings, load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        await create(client, "tls-q", "hf://owner/repo/model.gguf")
        done = await wait_status(client, "tls-q", "completed", "failed")
    assert done["status"] == "completed", done
    assert done["sha256"] == sha(data)
    blob = Hub.blob_name(data)
    assert [u.split("?")[0] for u in opened] == [tls_hub.cdn.url(blob)]  # the CDN, fast path
    assert opened[0].startswith("https://localhost:")  # another host than the hub
    assert hub_paths(tls_hub) == [
        ("HEAD", "/owner/repo/resolve/main/model.gguf"),
        ("HEAD", f"/owner/repo/resolve/{commit}/model.gguf"),
    ]
    cdn = tls_hub.cdn.requests_for(blob)
    assert [r.method for r in cdn] == ["GET"]
    assert "authorization" not in cdn[0].headers


async def test_probe_and_open_send_the_token_to_the_hub_and_never_to_the_cdn(
    tls_hub: Hub, test_ca: TestCA, opened: list[str]
) -> None:
    commit = tls_hub.add_repo("owner/repo", {"model.gguf": DATA})
    source = tls_source(tls_hub, test_ca)
    try:
        probe = await source.probe()
        body = await source.open(0, None)
        assert is_blocking(body)  # the kernel pumps it in a worker thread
        await body.aclose()
        assert await read_all(source) == DATA
    finally:
        await source.aclose()
    assert probe.size == len(DATA)
    assert probe.accept_ranges
    assert probe.sha256 == LFS_SHA
    assert probe.validator == f'"{LFS_SHA}"'
    assert probe.final_url == tls_hub.resolve_url("owner/repo", commit, "model.gguf")
    assert source.commit == commit
    assert [(r.method, r.path) for r in tls_hub.requests[:2]] == [
        ("HEAD", "/owner/repo/resolve/main/model.gguf"),
        ("HEAD", f"/owner/repo/resolve/{commit}/model.gguf"),
    ]
    assert all(r.headers["authorization"] == AUTH for r in tls_hub.requests)
    cdn = tls_hub.cdn.requests_for(Hub.blob_name(DATA))
    assert cdn and all("authorization" not in r.headers for r in cdn)
    assert all("range" not in r.headers for r in cdn)
    assert all(r.headers["accept-encoding"] == "identity" for r in cdn)


async def test_resume_sends_range_and_if_range_only_with_the_cdns_own_etag(
    tls_hub: Hub, test_ca: TestCA
) -> None:
    tls_hub.add_repo("owner/repo", {"model.gguf": DATA})
    cdn_etag = tls_hub.cdn._files[Hub.blob_name(DATA)].etag
    assert cdn_etag != f'"{LFS_SHA}"'
    source = tls_source(tls_hub, test_ca)
    try:
        await source.probe()
        await read_all(source)
        body = await source.open(100, f'"{LFS_SHA}"')  # a retry within this run
        assert (body.start, body.total, body.validator) == (100, len(DATA), f'"{LFS_SHA}"')
        await body.aclose()
    finally:
        await source.aclose()
    resumed = tls_hub.cdn.requests_for(Hub.blob_name(DATA))[-1]
    assert resumed.headers["range"] == "bytes=100-"
    assert resumed.headers["if-range"] == cdn_etag  # not the LFS etag: the CDN's own
    assert "authorization" not in resumed.headers


async def test_resume_after_a_pause_sends_range_without_a_foreign_if_range(
    tls_hub: Hub, test_ca: TestCA
) -> None:
    tls_hub.add_repo("owner/repo", {"model.gguf": DATA})
    source = tls_source(tls_hub, test_ca)  # a new run: a new source
    try:
        await source.probe()
        assert await read_all(source, 100, f'"{LFS_SHA}"') == DATA[100:]
    finally:
        await source.aclose()
    resumed = tls_hub.cdn.requests_for(Hub.blob_name(DATA))[-1]
    assert resumed.headers["range"] == "bytes=100-"
    assert "if-range" not in resumed.headers


async def test_small_file_bytes_come_from_the_pinned_hub_url_with_the_token(
    tls_hub: Hub, test_ca: TestCA, opened: list[str]
) -> None:
    commit = tls_hub.add_repo("owner/repo", {"config.json": b"{}\n\n\n"})
    source = tls_source(tls_hub, test_ca, "hf://owner/repo/config.json")
    try:
        probe = await source.probe()
        assert await read_all(source) == b"{}\n\n\n"
    finally:
        await source.aclose()
    assert probe.sha256 is None
    assert probe.size == 5
    pinned = tls_hub.resolve_url("owner/repo", commit, "config.json")
    assert opened == [pinned]
    last = tls_hub.requests[-1]
    assert (last.method, last.headers["authorization"]) == ("GET", AUTH)


async def test_cdn_errors_never_show_the_signed_query(tls_hub: Hub, test_ca: TestCA) -> None:
    tls_hub.add_repo("owner/repo", {"model.gguf": DATA})
    source = tls_source(tls_hub, test_ca)
    try:
        await source.probe()
        tls_hub.cdn.faults.fail_statuses = [403]
        with pytest.raises(PermanentError) as excinfo:
            await source.open(0, None)
    finally:
        await source.aclose()
    assert tls_hub.cdn.url(Hub.blob_name(DATA)) in excinfo.value.message
    assert "X-Amz-Signature" not in excinfo.value.message


async def test_cdn_transport_errors_are_transient(test_ca: TestCA) -> None:
    gone = Origin(tls=test_ca.issue("gone"))
    gone.start()
    gone.stop()  # its URLs now point at a closed port
    with Hub(cdn=gone, tls=test_ca.issue("hub2")) as hub:
        hub.tokens.add(TOKEN)
        hub.add_repo("owner/repo", {"model.gguf": DATA})
        source = tls_source(hub, test_ca)
        try:
            await source.probe()
            with pytest.raises(TransientError) as excinfo:
                await source.open(0, None)
        finally:
            await source.aclose()
    assert "Cannot connect" in excinfo.value.message
    assert "X-Amz-Signature" not in excinfo.value.message

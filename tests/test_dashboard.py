"""The web dashboard at ``/``: served without a key, then driven in Debian's Chromium.

The browser test needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the Python
``playwright`` package (the dev extra); it is skipped, saying which is missing, without them.
Playwright only drives the system Chromium: ``playwright install`` is never needed.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from kernel.api.app import create_app
from kernel.config import AuthSettings, Settings
from kernel.core import Kernel
from tests.conftest import make_settings
from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "dash-key"
XSS = "<img src=x onerror=alert(1)>"


def secured(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path)
    settings.auth = AuthSettings(require_api_key=True, api_keys=[KEY])
    return settings


# --- serving (no browser) -------------------------------------------------------------------


async def test_the_page_and_its_files_load_without_a_key(tmp_path: Path) -> None:
    kernel = Kernel(secured(tmp_path), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/static/app.js"' in page.text
        for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
            asset = await client.get(f"/static/{name}")
            assert asset.status_code == 200
            assert kind in asset.headers["content-type"]
        assert (await client.get("/static/../../config.py")).status_code in (400, 401, 404)
        assert (await client.get("/v1/downloads")).status_code == 401  # the API still needs it


async def test_the_event_stream_takes_the_key_as_a_query_parameter(tmp_path: Path) -> None:
    kernel = Kernel(secured(tmp_path), load_entrypoints=False)
    async with AsyncTestClient(app=create_app(kernel)) as client:
        assert (await client.get("/v1/events")).status_code == 401
        assert (await client.get("/v1/events", params={"api_key": "wrong"})).status_code == 401
        assert (await client.get("/v1/downloads", params={"api_key": KEY})).status_code == 401
        # (a right key opens the endless stream; the browser test reads it)


def test_the_page_never_puts_server_strings_into_html() -> None:
    source = (Path(__file__).parents[1] / "kernel/api/static/app.js").read_text()
    script = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


# --- the browser ----------------------------------------------------------------------------


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is missing (pip install -e '.[dev]')"
    return None


@pytest.fixture
def page() -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 1400})
        finally:
            browser.close()


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_the_dashboard_shows_and_controls_live_downloads(
    page: Any, tmp_path: Path, origin: Origin
) -> None:
    origin.faults.throttle_bps = 300_000
    slow = origin.add_file("dash.bin", b"d" * 3_000_000)
    server = ServerProcess(tmp_path, config={"auth": {"require_api_key": True, "api_keys": [KEY]}})
    server.start()
    api = httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=5)
    dialogs: list[tuple[str, str]] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append((dialog.type, dialog.message))
        if dialog.type == "confirm":
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        # No key yet: the page asks for one, then goes live over SSE (?api_key= on the stream).
        page.goto(server.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key-input", KEY)
        page.click("#key-save")
        page.wait_for_selector("#conn[data-mode=live]")

        # A download started elsewhere appears and progresses.
        assert (
            api.post("/v1/downloads", json={"model_id": "watched", "url": slow}).status_code == 202
        )
        card = page.locator('.download-item[data-model-id="watched"]')
        card.wait_for()
        first = card.locator(".detail-downloaded .detail-value").inner_text()
        eventually(
            lambda: card.locator(".detail-downloaded .detail-value").inner_text() != first,
            "the downloaded bytes to move",
        )
        assert card.locator(".status").inner_text().lower() == "downloading"
        assert float(card.locator(".progress-text").inner_text().rstrip("%")) > 0

        # The pause button pauses it (the API agrees), and the card follows.
        card.locator(".btn-pause").click()
        eventually(lambda: api.get("/v1/downloads/watched").json()["status"] == "paused", "pause")
        eventually(lambda: card.locator(".status").inner_text().lower() == "paused", "paused card")
        assert card.locator(".btn-resume").is_enabled()

        # The form starts a download.
        page.fill("#create-id", "formmade")
        page.fill("#create-url", slow)
        page.click("#create-btn")
        page.locator('.download-item[data-model-id="formmade"]').wait_for()

        # Server strings are text: a URL (and so the error message) carrying HTML.
        hostile = f"{origin.base_url}/nope.bin?{XSS}"
        assert (
            api.post("/v1/downloads", json={"model_id": "hostile", "url": hostile}).status_code
            == 202
        )
        eventually(lambda: api.get("/v1/downloads/hostile").json()["status"] == "failed", "failure")
        page.check("#show-ended")
        bad = page.locator('.download-item[data-model-id="hostile"]')
        bad.wait_for()
        assert bad.locator(".url").inner_text() == hostile
        eventually(lambda: XSS in bad.locator(".error").inner_text(), "the error message")
        assert page.locator("#downloads-container img").count() == 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # Cancel all asks first; accepting it cancels everything active.
        page.click("#cancel-all-btn")
        eventually(lambda: any(kind == "confirm" for kind, _ in dialogs), "the confirmation")
        eventually(
            lambda: (
                {
                    d["model_id"]: d["status"]
                    for d in api.get("/v1/downloads", params={"status": "all"}).json()[
                        "active_downloads"
                    ]
                }
                == {"watched": "cancelled", "formmade": "cancelled", "hostile": "failed"}
            ),
            "everything cancelled",
        )
        # an earlier notice ("Started ...") may still be showing: wait for this one's text
        page.locator("#notice:not([hidden])").wait_for()
        eventually(
            lambda: page.locator("#notice").inner_text() == "Cancelled 2 download(s)",
            "the cancel-all notice",
        )
        assert dialogs == [("confirm", "Are you sure you want to cancel ALL active downloads?")]
    finally:
        api.close()
        server.stop()

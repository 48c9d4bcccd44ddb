"""The dashboard's fleet panel, in Debian's Chromium: shown by a node on the shared store
(its nodes and files from /v1/cluster/*), absent on a standalone server. Skipped without the
browser, like the other dashboard test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess
from tests.test_dashboard import eventually, page  # noqa: F401 (the browser fixture)

pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")


def test_a_fleet_node_shows_the_fleet_and_a_standalone_one_does_not(
    page: Any,  # noqa: F811
    tmp_path: Path,
    pg_dsn: str,
    origin: Origin,
) -> None:
    url = origin.add_file("dash-fleet.bin", b"f" * 200_000)
    config = {"store": {"kind": "postgres", "dsn": pg_dsn}, "fleet": {"node_id": "gpu-7"}}
    fleet_node = ServerProcess(tmp_path / "fleet", config=config)
    standalone = ServerProcess(tmp_path / "alone")
    fleet_node.start()
    standalone.start()
    try:
        created = httpx.post(
            f"{fleet_node.url}/v1/downloads", json={"model_id": "m", "url": url}, timeout=10
        )
        assert created.status_code == 202, created.text
        page.goto(fleet_node.url + "/")
        page.wait_for_selector("#cluster:not([hidden])")
        node = page.locator('.cluster-node[data-node-id="gpu-7"]')
        node.wait_for()
        assert node.locator(".node-state").inner_text() == "up"
        row = page.locator(".cluster-file")
        eventually(lambda: row.count() == 1, "the file row")
        assert row.locator(".file-url").inner_text() == url
        eventually(
            lambda: row.locator(".file-copies").inner_text() == "1/1 available, 0 failed",
            "the completed copy",
        )
        assert "gpu-7/m: completed" in row.locator(".file-nodes").inner_text()

        with page.expect_response(lambda r: r.url.endswith("/v1/cluster/nodes")) as answer:
            page.goto(standalone.url + "/")
        assert answer.value.status == 404  # no fleet here: the panel stays hidden
        page.wait_for_selector("#conn[data-mode=live]")
        assert page.locator("#cluster").is_hidden()
    finally:
        fleet_node.stop()
        standalone.stop()

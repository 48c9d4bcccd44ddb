"""Issue 17's "done when": a 3-shard model goes from ``modelkernel pull hf://...`` to a loaded
engine answering a completion, through a kill -9 of the server in the middle, byte-identical.

Everything is real: the emulated hub and its CDN on loopback, the server as a subprocess
(SQLite state), the CLI as a subprocess, gguf's split writer, and llama.cpp loading the first
shard (it finds the others beside it).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.gguf_models import tiny_split_llama
from tests.helpers.hub import Hub
from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess

REF = "hf://owner/tiny-GGUF/tiny-Q4_K_M-*.gguf"
MODEL_ID = "tiny-gguf"  # derived by the CLI from REF: the repository's name, lower-cased


@pytest.fixture
def hub(origin_server: Origin, origin: Origin) -> Iterator[Hub]:
    with Hub(cdn=origin_server) as server:
        yield server


def pull(server: ServerProcess, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kernel.cli", "pull", REF, "--server", server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip


def detail(server: ServerProcess) -> dict[str, Any] | None:
    response = httpx.get(f"{server.url}/v1/downloads/{MODEL_ID}", timeout=5)
    return response.json() if response.status_code == 200 else None


def test_a_split_model_is_pulled_through_a_kill_9_and_answers_a_completion(
    tmp_path: Path, hub: Hub, origin: Origin
) -> None:
    pytest.importorskip("llama_cpp")
    shards = tiny_split_llama(tmp_path / "written", "tiny-Q4_K_M")
    total = sum(len(b) for b in shards.values())
    hub.add_repo("owner/tiny-GGUF", {**shards, "README.md": b"# tiny\n"})
    origin.faults.throttle_bps = 25_000  # each shard's CDN body: the pull takes seconds
    config = {
        "sources": {"huggingface": {"endpoint": hub.base_url}},
        "downloads": {"retry": {"attempts": 5, "backoff_seconds": 0.1}},
    }
    server = ServerProcess(tmp_path / "server", config=config, start_timeout=60)
    server.start()
    cli = pull(server, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:  # the first run is killed with every shard part-way
            body = detail(server)
            if body is not None and body["progress"]["downloaded_bytes"] > total * 0.3:
                break
            assert time.monotonic() < deadline, f"no progress: {body}"
            time.sleep(0.05)
        server.kill()
        _, err = cli.communicate(timeout=60)
        assert cli.returncode == 3, err  # the CLI lost the server: "cannot connect"
        parts = sorted(server.models_dir.glob(f"{MODEL_ID}/*.part"))
        assert parts, "no shard was left part-way"
        assert all(p.stat().st_size < len(shards[p.name.removesuffix(".part")]) for p in parts)

        origin.requests.clear()
        origin.faults.throttle_bps = 200_000
        server.start()
        cli = pull(server, tmp_path)  # the same command again: follows the resumed download
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0, err
        first = server.models_dir / MODEL_ID / "tiny-Q4_K_M-00001-of-00003.gguf"
        assert out.strip() == f"{MODEL_ID}: completed -> {first}"
        for name in shards:  # a bar per shard was drawn
            assert name in err
        for name, data in shards.items():
            assert (server.models_dir / MODEL_ID / name).read_bytes() == data, name
        show = subprocess.run(
            [sys.executable, "-m", "kernel.cli", "show", MODEL_ID, "--server", server.url],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        for name in shards:  # show lists every file
            assert re.search(rf"^file:\s+{re.escape(name)} done 100\.0% of", show.stdout, re.M)
        ranges = [r.headers.get("range", "") for r in origin.requests if r.method == "GET"]
        assert any(r.startswith("bytes=") and not r.startswith("bytes=0-") for r in ranges)

        added = httpx.post(
            f"{server.url}/v1/models",
            json={"model_id": MODEL_ID, "model_path": str(first)},
            timeout=60,
        )
        assert added.status_code == 201, added.text
        completion = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL_ID, "prompt": "hello world", "max_tokens": 8},
            timeout=60,
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"].strip()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
        server.stop()

"""Models that are several files: a split GGUF's shards, a repository pulled with ``include``.

End to end against the emulated hub (tests/helpers/hub.py) and a real kernel (SQLite), with a
tiny llama split into 3 shards by gguf's own split writer (tests/helpers/gguf_models.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from plugins.engine_llamacpp._split import check_split, read_split
from plugins.hf_source._shards import shard_name
from kernel.config import DownloadSettings, HubSettings, RetrySettings, Settings, SourcesSettings
from kernel.errors import PermanentError, TransientError
from kernel.fileset import FileSetTransfer
from kernel.types import DownloadProgress, DownloadRecord, DownloadRetry, FileRecord, Probe
from plugins.sqlite_store.store import SqliteStore
from tests.conftest import make_settings
from tests.helpers.api import assert_error, wait_for, wait_status
from tests.helpers.gguf_models import tiny_split_llama
from tests.helpers.hub import Hub
from tests.helpers.origin import Origin

STEM = "tiny-Q4_K_M"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def hf_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return tiny_split_llama(tmp_path_factory.mktemp("split"), STEM)


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return tiny_split_llama(tmp_path_factory.mktemp("split8"), "tiny-Q8_0", seed=8)


@pytest.fixture(scope="module")
def hub_server(origin_server: Origin) -> Iterator[Hub]:
    with Hub(cdn=origin_server) as server:
        yield server


@pytest.fixture
def hub(hub_server: Hub, origin: Origin) -> Iterator[Hub]:
    try:
        yield hub_server
    finally:
        hub_server.reset()


@pytest.fixture
def settings(tmp_path: Path, hub: Hub) -> Settings:
    return msgspec.structs.replace(
        make_settings(tmp_path),
        sources=SourcesSettings(huggingface=HubSettings(endpoint=hub.base_url)),
    )


async def create(client: Any, model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/downloads", json={"model_id": model_id, "url": url, **extra})
    assert response.status_code == 202, response.text
    return response.json()


async def test_a_pattern_matching_a_split_gguf_downloads_every_shard_as_one_model(
    client: Any, hub: Hub, tmp_path: Path, shards: dict[str, bytes], other_shards: dict[str, bytes]
) -> None:
    commit = hub.add_repo("owner/split", {**shards, "tiny-Q8_0.gguf": b"GGUF", "README.md": b"x"})
    created = await create(client, "tiny", "hf://owner/split", filename="*Q4_K_M*.gguf")
    names = list(shards)
    model_dir = tmp_path / "models" / "tiny"
    assert created["url"] == "hf://owner/split"  # the user's reference; each file is pinned
    assert created["local_path"] == str(model_dir / names[0])  # what llama.cpp loads
    assert created["progress"]["total_bytes"] == sum(len(b) for b in shards.values())
    assert [f["path"] for f in created["files"]] == names
    assert [f["url"] for f in created["files"]] == [
        f"hf://owner/split/{n}@{commit}" for n in names
    ]
    done = await wait_status(client, "tiny", "completed")
    for name, data in shards.items():
        assert (model_dir / name).read_bytes() == data
        assert not os.path.exists(model_dir / f"{name}.part")
    assert [f["sha256"] for f in done["files"]] == [sha(b) for b in shards.values()]
    assert [f["status"] for f in done["files"]] == ["done"] * 3
    assert done["progress"]["downloaded_bytes"] == done["progress"]["total_bytes"]
    assert done["progress"]["percentage"] == 100.0
    listing = (await client.get("/v1/downloads", params={"status": "all"})).json()
    assert "files" not in listing["active_downloads"][0]  # the list keeps Kolosal's summary


async def test_a_startup_download_of_a_split_model_builds_its_engine_from_the_first_shard(
    client: Any, hub: Hub, shards: dict[str, bytes]
) -> None:
    pytest.importorskip("llama_cpp")
    hub.add_repo("owner/split", shards)
    created = await create(
        client, "tiny", f"hf://owner/split/{STEM}-*.gguf", engine_creation={"main_gpu_id": 0}
    )
    assert created["download_type"] == "startup"
    done = await wait_status(client, "tiny", "completed", "failed")
    assert done["status"] == "completed", done
    response = await client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 4}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].strip()


async def test_a_reference_naming_one_shard_or_a_glob_pulls_the_whole_set(
    client: Any, hub: Hub, tmp_path: Path, shards: dict[str, bytes]
) -> None:
    hub.add_repo("owner/split", shards)
    first = list(shards)[0]
    for model_id, url in (("one", f"hf://owner/split/{first}"), ("glob", "hf://owner/split/*.gguf")):
        created = await create(client, model_id, url)
        assert len(created["files"]) == 3, created
        done = await wait_status(client, model_id, "completed")
        assert Path(done["local_path"]).read_bytes() == shards[first]


async def test_pause_and_resume_cover_every_shard(
    client: Any, hub: Hub, origin: Origin, tmp_path: Path, shards: dict[str, bytes]
) -> None:
    hub.add_repo("owner/split", shards)
    # Each CDN body, 16 KiB every 0.8 s: the set is within 20-80 % for about 2.4 s.
    origin.faults.throttle_bps = 20_000
    await create(client, "tiny", "hf://owner/split", filename=f"{STEM}-*.gguf")
    total = sum(len(b) for b in shards.values())
    await wait_for(
        client, "tiny", lambda b: total * 0.2 < b["progress"]["downloaded_bytes"] < total * 0.8, 30
    )
    assert (await client.post("/v1/downloads/tiny/pause")).status_code == 200
    paused = (await client.get("/v1/downloads/tiny")).json()
    assert paused["status"] == "paused"
    parts = {f["path"]: f["downloaded_bytes"] for f in paused["files"]}
    assert {f["status"] for f in paused["files"]} <= {"pending", "done"}  # nothing running
    assert sum(parts.values()) == paused["progress"]["downloaded_bytes"]
    for f in paused["files"]:  # every file's counter is what its .part holds
        on_disk = Path(f["local_path"] + ".part")
        if f["status"] != "done" and on_disk.exists():
            assert on_disk.stat().st_size == f["downloaded_bytes"], f
    resumed = [f for f, n in parts.items() if 0 < n < len(shards[f])]
    assert resumed, parts  # paused with files part-way
    origin.faults.throttle_bps = None
    before = len(origin.requests)
    assert (await client.post("/v1/downloads/tiny/resume")).status_code == 200
    done = await wait_status(client, "tiny", "completed")
    for f in done["files"]:
        assert Path(f["local_path"]).read_bytes() == shards[f["path"]]
        assert f["sha256"] == sha(shards[f["path"]])
    ranges = [r.headers.get("range") for r in origin.requests[before:] if r.method == "GET"]
    assert sum(1 for r in ranges if r and not r.startswith("bytes=0-")) >= len(resumed)


async def test_a_set_reports_the_bytes_of_a_file_while_it_is_mid_transfer(
    client: Any, hub: Hub, origin: Origin
) -> None:
    """The set's counters follow the bytes as they land in any file, not as files end: a slow
    origin once made its files' bytes arrive in 64 KiB steps, so a file smaller than that
    showed nothing until it was complete."""
    piece = 16 * 1024  # what the throttled origin sends at a time
    files = {f"part-{i}.bin": hashlib.shake_256(bytes([i])).digest(3 * piece) for i in range(3)}
    hub.add_repo("owner/parts", files)
    patched = await client.patch("/v1/settings", json={"downloads": {"connections": 1}})
    assert patched.status_code == 200  # one file at a time: the set's sums are exact boundaries
    origin.faults.throttle_bps = 3 * piece  # each file takes about a second
    started = time.monotonic()
    with client.kernel.bus.subscribe() as events:
        await create(client, "parts", "hf://owner/parts", include=["*.bin"])
        boundaries = {0, 3 * piece, 6 * piece, 9 * piece}
        seen: list[int] = []

        def mid_file(body: dict[str, Any]) -> bool:
            seen.append(body["progress"]["downloaded_bytes"])
            running = [f for f in body["files"] if 0 < f["downloaded_bytes"] < f["total_bytes"]]
            return (
                body["status"] == "downloading"
                and len(running) == 1
                and seen[-1] not in boundaries
                and seen[-1] == sum(f["downloaded_bytes"] for f in body["files"])
            )

        body = await wait_for(
            client, "parts", lambda b: mid_file(b) or b["status"] != "downloading", 20
        )
        assert body["status"] == "downloading", f"no progress within a file: {sorted(set(seen))}"
        done = await wait_status(client, "parts", "completed", timeout=20)
        took = time.monotonic() - started
        published = [events.queue.get_nowait().event for _ in range(events.queue.qsize())]
    assert [*seen, done["progress"]["downloaded_bytes"]] == [*sorted(seen), 9 * piece]
    assert [f["sha256"] for f in done["files"]] == [sha(b) for b in files.values()]
    progress = [
        e.record.downloaded_bytes
        for e in published
        if isinstance(e, DownloadProgress) and e.record.model_id == "parts"
    ]
    assert progress == sorted(progress)
    assert 3 <= len(progress) <= 4 * took + 1  # at most 4 a second


async def test_cancel_removes_every_part_and_purge_every_file(
    client: Any, hub: Hub, origin: Origin, tmp_path: Path, shards: dict[str, bytes]
) -> None:
    hub.add_repo("owner/split", shards)
    origin.faults.throttle_bps = 20_000
    created = await create(client, "tiny", "hf://owner/split/*.gguf")
    await wait_for(client, "tiny", lambda b: b["progress"]["downloaded_bytes"] > 10_000)
    assert (await client.delete("/v1/downloads/tiny")).status_code == 200
    for f in created["files"]:
        assert not os.path.exists(f["local_path"] + ".part")
    origin.faults.throttle_bps = None
    await create(client, "tiny", "hf://owner/split/*.gguf")
    await wait_status(client, "tiny", "completed")
    response = await client.delete("/v1/downloads/tiny", params={"purge": "true", "delete_file": "true"})
    assert response.json()["file_deleted"] is True
    assert not any(os.path.exists(f["local_path"]) for f in created["files"])


async def test_two_quantisations_matched_by_one_pattern_are_a_400_listing_them(
    client: Any, hub: Hub, shards: dict[str, bytes], other_shards: dict[str, bytes]
) -> None:
    hub.add_repo("owner/split", {**shards, **other_shards})
    response = await client.post(
        "/v1/downloads", json={"model_id": "m", "url": "hf://owner/split", "filename": "tiny-*"}
    )
    error = assert_error(response, 400, "invalid_request_error", param="filename")
    assert "matches 6 files" in error["message"]
    for name in [*shards, *other_shards]:
        assert name in error["message"]
    response = await client.post("/v1/downloads", json={"model_id": "m", "url": "hf://owner/split/*.gguf"})
    error = assert_error(response, 400, "invalid_request_error", param="url")
    assert "6 files of 2 models" in error["message"]
    assert (await client.get("/v1/downloads/m")).status_code == 404


async def test_a_shard_missing_from_the_repository_is_a_400_naming_it(
    client: Any, hub: Hub, shards: dict[str, bytes]
) -> None:
    names = list(shards)
    hub.add_repo("owner/split", {n: shards[n] for n in (names[0], names[2])})
    response = await client.post(
        "/v1/downloads", json={"model_id": "m", "url": f"hf://owner/split/{names[0]}"}
    )
    error = assert_error(response, 400, "invalid_request_error", param="url")
    assert error["message"] == (
        f"The split model {STEM} has 3 shards but owner/split@main lacks 1 of them: {names[1]}."
    )


async def test_shards_whose_split_metadata_disagree_fail_at_verification(
    client: Any, hub: Hub, shards: dict[str, bytes]
) -> None:
    first, second, _ = shards.values()  # two shards of a 3-shard model, named as a 2-shard set
    hub.add_repo(
        "owner/split", {"bad-00001-of-00002.gguf": first, "bad-00002-of-00002.gguf": second}
    )
    await create(client, "bad", "hf://owner/split/bad-*.gguf")
    failed = await wait_status(client, "bad", "failed", "completed")
    assert failed["status"] == "failed"
    assert failed["error_message"] == (
        "The model is split into 3 shards (split.count in bad-00001-of-00002.gguf) but the "
        "download has 2 (bad-00001-of-00002.gguf, bad-00002-of-00002.gguf): 1 shard(s) missing."
    )


REPO_FILES = {
    "config.json": b'{"model_type": "bert"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": hashlib.shake_256(b"weights").digest(300_000),
    "onnx/model.onnx": hashlib.shake_256(b"onnx").digest(50_000),
    "README.md": b"# card\n",
}


async def test_include_patterns_pull_the_files_of_a_repository_as_one_model(
    client: Any, hub: Hub, tmp_path: Path
) -> None:
    commit = hub.add_repo("owner/bert", REPO_FILES)
    created = await create(
        client, "bert", "hf://owner/bert", include=["*.json", "*.safetensors", "onnx/*"]
    )
    model_dir = tmp_path / "models" / "bert"
    assert created["local_path"] == str(model_dir)  # no GGUF: engines get the directory
    paths = ["config.json", "model.safetensors", "onnx/model.onnx", "tokenizer.json"]
    assert [f["path"] for f in created["files"]] == paths
    assert created["files"][0]["url"] == f"hf://owner/bert/config.json@{commit}"
    wanted = sum(len(REPO_FILES[p]) for p in paths)
    assert created["progress"]["total_bytes"] == wanted
    done = await wait_status(client, "bert", "completed")
    for path in paths:
        assert (model_dir / path).read_bytes() == REPO_FILES[path]
    assert not (model_dir / "README.md").exists()
    assert done["files"][1]["sha256"] == sha(REPO_FILES["model.safetensors"])  # an LFS file


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"include": ["*.bin"]}, "include", "matches the include pattern '*.bin'"),
        ({"include": []}, "include", "include must be a list of 1 to 100"),
        ({"include": ["*.json"], "filename": "*.json"}, "include", "and no filename"),
        ({"include": ["*.json"], "url": "hf://owner/bert/config.json"}, "include", "and no filename"),
    ],
)
async def test_bad_include_requests_are_400s(
    client: Any, hub: Hub, body: dict[str, Any], param: str, fragment: str
) -> None:
    hub.add_repo("owner/bert", REPO_FILES)
    response = await client.post(
        "/v1/downloads", json={"model_id": "bert", "url": "hf://owner/bert", **body}
    )
    error = assert_error(response, 400, "invalid_request_error", param=param)
    assert fragment in error["message"]


async def test_include_matching_two_gguf_models_is_a_400(
    client: Any, hub: Hub, shards: dict[str, bytes]
) -> None:
    hub.add_repo("owner/split", {**shards, "tiny-F16.gguf": b"GGUF"})
    response = await client.post(
        "/v1/downloads",
        json={"model_id": "m", "url": "hf://owner/split", "include": ["*.gguf"]},
    )
    error = assert_error(response, 400, "invalid_request_error", param="include")
    assert "GGUF files of 2 models" in error["message"]


# --- the pieces ----------------------------------------------------------------------------------


def test_split_metadata_is_read_from_every_shard(tmp_path: Path, shards: dict[str, bytes]) -> None:
    paths = []
    for name, data in shards.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    assert [read_split(p) for p in paths] == [(0, 3), (1, 3), (2, 3)]
    check_split(paths)
    with pytest.raises(PermanentError, match=r"split into 3 shards .* 1 shard\(s\) missing"):
        check_split(paths[:2])
    with pytest.raises(PermanentError, match=r"says it is shard 3 of 3 \(split.no = 2\), not shard 2"):
        check_split([paths[0], paths[2], paths[1]])
    plain = tmp_path / "plain.gguf"
    plain.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    assert read_split(str(plain)) is None
    with pytest.raises(PermanentError, match="no split.count / split.no metadata"):
        check_split([str(plain), paths[1]])
    hostile = tmp_path / "hostile-00001-of-00002.gguf"
    hostile.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1 << 62).to_bytes(8, "little"))
    with pytest.raises(PermanentError, match=r"shard hostile-00001-of-00002.gguf: its header claims"):
        check_split([str(hostile), paths[1]])
    hostile.write_bytes(shards[list(shards)[0]][:200])  # cut inside the key/value header
    with pytest.raises(PermanentError, match="its header ends early"):
        check_split([str(hostile), paths[1]])


def test_shard_names() -> None:
    shard = shard_name("sub/Model-Q4_K_M-00002-of-00003.gguf")
    assert shard is not None
    assert (shard.prefix, shard.no, shard.count) == ("sub/Model-Q4_K_M", 2, 3)
    assert shard_name("model-00004-of-00003.gguf") is None
    assert shard_name("model-Q4_K_M.gguf") is None


async def test_records_saved_before_file_sets_still_load(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    old = msgspec.json.encode(
        {"model_id": "old", "url": "https://x/y.gguf", "local_path": "/m/old/y.gguf",
         "status": "completed", "total_bytes": 5, "downloaded_bytes": 5}
    )  # fmt: skip
    try:
        await store.load_all()  # creates the schema

        def insert() -> None:
            conn = store._connect()
            conn.execute("INSERT INTO downloads(model_id, record) VALUES (?, ?)", ("old", old))

        await store._call(insert)
        [loaded] = await store.load_all()
        assert loaded.files is None and loaded.status == "completed"
        assert loaded.part_paths() == ["/m/old/y.gguf.part"]
        rec = DownloadRecord(model_id="new", url="hf://o/r", local_path="/m/new")
        await store.save(rec)
        assert {r.model_id for r in await store.load_all()} == {"old", "new"}
    finally:
        await store.close()


async def test_a_file_set_record_round_trips_through_the_store(tmp_path: Path) -> None:
    files = [
        FileRecord(path="a-00001-of-00002.gguf", url="hf://o/r/a-00001-of-00002.gguf@c",
                   local_path="/m/x/a-00001-of-00002.gguf", size=10, downloaded_bytes=4,
                   status="downloading", validator='"v"', segments=[[0, 10, 4]]),
        FileRecord(path="a-00002-of-00002.gguf", url="hf://o/r/a-00002-of-00002.gguf@c",
                   local_path="/m/x/a-00002-of-00002.gguf", size=7, status="done", sha256="ab" * 32),
    ]  # fmt: skip
    rec = DownloadRecord(model_id="x", url="hf://o/r/a-*.gguf", local_path=files[0].local_path,
                         files=files, total_bytes=17, downloaded_bytes=11)  # fmt: skip
    store = SqliteStore(tmp_path / "state.db")
    try:
        await store.save(rec)
    finally:
        await store.close()
    again = SqliteStore(tmp_path / "state.db")
    try:
        [loaded] = await again.load_all()
    finally:
        await again.close()
    assert loaded == rec
    assert loaded.part_paths() == [f.local_path + ".part" for f in files]


# --- the coordinator on its own: parallelism, failures, retries -----------------------------------


class _GatedBody:
    def __init__(self, source: _GatedSource, offset: int) -> None:
        self.source, self.start = source, offset
        self.total: int | None = len(source.data)
        self.validator: str | None = '"v"'

    async def chunks(self) -> AsyncIterator[bytes]:
        await self.source.gate.wait()
        yield self.source.data[self.start :]

    async def aclose(self) -> None:
        self.source.open_now -= 1


class _GatedSource:
    def __init__(self, ref: str, data: bytes, gate: asyncio.Event, peak: list[int],
                 everyone: list[_GatedSource], fail: list[Exception]) -> None:  # fmt: skip
        self.ref, self.data, self.gate, self.peak, self.all = ref, data, gate, peak, everyone
        self.fail = fail
        self.open_now = 0
        everyone.append(self)

    async def probe(self) -> Probe:
        return Probe(size=len(self.data), validator='"v"', accept_ranges=True)

    async def open(self, offset: int, validator: str | None) -> _GatedBody:
        if self.fail:
            raise self.fail.pop(0)
        self.open_now += 1
        self.peak[0] = max(self.peak[0], sum(s.open_now for s in self.all))
        return _GatedBody(self, offset)

    async def aclose(self) -> None:
        pass


def _file_set(tmp_path: Path, n: int) -> tuple[DownloadRecord, dict[str, bytes]]:
    blobs = {f"mem://f{i}": hashlib.shake_256(b"%d" % i).digest(10_000 + i) for i in range(n)}
    files = [
        FileRecord(path=f"f{i}.bin", url=f"mem://f{i}", local_path=str(tmp_path / f"f{i}.bin"),
                   size=len(blobs[f"mem://f{i}"]))
        for i in range(n)
    ]  # fmt: skip
    rec = DownloadRecord(model_id="set", url="mem://set", local_path=str(tmp_path), files=files)
    return rec, blobs


async def test_files_run_in_parallel_within_the_connection_budget(tmp_path: Path) -> None:
    rec, blobs = _file_set(tmp_path, 5)
    gate, peak, everyone = asyncio.Event(), [0], []  # type: ignore[var-annotated]
    settings = DownloadSettings(connections=2, retry=RetrySettings(attempts=0))
    transfer = FileSetTransfer(
        rec, lambda ref: _GatedSource(ref, blobs[ref], gate, peak, everyone, []), settings  # type: ignore[arg-type,return-value]
    )
    task = asyncio.create_task(transfer.run())
    async with asyncio.timeout(30):
        while sum(s.open_now for s in everyone) < 2:  # the budget's worth of bodies is open
            await asyncio.sleep(0.01)
    gate.set()
    async with asyncio.timeout(30):
        await task
    assert peak[0] == 2  # never more than the budget at once
    assert rec.files is not None
    for f in rec.files:
        assert Path(f.local_path).read_bytes() == blobs[f.url]
        assert (f.status, f.downloaded_bytes) == ("done", f.size)
    assert rec.total_bytes == rec.downloaded_bytes == sum(len(b) for b in blobs.values())


async def test_a_transient_fault_is_retried_and_a_permanent_one_fails_the_set(
    tmp_path: Path,
) -> None:
    rec, blobs = _file_set(tmp_path, 3)
    gate, peak, everyone = asyncio.Event(), [0], []  # type: ignore[var-annotated]
    gate.set()
    faults = {"mem://f1": [TransientError("reset", reason="network")]}
    settings = DownloadSettings(connections=4, retry=RetrySettings(attempts=2, backoff_seconds=0))
    retries: list[DownloadRetry] = []

    def source(ref: str) -> _GatedSource:
        return _GatedSource(ref, blobs[ref], gate, peak, everyone, faults.get(ref, []))

    await FileSetTransfer(rec, source, settings, on_retry=retries.append).run()  # type: ignore[arg-type]
    assert [(r.model_id, r.attempt, r.reason) for r in retries] == [(rec.model_id, 1, "network")]
    assert rec.downloaded_bytes == rec.total_bytes

    rec, blobs = _file_set(tmp_path / "second", 3)
    gate.clear()  # the other files hang until the failure stops them
    faults = {"mem://f2": [PermanentError("Not found (HTTP 404): mem://f2")]}
    with pytest.raises(PermanentError, match="HTTP 404"):
        async with asyncio.timeout(30):
            await FileSetTransfer(rec, source, settings).run()  # type: ignore[arg-type]
    assert rec.files is not None
    assert [f.status for f in rec.files] != ["done"] * 3
    assert sum(s.open_now for s in everyone) == 0  # every other file was stopped

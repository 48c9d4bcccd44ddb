"""The docs match the code: every hook, every setting, every route, the test command, and the
tutorial's plugin and snippets actually work."""

from __future__ import annotations

import asyncio
import inspect
import re
import sys
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

import kernel.hookspecs
from kernel.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# API.md Part 1 (the Kolosal endpoints); re-read from API.md itself when it is at hand.
PART1 = [
    "GET /v1/downloads",
    "GET /v1/downloads/{id}",
    "DELETE /v1/downloads/{id}",
    "POST /v1/downloads/{id}/cancel",
    "POST /v1/downloads/{id}/pause",
    "POST /v1/downloads/{id}/resume",
    "DELETE /v1/downloads",
    "POST /v1/downloads/cancel",
    "POST /v1/downloads",
]
API_MD = [ROOT / "shared" / "API.md", ROOT.parent / "shared" / "API.md"]
ENDPOINT = re.compile(r"`(GET|POST|DELETE|PATCH|PUT) (/[^`\s]*)`")
PACKAGE = "modelkernel_file_source"


def read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


# --- (1) every hook has a docstring and a section in docs/plugins/hooks.md -------------------

HOOKS = {
    name: fn
    for name, fn in vars(kernel.hookspecs).items()
    if callable(fn) and getattr(fn, "modelkernel_spec", None) is not None
}


def test_hookspecs_are_found() -> None:
    assert {"resolve_source", "open_store", "on_event"} <= set(HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_has_a_docstring_and_a_section(name: str) -> None:
    assert (HOOKS[name].__doc__ or "").strip(), f"hookspec {name} has no docstring"
    hooks_md = read("docs/plugins/hooks.md")
    assert re.search(rf"^## {name}$", hooks_md, re.M), f"no '## {name}' in docs/plugins/hooks.md"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_section_shows_the_real_signature(name: str) -> None:
    spec = HOOKS[name]
    first = spec.modelkernel_spec["firstresult"]
    decorator = "@hookspec(firstresult=True)" if first else "@hookspec"
    signature = f"def {name}{inspect.signature(spec)}".replace("'", "")
    block = code_blocks(section(read("docs/plugins/hooks.md"), f"## {name}"), "python")[0]
    assert block.strip() == f"{decorator}\n{signature}"


def test_hooks_md_documents_no_hook_that_does_not_exist() -> None:
    headings = re.findall(r"^## ([a-z_]+)$", read("docs/plugins/hooks.md"), re.M)
    assert set(headings) == set(HOOKS)


# --- (2) every setting is in docs/configuration.md --------------------------------------------


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    """The Struct a field holds (``Annotated`` and ``| None`` looked through), else None."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    members = [t for t in typing.get_args(tp) if t is not type(None)]
    if isinstance(tp, types.UnionType) and len(members) == 1:
        tp = members[0]
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def setting_keys(
    struct: type[msgspec.Struct] = Settings, prefix: str = ""
) -> Iterator[tuple[str, bool]]:
    """(dotted key, settable from the environment) for every leaf setting; the items of a
    list of Structs (``models``) appear as ``models[].id``."""
    for field in msgspec.structs.fields(struct):
        key = prefix + field.encode_name
        if (inner := _struct_of(field.type)) is not None:
            yield from setting_keys(inner, key + ".")
            continue
        args = typing.get_args(field.type)
        if typing.get_origin(field.type) is list and args and (item := _struct_of(args[0])):
            yield key, False
            for sub, _ in setting_keys(item, key + "[]."):
                yield sub, False
            continue
        yield key, "[]" not in prefix


SETTINGS = sorted(setting_keys())


def test_settings_are_found() -> None:
    assert ("downloads.retry.attempts", True) in SETTINGS


@pytest.mark.parametrize(("key", "from_env"), SETTINGS)
def test_every_setting_is_documented(key: str, from_env: bool) -> None:
    doc = read("docs/configuration.md")
    assert f"`{key}`" in doc, f"`{key}` is not in docs/configuration.md"
    if from_env:
        env = "MODELKERNEL_" + key.upper().replace(".", "__")
        assert f"`{env}`" in doc, f"`{env}` is not in docs/configuration.md"


def test_every_yaml_example_is_a_valid_config(tmp_path: Path) -> None:
    for index, block in enumerate(code_blocks(read("docs/configuration.md"), "yaml")):
        (tmp_path / f"{index}.yaml").write_text(block)
        load_settings(tmp_path / f"{index}.yaml", environ={})


def test_the_yaml_and_toml_examples_load_and_agree(tmp_path: Path) -> None:
    examples = section(read("docs/configuration.md"), "## Examples")
    (tmp_path / "c.yaml").write_text(code_blocks(examples, "yaml")[0])
    (tmp_path / "c.toml").write_text(code_blocks(examples, "toml")[0])
    from_yaml = load_settings(tmp_path / "c.yaml", environ={})
    assert from_yaml == load_settings(tmp_path / "c.toml", environ={})
    assert from_yaml != Settings()


# --- (3) the README's test command is CI's -----------------------------------------------------


def test_readme_has_the_ci_test_command() -> None:
    readme = read("README.md")
    assert "python -m pytest -q" in readme
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        for line in ci.read_text().splitlines():
            if line.strip().startswith("python -m pytest"):
                assert line.strip() in readme, f"README lacks CI's test command {line.strip()!r}"


# --- (4) every endpoint is in docs/api.md -------------------------------------------------------


def part1_endpoints() -> list[str]:
    for path in API_MD:
        if path.exists():
            text = path.read_text(encoding="utf-8")
            part1 = section(text, "## Part 1: Kolosal endpoints (seed)")
            found = [f"{method} {route}" for method, route in ENDPOINT.findall(part1)]
            assert found, f"no endpoints found in Part 1 of {path}"
            return sorted(set(found) | set(PART1))
    return PART1


@pytest.mark.parametrize("endpoint", part1_endpoints())
def test_every_kolosal_endpoint_is_in_api_md(endpoint: str) -> None:
    assert f"`{endpoint}`" in read("docs/api.md"), f"`{endpoint}` is not in docs/api.md"


def app_endpoints() -> list[str]:
    """Every METHOD + path the app serves, in its /v1 form, ids written ``{id}``."""
    from kernel.api.app import create_app
    from kernel.core import Kernel

    app = create_app(Kernel(Settings(), load_entrypoints=False))
    paths = {route.path for route in app.routes}
    found = set()
    for route in app.routes:
        path = route.path
        if path in ("/schema/{path:str}", "/schema/oauth2-redirect.html"):
            continue
        if not path.startswith("/v1") and "/v1" + path in paths:
            path = "/v1" + path
        path = re.sub(r"\{\w+(:\w+)?\}", "{id}", path)
        for method in getattr(route, "methods", ()):
            if method not in ("OPTIONS", "HEAD"):
                found.add(f"{method} {path}")
    return sorted(found)


@pytest.mark.parametrize("endpoint", app_endpoints())
def test_every_route_the_app_serves_is_in_api_md(endpoint: str) -> None:
    assert re.search(rf"`{re.escape(endpoint)}[`?]", read("docs/api.md")), (
        f"`{endpoint}` is served but not documented in docs/api.md"
    )


# --- the plugin tutorial's code works ------------------------------------------------------------


@pytest.fixture
def file_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The tutorial's package, written out from docs/plugins/tutorial.md and imported."""
    package_dir = tmp_path / "pkg"
    for block in code_blocks(read("docs/plugins/tutorial.md"), "python"):
        first = block.splitlines()[0]
        if first.startswith(f"# {PACKAGE}/"):
            target = package_dir / first.removeprefix("# ")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block)
    monkeypatch.syspath_prepend(str(package_dir))
    try:
        yield __import__(PACKAGE)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def test_the_tutorial_pyproject_declares_the_entry_point() -> None:
    (block,) = [b for b in code_blocks(read("docs/plugins/tutorial.md"), "toml")
                if b.startswith("# pyproject.toml")]
    entry_points = tomllib.loads(block)["project"]["entry-points"]["modelkernel"]
    assert entry_points == {"file_source": PACKAGE}


async def test_the_tutorial_plugin_downloads_a_file(
    file_source: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel.config import StorageSettings
    from kernel.core import Kernel
    from kernel.errors import InvalidRequest
    from kernel.types import TERMINAL

    data = bytes(range(256)) * 3000
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(data)
    monkeypatch.setenv("FILE_SOURCE_ROOT", str(tmp_path / "src"))
    settings = Settings(storage=StorageSettings(
        models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state")))
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[file_source])
    await kernel.start()
    try:
        with pytest.raises(InvalidRequest):
            await kernel.downloads.create(model_id="out", url="file:///etc/hostname")
        await kernel.downloads.create(model_id="local", url=f"file://{tmp_path}/src/weights.bin")
        with kernel.bus.subscribe() as events:
            async with asyncio.timeout(5):
                while (rec := kernel.downloads.get("local")).status not in TERMINAL:
                    await events.get()
    finally:
        await kernel.stop()
    assert rec.status == "completed", rec.error_message
    assert Path(rec.local_path) == tmp_path / "models" / "local" / "weights.bin"
    assert await asyncio.to_thread(Path(rec.local_path).read_bytes) == data


async def test_the_tutorial_source_gets_segmented_downloads_by_declaring_ranges(
    file_source: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tutorial's FileSource declares RangedSource (supports_segments, open(end=)): with
    several connections allowed, a large file takes the segmented path and arrives whole."""
    from structlog.testing import capture_logs

    from kernel.config import DownloadSettings, StorageSettings
    from kernel.core import Kernel
    from kernel.types import TERMINAL, NamedSource, RangedSource

    data = bytes(range(256)) * (12 << 10)  # 3 MiB
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.bin").write_bytes(data)
    monkeypatch.setenv("FILE_SOURCE_ROOT", str(tmp_path / "src"))
    url = f"file://{tmp_path}/src/big.bin"
    source = file_source.FileSource(url, tmp_path / "src")
    assert isinstance(source, RangedSource)
    assert isinstance(source, NamedSource)
    settings = Settings(
        storage=StorageSettings(
            models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state")
        ),
        downloads=DownloadSettings(connections=4, segment_min_bytes=1 << 20),
    )
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[file_source])
    await kernel.start()
    try:
        with capture_logs() as logs:
            await kernel.downloads.create(model_id="big", url=url)
            with kernel.bus.subscribe() as events:
                async with asyncio.timeout(10):
                    while (rec := kernel.downloads.get("big")).status not in TERMINAL:
                        await events.get()
    finally:
        await kernel.stop()
    assert rec.status == "completed", rec.error_message
    assert any(e["event"] == "download.segmented" for e in logs)
    assert await asyncio.to_thread(Path(rec.local_path).read_bytes) == data


def snippets() -> list[Any]:
    """Every complete Python example in the plugin docs outside the tutorial's package."""
    found = []
    for doc in ("docs/plugins/tutorial.md", "docs/plugins/testing.md"):
        for index, block in enumerate(code_blocks(read(doc), "python")):
            if not block.startswith(f"# {PACKAGE}/"):
                found.append(pytest.param(doc, index, block, id=f"{Path(doc).stem}-{index}"))
    return found


@pytest.mark.parametrize(("doc", "index", "block"), snippets())
def test_every_plugin_snippet_runs(
    file_source: ModuleType, doc: str, index: int, block: str
) -> None:
    """Each example imports what it names and defines what it shows (nothing is called)."""
    exec(compile(block, f"{doc} block {index}", "exec"), {"__name__": f"snippet_{index}"})

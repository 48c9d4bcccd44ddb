"""The docs match the code: every hook, every setting, every route, the test command, and the
tutorial's plugin and snippets actually work."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

import kernel.hookspecs
import kernel.types
from kernel.config import Settings, load_settings
from kernel.types import TERMINAL, DownloadRecord

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


# --- (5) docs/plugins/ describes exactly the declared capabilities ----------------------------
# Every Protocol and Struct of kernel.types is documented in docs/plugins/hooks.md, member by
# member, written as the code declares it: ``name: type`` (an attribute or a property, a Struct
# field with ``= default``), ``[async ]name(params) -> return``. A Protocol has a ``### Name``
# section whose first table column lists its members, or a row ``| `Name` | members | ... |``
# (an optional capability) whose members the section around it may share (a PickingSource's
# ``ref`` is the Source's).


def _shown(value: Any) -> str:
    """A default as the docs write it: strings in double quotes."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _method(name: str, fn: Any) -> str:
    signature = inspect.signature(fn)
    params: list[str] = []
    for param in list(signature.parameters.values())[1:]:  # without self
        if param.kind is param.KEYWORD_ONLY and "*" not in params:
            params.append("*")
        default = "" if param.default is param.empty else f" = {_shown(param.default)}"
        params.append(f"{param.name}: {param.annotation}{default}")
    prefix = "async " if inspect.iscoroutinefunction(fn) else ""
    return f"{prefix}{name}({', '.join(params)}) -> {signature.return_annotation}"


def declared_members(cls: type) -> dict[str, str]:
    """Every public member ``cls`` and its kernel.types bases declare, rendered as the docs
    show it (annotations are the strings written in kernel/types.py)."""
    members: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ != "kernel.types":
            continue
        defaults = {}
        if issubclass(klass, msgspec.Struct):
            for field in msgspec.structs.fields(klass):
                if field.default is not msgspec.NODEFAULT:
                    defaults[field.name] = f" = {_shown(field.default)}"
                elif field.default_factory is not msgspec.NODEFAULT:
                    defaults[field.name] = f" = {_shown(field.default_factory())}"
        for name, annotation in inspect.get_annotations(klass).items():
            members[name] = f"{name}: {annotation}{defaults.get(name, '')}"
        for name, value in vars(klass).items():
            if isinstance(value, property):
                members[name] = f"{name}: {inspect.signature(value.fget).return_annotation}"
            elif inspect.isfunction(value):
                members[name] = _method(name, value)
    return {name: shown for name, shown in members.items() if not name.startswith("_")}


CONTRACT = {
    name: declared_members(obj)
    for name in kernel.types.__all__
    if isinstance(obj := vars(kernel.types)[name], type)
    and (issubclass(obj, typing.Protocol) or issubclass(obj, msgspec.Struct))
}
PLUGIN_DOCS = sorted((DOCS / "plugins").glob("*.md"))


def table_rows(text: str) -> Iterator[tuple[str, list[str]]]:
    """(the heading above it, its cells) for every table row (an escaped bar is a bar)."""
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not re.fullmatch(r"[|\-: ]+", line):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            yield heading, [cell.strip().replace("\\|", "|") for cell in cells]


def spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def row_class(cells: list[str]) -> str | None:
    """The Protocol or Struct a row is about: its first cell starts with its name."""
    found = re.match(r"`([A-Z]\w*)`", cells[0])
    return found.group(1) if found and found.group(1) in CONTRACT else None


def documented_members(text: str) -> dict[str, tuple[set[str], set[str]]]:
    """Per class: (members its own section or row shows, members of the section around its
    row)."""
    rows = list(table_rows(text))
    in_section: dict[str, set[str]] = {}
    for heading, cells in rows:
        if heading in CONTRACT and row_class(cells) is None:
            in_section.setdefault(heading, set()).update(spans(cells[0]))
    found = {name: (shown, set[str]()) for name, shown in in_section.items()}
    for heading, cells in rows:
        if (name := row_class(cells)) is not None and name not in found:
            found[name] = (set(spans(cells[1])), in_section.get(heading, set()))
    return found


def test_the_contract_is_found() -> None:
    assert {"Source", "RangedSource", "Body", "Probe", "EngineBackend"} <= set(CONTRACT)
    assert CONTRACT["RangedSource"]["open"] == (
        "async open(offset: int, validator: str | None, end: int | None = None) -> Body"
    )
    assert CONTRACT["CheckingBackend"]["check"] == (
        'check(spec: EngineSpec, *, prefix: str = "") -> None'
    )
    assert CONTRACT["EngineSpec"]["loading_parameters"] == (
        "loading_parameters: dict[str, Any] = {}"
    )


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_every_declared_capability_is_documented_member_by_member(name: str) -> None:
    documented = documented_members(read("docs/plugins/hooks.md"))
    assert name in documented, f"{name} has no '### {name}' section or table row in hooks.md"
    own, around = documented[name]
    missing = sorted(set(CONTRACT[name].values()) - own - around)
    assert missing == [], f"hooks.md does not show these members of {name} as declared"


@pytest.mark.parametrize("doc", PLUGIN_DOCS, ids=lambda p: p.name)
def test_the_plugin_docs_show_no_member_that_is_not_declared(doc: Path) -> None:
    """Every member a capability's row or section lists exists, with that exact signature."""
    wrong = []
    for heading, cells in table_rows(doc.read_text(encoding="utf-8")):
        if (name := row_class(cells)) is not None:
            shown = spans(cells[1])
        elif heading in CONTRACT:
            name, shown = heading, spans(cells[0])
        else:
            continue
        wrong += [f"{name}: {s}" for s in shown if s not in CONTRACT[name].values()]
    assert wrong == []


def test_every_capability_the_plugin_docs_name_exists() -> None:
    """A Source, Body, Backend, Engine, Store... named in the docs is one kernel.types
    declares, or a class the docs' own examples define (FileSource)."""
    def kind(name: str) -> str:  # the last word: RangedSource -> Source
        return re.findall(r"[A-Z][a-z]*", name)[-1]

    kinds = {kind(name) for name in CONTRACT}
    texts = [doc.read_text(encoding="utf-8") for doc in PLUGIN_DOCS]
    examples = {c for text in texts for c in re.findall(r"^class (\w+)", text, re.M)}
    named = {n for text in texts for n in re.findall(r"`([A-Z][A-Za-z]+)`", text)}
    unknown = [n for n in named if kind(n) in kinds and n not in CONTRACT.keys() | examples]
    assert sorted(unknown) == []


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


def tutorial_settings(tmp_path: Path, **downloads: Any) -> Settings:
    """Settings for a kernel running the tutorial's plugin: state and models under
    ``tmp_path``, ``downloads`` settings as given."""
    from kernel.config import DownloadSettings, StorageSettings

    return Settings(
        storage=StorageSettings(
            models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state")
        ),
        downloads=DownloadSettings(**downloads),
    )


async def test_the_tutorial_plugin_downloads_a_file(
    file_source: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel.core import Kernel
    from kernel.errors import InvalidRequest
    from kernel.types import TERMINAL

    data = bytes(range(256)) * 3000
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(data)
    monkeypatch.setenv("FILE_SOURCE_ROOT", str(tmp_path / "src"))
    settings = tutorial_settings(tmp_path)
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
    settings = tutorial_settings(tmp_path, connections=4, segment_min_bytes=1 << 20)
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


async def test_the_tutorial_source_is_split_over_several_ranges_when_it_is_slow(
    file_source: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a slow link (here: the tutorial's body paced to about 4 MiB/s, as an origin that
    limits each connection would be), the kernel's adaptive splitting cuts the one range the
    download started with and opens the tutorial's source several times with ``end=``; the
    pieces land where they belong and the file arrives whole."""
    from structlog.testing import capture_logs

    from kernel.core import Kernel
    from tests.helpers.data import blob

    body_class = file_source.source.FileBody
    plain_chunks = body_class.chunks

    async def paced(self: Any) -> AsyncIterator[bytes]:
        async for chunk in plain_chunks(self):
            for at in range(0, len(chunk), 64 << 10):
                await asyncio.sleep(0.015)  # about 4 MiB/s per connection
                yield chunk[at : at + (64 << 10)]

    opened: list[tuple[int, int | None]] = []
    plain_open = file_source.source.FileSource.open

    async def recorded(self: Any, offset: int, validator: str | None, end: int | None = None):
        opened.append((offset, end))
        return await plain_open(self, offset, validator, end)

    monkeypatch.setattr(body_class, "chunks", paced)
    monkeypatch.setattr(file_source.source.FileSource, "open", recorded)
    data = blob(12 << 20)
    src = tmp_path / "src" / "big.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    monkeypatch.setenv("FILE_SOURCE_ROOT", str(src.parent))
    settings = tutorial_settings(tmp_path, connections=4, segment_min_bytes=1 << 20)
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[file_source])
    await kernel.start()
    try:
        with capture_logs() as logs:
            await kernel.downloads.create(
                model_id="big", url=f"file://{src}", sha256=hashlib.sha256(data).hexdigest()
            )
            rec = await until(kernel, "big", lambda r: r.status == "completed")
    finally:
        await kernel.stop()
    assert any(e["event"] == "download.split" for e in logs), [e for e in logs if "split" in e["event"]]
    ranged = [(offset, end) for offset, end in opened if end is not None]
    assert len(ranged) >= 2, opened  # the first range and at least one piece cut from it
    assert all(end < len(data) for _, end in ranged)
    assert await asyncio.to_thread(Path(rec.local_path).read_bytes) == data


async def until(
    running: Any, model_id: str, done: Callable[[DownloadRecord], bool]
) -> DownloadRecord:
    """Wait on the kernel's bus until ``done(record)``; fail after 20 s, or at an end that
    ``done`` does not accept."""
    with running.bus.subscribe() as events:
        async with asyncio.timeout(20):
            while not done(rec := running.downloads.get(model_id)):
                assert rec.status not in TERMINAL, (rec.status, rec.error_message)
                await events.get()
    return rec


def overwrite_keeping_version(path: Path, size: int) -> None:
    """Zero the first ``size`` bytes of ``path``, keeping its size and mtime."""
    stat = path.stat()
    with path.open("r+b") as f:
        f.write(bytes(size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("interruption", ["pause", "restart"])
async def test_the_tutorial_source_resumes_from_its_part_file(
    file_source: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: str
) -> None:
    """The tutorial's FileSource declares nothing for resuming: its probe says
    ``accept_ranges`` with a validator, and ``open`` honours ``offset`` and ``validator``.
    Paused (or with the server stopped and started again) mid-download, the download goes on
    from its ``.part``. The bytes before that point are not read again: while it is stopped
    they are overwritten at the source, keeping its size and mtime (the same version to
    FileSource's validator), and the finished file still has the original bytes."""
    from structlog.testing import capture_logs

    from kernel.core import Kernel
    from tests.helpers.data import blob

    data = blob(8 << 20)
    src = tmp_path / "src" / "big.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    monkeypatch.setenv("FILE_SOURCE_ROOT", str(src.parent))
    settings = tutorial_settings(tmp_path)
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[file_source])
    await kernel.start()
    try:
        await kernel.downloads.create(
            model_id="big", url=f"file://{src}", sha256=hashlib.sha256(data).hexdigest(),
            max_bytes_per_second=1 << 20,  # slow enough to stop it half way
        )  # fmt: skip
        rec = await until(kernel, "big", lambda r: r.downloaded_bytes >= 1 << 20)
        if interruption == "pause":
            await kernel.downloads.pause("big")
        else:
            await kernel.stop()  # the record stays "downloading": the next start resumes it
        part_size = await asyncio.to_thread(os.path.getsize, rec.part_path)
        assert 0 < part_size == rec.downloaded_bytes < len(data)
        version = file_source.source.validator_of(await asyncio.to_thread(src.stat))
        await asyncio.to_thread(overwrite_keeping_version, src, part_size)
        assert file_source.source.validator_of(await asyncio.to_thread(src.stat)) == version

        with capture_logs() as logs:
            if interruption == "pause":
                await kernel.downloads.resume("big")
            else:
                kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[file_source])
                await kernel.start()
            await kernel.downloads.set_limit("big", 0)
            rec = await until(kernel, "big", lambda r: r.status in TERMINAL)
    finally:
        await kernel.stop()
    assert rec.status == "completed", rec.error_message
    assert [e["offset"] for e in logs if e["event"] == "download.resumed"] == [part_size]
    assert not [e for e in logs if e["event"] == "download.restart"]
    assert await asyncio.to_thread(Path(rec.local_path).read_bytes) == data
    assert rec.sha256 == hashlib.sha256(data).hexdigest()


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

"""The plugin system: entry points, blocking, validation, ordering, and each kind of hook.

Every plugin here is a small real implementation (tests/helpers/fakes.py) on a fresh manager;
the third-party plugin is installed for real, as a dist-info directory on sys.path.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pluggy
import pytest
from litestar import get
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from kernel import hookimpl
from kernel.api.app import create_app
from kernel.api.deps import KernelDep
from kernel.config import PluginSettings, Settings
from kernel.core import Kernel
from kernel.errors import InvalidRequest, PermanentError
from kernel.plugins import BUILTINS, Plugins, make_plugin_manager
from kernel.types import (
    TERMINAL,
    DownloadRecord,
    DownloadStatus,
    EngineCreated,
    Event,
    FileSetSource,
    NamedSource,
    PickingSource,
    RangedSource,
)
from plugins.http_source import HttpSource
from tests.helpers.data import blob
from tests.helpers.fakes import (
    EventRecorder,
    MemoryStore,
    MemoryStorePlugin,
    MemSourcePlugin,
    StaticSource,
    event_name,
)

StartKernel = Callable[..., Awaitable[Kernel]]

THIRDPARTY_MODULE = "mk_thirdparty_plugin"
THIRDPARTY_SOURCE = '''
"""A third-party modelkernel plugin: serves mem:// refs and records every event."""

from __future__ import annotations

from kernel import hookimpl
from tests.helpers.fakes import StaticSource

FILES = {"x": bytes(range(256)) * 1024 + b"tail"}
EVENTS = []


@hookimpl
def resolve_source(ref, settings):
    return StaticSource(ref, FILES) if ref.startswith("mem://") else None


@hookimpl
def on_event(event):
    EVENTS.append(event)
'''


async def wait_status(
    kernel: Kernel, model_id: str, status: str, timeout: float = 5.0
) -> DownloadRecord:
    """Wait on the bus until the download reaches ``status``; fail at the deadline or on
    another terminal status."""
    with kernel.bus.subscribe() as events:
        async with asyncio.timeout(timeout):
            while (rec := kernel.downloads.get(model_id)).status != status:
                assert rec.status not in TERMINAL, (rec.status, rec.error_message)
                await events.get()
    return rec


@pytest.fixture
async def start_kernel(settings: Settings) -> AsyncIterator[StartKernel]:
    """Build and start kernels (default: the conftest settings); all are stopped at teardown."""
    started: list[Kernel] = []

    async def start(kernel_settings: Settings | None = None, /, **kwargs: Any) -> Kernel:
        kernel = Kernel(kernel_settings or settings, **kwargs)
        started.append(kernel)
        await kernel.start()
        return kernel

    try:
        yield start
    finally:
        for kernel in reversed(started):
            await kernel.stop()


@pytest.fixture
def thirdparty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Install ``mk_thirdparty_plugin`` with a ``modelkernel`` entry point named thirdparty."""
    site = tmp_path / "site"
    dist_info = site / f"{THIRDPARTY_MODULE}-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (site / f"{THIRDPARTY_MODULE}.py").write_text(textwrap.dedent(THIRDPARTY_SOURCE))
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mk-thirdparty-plugin\nVersion: 0.1\n"
    )
    entry_points = f"[modelkernel]\nthirdparty = {THIRDPARTY_MODULE}\n"
    (dist_info / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(site)
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.modules.pop(THIRDPARTY_MODULE, None)


# --- entry points and blocking ---------------------------------------------------------------


async def test_entry_point_plugin_is_discovered_and_used(
    thirdparty: Path, settings: Settings, start_kernel: StartKernel
) -> None:
    kernel = await start_kernel(settings)
    assert {"thirdparty", "http_source", "sqlite_store"} <= set(kernel.plugins.names())
    module = sys.modules[THIRDPARTY_MODULE]

    await kernel.downloads.create(model_id="third", url="mem://x")
    done = await wait_status(kernel, "third", "completed")

    assert Path(done.local_path).read_bytes() == module.FILES["x"]
    assert Path(done.local_path).name == "x"
    assert done.total_bytes == done.downloaded_bytes == len(module.FILES["x"])
    seen = [(event_name(e), e.record.status) for e in module.EVENTS]
    assert seen[0] == ("download.created", "queued")
    assert ("download.status", "downloading") in seen
    assert ("download.status", "completed") in seen


@pytest.mark.parametrize("how", ["settings", "env"])
async def test_disabled_entry_point_plugin_is_not_loaded(
    how: str,
    thirdparty: Path,
    settings: Settings,
    start_kernel: StartKernel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if how == "settings":
        settings = msgspec.structs.replace(settings, plugins=PluginSettings(disable=["thirdparty"]))
    else:
        monkeypatch.setenv("MODELKERNEL_DISABLE_PLUGINS", "nothing-here, thirdparty")
    kernel = await start_kernel(settings)

    assert "thirdparty" not in kernel.plugins.names()
    assert "http_source" in kernel.plugins.names()
    assert THIRDPARTY_MODULE not in sys.modules  # blocked before it was even imported
    with pytest.raises(InvalidRequest) as excinfo:
        await kernel.downloads.create(model_id="third", url="mem://x")
    assert excinfo.value.param == "url"
    assert kernel.downloads.records == {}


def test_each_plugin_manager_is_fresh() -> None:
    first = make_plugin_manager(load_entrypoints=False, extra=[EventRecorder()])
    second = make_plugin_manager(load_entrypoints=False)
    assert first is not second

    def added(pm: Any) -> list[Any]:  # builtins (s3_cache observes events) aside
        return [i for i in pm.hook.on_event.get_hookimpls() if i.plugin_name not in BUILTINS]

    assert len(added(first)) == 1
    assert added(second) == []


# --- validation --------------------------------------------------------------------------------


class MisspeltHook:
    @hookimpl
    def resolve_sorce(self, ref: str, settings: Settings) -> None:
        return None


class UnknownArgument:
    @hookimpl
    def resolve_source(self, ref: str, settings: Settings, timeout: float) -> None:
        return None


@pytest.mark.parametrize(
    ("plugin", "match"),
    [(MisspeltHook(), "resolve_sorce"), (UnknownArgument(), "timeout")],
    ids=["misspelt-hook", "unknown-argument"],
)
def test_a_bad_hookimpl_fails_when_the_manager_is_made(plugin: object, match: str) -> None:
    with pytest.raises(pluggy.PluginValidationError, match=match):
        make_plugin_manager(load_entrypoints=False, extra=[plugin])


def test_a_misspelt_hookimpl_fails_kernel_construction(settings: Settings) -> None:
    with pytest.raises(pluggy.PluginValidationError, match="resolve_sorce"):
        Kernel(settings, load_entrypoints=False, extra_plugins=[MisspeltHook()])


# --- resolve_source ordering -------------------------------------------------------------------


class HttpMirrorPlugin:
    """Claims http(s) URLs ahead of everyone, serving them from a dict keyed by URL."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    @hookimpl(tryfirst=True)
    def resolve_source(self, ref: str, settings: Settings) -> StaticSource | None:
        return StaticSource(ref, self.files) if ref.startswith(("http://", "https://")) else None


class LateHttpClaimer:
    """Registered after the mirror (so pluggy would call it first) but not tryfirst."""

    @hookimpl
    def resolve_source(self, ref: str, settings: Settings) -> StaticSource | None:
        return StaticSource(ref, {}, validator='"late"') if ref.startswith("http") else None


def test_builtin_http_source_claims_http_urls_by_default(settings: Settings) -> None:
    kernel = Kernel(settings, load_entrypoints=False)
    assert isinstance(kernel.plugins.resolve_source("https://example.invalid/a.bin"), HttpSource)
    with pytest.raises(InvalidRequest) as excinfo:
        kernel.plugins.resolve_source("mem://x")
    assert excinfo.value.param == "url"


async def test_tryfirst_source_plugin_wins_over_builtin_http_source(
    settings: Settings, start_kernel: StartKernel
) -> None:
    url = "https://example.invalid/models/tiny.bin"
    data = blob(200_000)
    kernel = await start_kernel(
        settings,
        load_entrypoints=False,
        extra_plugins=[HttpMirrorPlugin({url: data}), LateHttpClaimer()],
    )
    source = kernel.plugins.resolve_source(url)
    assert isinstance(source, StaticSource) and source.validator == '"v1"'

    await kernel.downloads.create(model_id="tiny", url=url)
    done = await wait_status(kernel, "tiny", "completed")
    assert Path(done.local_path).read_bytes() == data
    assert Path(done.local_path).name == "tiny.bin"


# --- open_store -------------------------------------------------------------------------------


async def test_store_plugin_replaces_the_trylast_sqlite_store(
    settings: Settings, start_kernel: StartKernel
) -> None:
    store = MemoryStore()
    files = {"weights.bin": blob(150_000)}
    plugins = [MemoryStorePlugin(store), MemSourcePlugin(files)]
    kernel = await start_kernel(settings, load_entrypoints=False, extra_plugins=plugins)
    assert "sqlite_store" in kernel.plugins.names()  # loaded, but it answers last
    assert kernel.store is store

    await kernel.downloads.create(model_id="stored", url="mem://weights.bin")
    await wait_status(kernel, "stored", "completed")
    await kernel.stop()

    assert store.closed
    saved = store.get("stored")
    assert saved is not None and saved.status == "completed"
    assert saved.downloaded_bytes == len(files["weights.bin"])
    assert not (Path(settings.storage.state_dir) / "modelkernel.db").exists()

    again = await start_kernel(settings, load_entrypoints=False, extra_plugins=plugins)
    assert again.downloads.get("stored").status == "completed"


# --- on_event ----------------------------------------------------------------------------------


class ExplodingObserver:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def on_event(self, event: Event) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")


class AsyncObserver:
    """Returns a coroutine from the (synchronous) hook; only the kernel awaiting it records."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.completed = asyncio.Event()

    @hookimpl
    def on_event(self, event: Event) -> Awaitable[None]:
        return self._record(event)

    async def _record(self, event: Event) -> None:
        await asyncio.sleep(0)
        self.seen.append(event_name(event))
        if isinstance(event, DownloadStatus) and event.record.status == "completed":
            self.completed.set()


async def test_a_raising_observer_is_logged_and_the_download_still_completes(
    settings: Settings, start_kernel: StartKernel
) -> None:
    exploding = ExplodingObserver()
    files = {"w.bin": blob(100_000)}
    kernel = await start_kernel(
        settings, load_entrypoints=False, extra_plugins=[MemSourcePlugin(files), exploding]
    )
    with capture_logs() as logs:
        await kernel.downloads.create(model_id="obs", url="mem://w.bin")
        done = await wait_status(kernel, "obs", "completed")
    assert Path(done.local_path).read_bytes() == files["w.bin"]
    assert exploding.calls >= 3  # created, downloading, completed
    failures = [e for e in logs if e["event"] == "plugin.on_event_failed"]
    assert len(failures) == exploding.calls
    assert all(e["log_level"] == "error" for e in failures)


async def test_a_raising_observer_does_not_hide_events_from_other_observers(
    settings: Settings, start_kernel: StartKernel
) -> None:
    recorder = EventRecorder()
    files = {"w.bin": blob(10_000)}
    # Registered last, so pluggy calls the exploding observer before the recorder.
    plugins = [MemSourcePlugin(files), recorder, ExplodingObserver()]
    kernel = await start_kernel(settings, load_entrypoints=False, extra_plugins=plugins)
    with capture_logs():
        await kernel.downloads.create(model_id="obs", url="mem://w.bin")
        await wait_status(kernel, "obs", "completed")
    assert recorder.names()[:1] == ["download.created"]


async def test_an_observer_returning_a_coroutine_is_awaited(
    settings: Settings, start_kernel: StartKernel
) -> None:
    observer, recorder = AsyncObserver(), EventRecorder()
    files = {"w.bin": blob(100_000)}
    kernel = await start_kernel(
        settings,
        load_entrypoints=False,
        extra_plugins=[MemSourcePlugin(files), recorder, observer],
    )
    await kernel.downloads.create(model_id="async", url="mem://w.bin")
    await wait_status(kernel, "async", "completed")
    async with asyncio.timeout(5):
        await observer.completed.wait()
    assert observer.seen[0] == "download.created"
    assert "download.status" in observer.seen
    assert recorder.names()[0] == "download.created"


class NoArgumentObserver:
    """Takes none of the spec's arguments, which pluggy allows for any hook."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def on_event(self) -> None:
        self.calls += 1


class ObserverWrapper:
    """A new-style pluggy wrapper: sees each observer's outcome."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    @hookimpl(wrapper=True)
    def on_event(self, event: Event) -> Iterator[None]:
        try:
            result = yield
        except RuntimeError as exc:
            self.outcomes.append(f"raised {exc}")
            raise
        self.outcomes.append(f"returned {len(result)}")
        return result


def engine_created(model_id: str = "m") -> EngineCreated:
    return EngineCreated(model_id=model_id, model_type="llm", inference_engine="fake")


def test_on_event_goes_through_pluggy_with_wrappers_and_fewer_arguments(
    settings: Settings,
) -> None:
    quiet, wrapper, exploding, recorder = (
        NoArgumentObserver(),
        ObserverWrapper(),
        ExplodingObserver(),
        EventRecorder(),
    )
    pm = make_plugin_manager(
        load_entrypoints=False,
        disable=BUILTINS,
        extra=[recorder, exploding, quiet, wrapper],
    )
    plugins = Plugins(pm, settings)
    with capture_logs() as logs:
        plugins.emit(engine_created("a"))
        plugins.emit(engine_created("b"))
    assert quiet.calls == 2
    assert [e.model_id for e in recorder.events] == ["a", "b"]  # type: ignore[union-attr]
    assert exploding.calls == 2
    # One hook call per observer: the wrapper sees each one's outcome (None results are
    # not collected by pluggy), including the one that raised.
    assert sorted(wrapper.outcomes) == ["raised observer bug"] * 2 + ["returned 0"] * 4
    failures = [e for e in logs if e["event"] == "plugin.on_event_failed"]
    assert len(failures) == 2
    assert {e["plugin"] for e in failures} == {pm.get_name(exploding)}


def test_on_event_calls_are_traced_when_tracing_is_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELKERNEL_TRACE_PLUGINS", "1")
    pm = make_plugin_manager(load_entrypoints=False, disable=BUILTINS, extra=[EventRecorder()])
    with capture_logs() as logs:
        Plugins(pm, settings).emit(engine_created())
    traced = [e["msg"] for e in logs if e["event"] == "plugin.trace"]
    assert any("on_event" in msg for msg in traced), traced


def test_an_observer_registered_later_is_told_too(settings: Settings) -> None:
    first, later = EventRecorder(), EventRecorder()
    pm = make_plugin_manager(load_entrypoints=False, disable=BUILTINS, extra=[first])
    plugins = Plugins(pm, settings)
    plugins.emit(engine_created("a"))
    pm.register(later)
    plugins.emit(engine_created("b"))
    assert len(first.events) == 2
    assert [e.model_id for e in later.events] == ["b"]  # type: ignore[union-attr]


def test_the_builtin_sources_declare_their_capabilities(settings: Settings) -> None:
    """The kernel checks capabilities with isinstance against kernel.types' Protocols only."""
    plugins = Plugins(make_plugin_manager(load_entrypoints=False), settings)
    http = plugins.resolve_source("https://example.test/models/tiny.gguf")
    assert isinstance(http, RangedSource)
    assert http.supports_segments
    assert isinstance(http, NamedSource)
    assert http.filename == "tiny.gguf"
    assert not isinstance(http, PickingSource | FileSetSource)
    hub = plugins.resolve_source("hf://owner/repo/tiny.gguf")
    assert isinstance(hub, PickingSource)
    assert isinstance(hub, FileSetSource)
    assert isinstance(hub, NamedSource)
    assert hub.filename == "tiny.gguf"


class PickyBackend:
    """Loads nothing, but says which downloaded files it could load (VerifyingBackend)."""

    name = "picky"
    aliases: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.asked: list[str] = []

    def verify_file(self, path: str, name: str) -> None:
        self.asked.append(name)
        if Path(path).read_bytes().startswith(b"BAD"):
            raise PermanentError(f"{name} is not a picky model.")

    def verify_set(self, paths: list[str]) -> None:
        pass

    async def create(self, model_id: str, path: str, model_type: str, spec: Any) -> Any:
        raise NotImplementedError


class PickyPlugin:
    def __init__(self) -> None:
        self.backend = PickyBackend()

    @hookimpl
    def register_engine_backends(self, settings: Settings) -> list[Any]:
        return [self.backend]


async def test_the_default_engine_backend_verifies_downloaded_files(
    settings: Settings, start_kernel: StartKernel
) -> None:
    """No kernel format check: the backend that would load the file (here the only one, so
    the default) decides, and a file it rejects is removed."""
    picky = PickyPlugin()
    files = {"good.bin": b"GOOD" + blob(5000), "bad.gguf": b"BAD" + blob(5000)}
    without_llama = msgspec.structs.replace(
        settings, plugins=PluginSettings(disable=["engine_llamacpp"])
    )
    kernel = await start_kernel(
        without_llama, load_entrypoints=False, extra_plugins=[MemSourcePlugin(files), picky]
    )
    assert kernel.engines.default_backend == "picky"
    await kernel.downloads.create(model_id="good", url="mem://good.bin")
    await kernel.downloads.create(model_id="bad", url="mem://bad.gguf")
    good = await wait_status(kernel, "good", "completed")
    bad = await wait_status(kernel, "bad", "failed")
    assert Path(good.local_path).read_bytes() == files["good.bin"]
    assert bad.error_message == "bad.gguf is not a picky model. The file was removed."
    assert not Path(bad.local_path).exists()
    assert not Path(bad.part_path).exists()
    assert sorted(picky.backend.asked) == ["bad.gguf", "good.bin"]


# --- register_routes ---------------------------------------------------------------------------


class HelloRoutes:
    @hookimpl
    def register_routes(self, settings: Settings) -> list[Any]:
        @get("/hello")
        async def hello(kernel: KernelDep) -> dict[str, Any]:
            return {"hello": "world", "plugins": kernel.plugins.names()}

        return [hello]


async def test_plugin_routes_are_served_by_the_app(settings: Settings) -> None:
    kernel = Kernel(settings, load_entrypoints=False, extra_plugins=[HelloRoutes()])
    async with AsyncTestClient(app=create_app(kernel)) as client:
        assert kernel.started
        response = await client.get("/hello")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["hello"] == "world"
        assert "http_source" in body["plugins"]
        assert (await client.get("/health")).status_code == 200
    assert not kernel.started


def test_without_the_fleet_config_nothing_of_the_fleet_extra_is_imported(tmp_path: Path) -> None:
    """pg_store and s3_cache are builtins, but a node without store/cache config never
    imports psycopg: the [fleet] extra is needed only by nodes that use it."""
    code = (
        "import asyncio, sys\n"
        "from kernel.config import Settings, StorageSettings\n"
        "from kernel.core import Kernel\n"
        f"s = Settings(storage=StorageSettings(models_dir={str(tmp_path / 'm')!r},"
        f" state_dir={str(tmp_path / 's')!r}))\n"
        "async def main():\n"
        "    k = Kernel(s, load_entrypoints=False)\n"
        "    await k.start()\n"
        "    await k.stop()\n"
        "asyncio.run(main())\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_kernel_knows_no_plugin_and_no_model_format() -> None:
    """What a file is and which engine loads it belong to plugins: no kernel file (code,
    docstring, comment, or the dashboard's page) imports one or names llama.cpp or GGUF (the
    builtins' names come from pyproject.toml)."""
    root = Path(__file__).resolve().parent.parent / "kernel"
    offenders = []
    for path in (p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        text = path.read_text(encoding="utf-8", errors="replace")
        found = [w for w in ("gguf", "llama") if w in text.lower()]
        found += re.findall(r"^\s*(?:from|import) plugins\b", text, re.MULTILINE)
        offenders += [f"{path.relative_to(root.parent)}: {w.strip()}" for w in found]
    assert offenders == []
    assert BUILTINS["engine_llamacpp"] == "plugins.engine_llamacpp"


def test_the_kernel_probes_no_plugin_object() -> None:
    """What a source, body, store, backend or engine can do is declared by the Protocols of
    kernel.types and checked with isinstance: no kernel module that handles those objects (one
    importing kernel.types) calls getattr or hasattr, so mypy sees the whole contract."""
    root = Path(__file__).resolve().parent.parent / "kernel"
    handling, offenders = 0, []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not any(
            isinstance(node, ast.ImportFrom) and node.module == "kernel.types"
            for node in ast.walk(tree)
        ):
            continue
        handling += 1
        offenders += [
            f"{path.relative_to(root.parent)}:{node.lineno}: {node.func.id}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
        ]
    assert handling >= 10  # downloads, transfer, segments, pump, engines, plugins, api...
    assert offenders == []


async def test_create_refuses_keywords_it_does_not_know(start_kernel: StartKernel) -> None:
    """A plugin calling ``kernel.downloads.create`` with a misspelt keyword gets a TypeError
    naming it, as from any function, instead of a download created without it."""
    kernel = await start_kernel(load_entrypoints=False)
    with pytest.raises(TypeError, match="unexpected max_bytes_per_sec"):
        await kernel.downloads.create(  # type: ignore[call-arg]
            model_id="m", url="https://example.com/m.bin", max_bytes_per_sec=10
        )
    with pytest.raises(TypeError, match="missing url"):
        await kernel.downloads.create(model_id="m")  # type: ignore[call-arg]
    assert kernel.downloads.list() == []


def _imported_modules(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a module of ``package``), at
    any depth: function-level and TYPE_CHECKING imports count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = package.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package up
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            if base == "plugins":  # ``from plugins import pg_store``
                yield from ((node.lineno, f"plugins.{alias.name}") for alias in node.names)


def test_no_plugin_imports_another() -> None:
    """What plugins share is declared by the kernel (kernel.types, kernel.hookspecs) or lives
    in a kernel module: no builtin plugin package imports another, so each one can be
    replaced by a third party's."""
    root = Path(__file__).resolve().parent.parent
    offenders = []
    packages = sorted(p.parent.name for p in (root / "plugins").glob("*/__init__.py"))
    assert {"pg_store", "s3_cache", "hf_source", "http_source"} <= set(packages)
    for name in packages:
        for path in sorted((root / "plugins" / name).rglob("*.py")):
            package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
            for line, module in _imported_modules(path, package):
                found = module.split(".")
                if found[0] == "plugins" and len(found) > 1 and found[1] != name:
                    offenders.append(f"{path.relative_to(root)}:{line}: {module}")
    assert offenders == []


def test_the_fleet_wrapper_declares_exactly_what_the_wrapped_source_declares() -> None:
    """s3_cache wraps every resolved source; the kernel asks the wrapper what it can do with
    isinstance, so the wrapper must answer as the wrapped source would (a repository
    reference keeps picking its files) and claim nothing the wrapped one lacks."""
    from kernel.httpclient import HttpSource
    from kernel.types import FileSetSource, NamedSource, PickingSource, RangedSource
    from kernel.types import Probe
    from plugins.hf_source._ref import HubRef
    from plugins.hf_source.source import HubSource
    from plugins.s3_cache.fleet import FleetSource, fleet_source

    class Plain:  # Source's members only
        ref = "mem://m"

        async def probe(self) -> Probe:
            return Probe(size=1, validator=None, accept_ranges=False)

        async def open(self, offset: int, validator: str | None) -> Any:
            raise NotImplementedError

        async def aclose(self) -> None:
            pass

    capabilities = (NamedSource, PickingSource, FileSetSource)
    hub_ref = HubRef.parse("hf://owner/repo@main", "https://hub.example")
    assert hub_ref is not None
    inners: list[Any] = [
        HttpSource("https://example.com/m.bin"),
        HubSource(hub_ref, ref="hf://owner/repo@main", endpoint="https://hub.example"),
        Plain(),
    ]
    for inner in inners:
        wrapped = fleet_source(inner, None, "m")  # type: ignore[arg-type]
        assert isinstance(wrapped, FleetSource)
        assert isinstance(wrapped, RangedSource) and not wrapped.supports_segments
        declared = [isinstance(inner, c) for c in capabilities]
        assert [isinstance(wrapped, c) for c in capabilities] == declared, type(inner)
    assert [isinstance(inners[1], c) for c in capabilities] == [True, True, True]
    assert not hasattr(fleet_source(inners[2], None, "m"), "resolve_filename")  # type: ignore[arg-type]

"""Fake plugins: small real implementations of the kernel's Protocols, no patching.

* :class:`MemoryStore` is a ``DownloadStore`` keeping msgspec-encoded records in a dict.
* :class:`StaticSource` is a ``Source`` serving ``mem://name`` from a dict of bytes, with
  ranges and a fixed validator.
* :class:`EchoEngine` is an ``Engine`` that echoes prompts, for engine backends of tests.
* :class:`MemSourcePlugin`, :class:`MemoryStorePlugin` and :class:`EventRecorder` are plugin
  objects to pass as ``extra_plugins`` to a ``Kernel`` (or ``extra`` to the manager).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec

from kernel import hookimpl
from kernel.config import Settings
from kernel.errors import PermanentError, ValidatorChanged
from kernel.types import DownloadRecord, DownloadStore, EngineSpec, Event, Probe, Source

__all__ = [
    "CHUNK",
    "SCHEME",
    "VALIDATOR",
    "EchoEngine",
    "EventRecorder",
    "MemSourcePlugin",
    "MemoryStore",
    "MemoryStorePlugin",
    "StaticBody",
    "StaticSource",
    "event_name",
]

SCHEME = "mem://"
VALIDATOR = '"v1"'
CHUNK = 64 << 10


def event_name(event: Event) -> str:
    """The tag an event travels under: ``download.created``, ``download.status``..."""
    return str(event.__struct_config__.tag)


class MemoryStore:
    """A DownloadStore in a dict. Records are stored encoded, so the kernel's later changes
    to a record object never leak into what was saved."""

    def __init__(self) -> None:
        self.rows: dict[str, bytes] = {}
        self.meta: dict[str, bytes] = {}
        self.closed = False
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(DownloadRecord)

    def get(self, model_id: str) -> DownloadRecord | None:
        row = self.rows.get(model_id)
        return self._decoder.decode(row) if row is not None else None

    async def load_all(self) -> list[DownloadRecord]:
        return [self._decoder.decode(row) for row in self.rows.values()]

    async def save(self, record: DownloadRecord) -> None:
        self.rows[record.model_id] = self._encoder.encode(record)

    async def delete(self, model_id: str) -> None:
        self.rows.pop(model_id, None)

    async def get_meta(self, key: str) -> bytes | None:
        return self.meta.get(key)

    async def put_meta(self, key: str, value: bytes) -> None:
        self.meta[key] = value

    async def close(self) -> None:
        self.closed = True


class StaticBody:
    """The bytes of one file from ``start``, in CHUNK-sized pieces."""

    def __init__(self, data: bytes, start: int, validator: str) -> None:
        self.data = data
        self.start = start
        self.total: int | None = len(data)
        self.validator: str | None = validator
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for pos in range(self.start, len(self.data), CHUNK):
            yield self.data[pos : pos + CHUNK]

    async def aclose(self) -> None:
        self.closed = True


class StaticSource:
    """A Source for ``mem://name``, served from ``files[name]`` (looked up at probe/open
    time, so a test may add or change the file after the download is created)."""

    def __init__(self, ref: str, files: dict[str, bytes], validator: str = VALIDATOR) -> None:
        self.ref = ref
        self.files = files
        self.name = ref.removeprefix(SCHEME)
        self.filename = self.name.rsplit("/", 1)[-1]
        self.validator = validator
        self.opens: list[tuple[int, str | None]] = []
        self.closed = False

    def _data(self) -> bytes:
        try:
            return self.files[self.name]
        except KeyError:
            raise PermanentError(f"Not found: {self.ref}") from None

    async def probe(self) -> Probe:
        return Probe(size=len(self._data()), validator=self.validator, accept_ranges=True)

    async def open(self, offset: int, validator: str | None) -> StaticBody:
        self.opens.append((offset, validator))
        data = self._data()
        if validator is not None and validator != self.validator:
            raise ValidatorChanged(f"{self.ref} is no longer {validator}.")
        return StaticBody(data, offset, self.validator)

    async def aclose(self) -> None:
        self.closed = True


class MemSourcePlugin:
    """Claims ``mem://`` references and serves them from ``files``."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = {} if files is None else files

    @hookimpl
    def resolve_source(self, ref: str, settings: Settings) -> Source | None:
        if not ref.startswith(SCHEME):
            return None
        return StaticSource(ref, self.files)


class MemoryStorePlugin:
    """Provides one MemoryStore, replacing the builtin (``trylast``) sqlite_store."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = MemoryStore() if store is None else store

    @hookimpl
    def open_store(self, settings: Settings) -> DownloadStore | None:
        return self.store


class EventRecorder:
    """Records every event the kernel publishes, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    @hookimpl
    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def names(self) -> list[str]:
        return [event_name(e) for e in self.events]


class EchoEngine:
    """An engine that answers with the prompt and embeds every text as ``[1.0]``."""

    def __init__(self, model_id: str, model_type: str) -> None:
        self.model_id, self.model_type = model_id, model_type

    async def complete(self, prompt: str, max_tokens: int) -> str:
        return prompt

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [[1.0] for _ in texts]

    async def close(self) -> None:
        pass


class EchoBackend:
    """An engine backend named ``echo`` (alias ``echo-cpu``) building EchoEngines. ``gate``
    holds every create until it is set (set at first); ``created`` lists what was asked."""

    name = "echo"
    aliases: tuple[str, ...] = ("echo-cpu",)

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.created: list[tuple[str, str, EngineSpec]] = []

    async def create(
        self, model_id: str, path: str, model_type: str, spec: EngineSpec
    ) -> EchoEngine:
        await self.gate.wait()
        self.created.append((model_id, path, spec))
        return EchoEngine(model_id, model_type)


class EchoPlugin:
    """Registers one EchoBackend, kept as ``backend``."""

    def __init__(self) -> None:
        self.backend = EchoBackend()

    @hookimpl
    def register_engine_backends(self, settings: Settings) -> list[EchoBackend]:
        return [self.backend]

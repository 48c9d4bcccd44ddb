"""Structs and Protocols shared by the kernel and its plugins.

Records are the kernel's own state (never sent on the wire as they are: the API converts them).
Protocols describe the objects that plugin hooks return: a ``Source`` fetches bytes, a
``DownloadStore`` keeps records, an ``EngineBackend`` builds engines.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, runtime_checkable

import msgspec

if TYPE_CHECKING:
    from kernel.config import FleetSettings

__all__ = [
    "ACTIVE",
    "STATUSES",
    "TERMINAL",
    "BlockingBody",
    "Body",
    "ChatEngine",
    "CheckingBackend",
    "CountingEmbedder",
    "CountingEngine",
    "DescribedBackend",
    "DescribedEngine",
    "DownloadCreated",
    "DownloadProgress",
    "DownloadRecord",
    "DownloadRetry",
    "DownloadStatus",
    "DownloadStore",
    "Engine",
    "EngineBackend",
    "EngineCreated",
    "EngineSpec",
    "Event",
    "FileRecord",
    "FileSetSource",
    "GeneratingEngine",
    "GpuInfo",
    "LazyEngine",
    "Lease",
    "LeaseBoard",
    "LeaseState",
    "LeasingStore",
    "ModelFileBackend",
    "NamedSource",
    "PickingSource",
    "Piece",
    "Probe",
    "QuarantiningStore",
    "QueuingBody",
    "RangedSource",
    "RemoteFile",
    "Sampling",
    "Source",
    "Status",
    "VerifyingBackend",
    "now_ms",
]

Status: TypeAlias = Literal[
    "queued", "downloading", "paused", "creating_engine", "completed", "failed", "cancelled"
]
DownloadType: TypeAlias = Literal["regular", "startup"]
ModelType: TypeAlias = Literal["llm", "embedding"]

STATUSES: tuple[str, ...] = (
    "queued",
    "downloading",
    "paused",
    "creating_engine",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"queued", "downloading", "paused", "creating_engine"})


def now_ms() -> int:
    """Milliseconds since the epoch: the unit of every timestamp in a record."""
    return time.time_ns() // 1_000_000


class EngineSpec(msgspec.Struct, kw_only=True):
    """What to build once a startup download's file is on disk (Kolosal's engine_creation)."""

    load_immediately: bool = True
    main_gpu_id: int = 0
    inference_engine: str = ""  # a backend name or alias; "": the default backend
    # The request gave no model_type: the backend reads it from the file (kept in the
    # record, so an engine rebuilt after a restart infers it again).
    infer_model_type: bool = False
    loading_parameters: dict[str, Any] = msgspec.field(default_factory=dict)


FileStatus: TypeAlias = Literal["pending", "downloading", "done"]


class FileRecord(msgspec.Struct, kw_only=True):
    """One file of a multi-file download (a shard of a split model, a file of a repository):
    its own reference, place, progress and resume state, as a single download keeps them."""

    path: str  # relative to the download's directory (the shard's name, a path in the repo)
    url: str  # the file's own reference, pinned to the commit the set was resolved at
    local_path: str
    size: int = 0  # 0 = not known yet
    downloaded_bytes: int = 0
    status: FileStatus = "pending"
    expected_sha256: str | None = None
    sha256: str | None = None  # set once verified
    validator: str | None = None
    file_validator: str | None = None  # the one the completed file at local_path has
    segments: list[list[int]] | None = None

    @property
    def part_path(self) -> str:
        return self.local_path + ".part"


class DownloadRecord(msgspec.Struct, kw_only=True):
    """One download as the kernel and the store know it. Times are ms since the epoch."""

    model_id: str
    url: str
    local_path: str
    status: Status = "queued"
    download_type: DownloadType = "regular"
    model_type: ModelType = "llm"
    engine: EngineSpec | None = None
    priority: int = 0
    seq: int = 0  # creation order, for FIFO among equal priorities
    created_at: int = 0
    start_time: int = 0
    end_time: int | None = None
    downloaded_bytes: int = 0
    total_bytes: int = 0  # 0 = unknown
    expected_sha256: str | None = None
    sha256: str | None = None  # set once verified
    validator: str | None = None  # ETag (or Last-Modified) the .part file belongs to
    file_validator: str | None = None  # ...and the one the completed file at local_path has
    error_message: str | None = None
    last_error: str | None = None
    attempts: int = 0
    max_bytes_per_second: int = 0
    # Segmented transfers: [start, end, done] per connection (None = one stream).
    segments: list[list[int]] | None = None
    # This run's starting point, for the average speed (bytes in this run / seconds in it).
    run_started_at: int = 0
    run_start_bytes: int = 0
    # A set of files under one model id (None = one file, ``local_path``). ``local_path`` is
    # then what engines load (a split model's first shard) or the model's directory, and the
    # byte counters are the sums over the files.
    files: list[FileRecord] | None = None

    @property
    def part_path(self) -> str:
        return self.local_path + ".part"

    def part_paths(self) -> list[str]:
        """Every ``.part`` file this download may own."""
        if self.files is None:
            return [self.part_path]
        return [f.part_path for f in self.files]

    def final_paths(self) -> list[str]:
        """Every file this download puts in place."""
        if self.files is None:
            return [self.local_path]
        return [f.local_path for f in self.files]


class Probe(msgspec.Struct, kw_only=True):
    """What a source knows about the remote file before fetching it."""

    size: int | None = None
    validator: str | None = None
    accept_ranges: bool = False
    sha256: str | None = None
    final_url: str | None = None
    filename: str | None = None


@runtime_checkable
class Body(Protocol):
    """An open response body. ``start`` is the byte offset its first chunk belongs at:
    the requested offset when the range was honoured, 0 when the source restarted."""

    start: int
    total: int | None
    validator: str | None

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Source(Protocol):
    """Fetches one remote file. Returned by the ``resolve_source`` hook; all I/O is here."""

    ref: str

    async def probe(self) -> Probe:
        """Size, validator, range support and checksum, without downloading the body.
        Raises TransientError / PermanentError."""
        ...

    async def open(self, offset: int, validator: str | None) -> Body:
        """Open the body at ``offset``; with a validator, only if the file is still that one
        (If-Range). Raises TransientError / PermanentError / ValidatorChanged."""
        ...

    async def aclose(self) -> None: ...


# --- optional capabilities of a Source (and its bodies) -----------------------------------
# A source declares one by having its members; the kernel checks with isinstance against
# these Protocols and never probes for anything else. A class may also list them as bases
# (``class MySource(RangedSource, NamedSource)``) so that mypy checks the signatures.


@runtime_checkable
class RangedSource(Protocol):
    """A Source that can fetch one byte range, so a large file comes over several
    connections at once (segmented) when ``supports_segments`` is True."""

    supports_segments: bool

    async def open(self, offset: int, validator: str | None, end: int | None = None) -> Body:
        """As ``Source.open``, stopping after byte ``end`` (inclusive) when it is given."""
        ...


@runtime_checkable
class NamedSource(Protocol):
    """A Source that knows the file's name before probing it (the last part of a URL path, a
    file in a repository); the download is saved under it when the request names none."""

    @property
    def filename(self) -> str | None: ...


@runtime_checkable
class PickingSource(Protocol):
    """A Source whose reference may name several files (a repository) and that picks one
    with the request's ``filename`` (a name or a glob). After ``resolve_filename``, ``ref``
    names that one file; the kernel records it."""

    ref: str

    async def resolve_filename(self, filename: str | None) -> str | None:
        """The file name to save the chosen file under (None: the kernel picks one). Raises
        InvalidRequest(param="filename") when nothing or more than one file matches."""
        ...


@runtime_checkable
class BlockingBody(Protocol):
    """A body that can be read off the event loop (the fast path, kernel.pump): the kernel
    reads it from a worker thread straight into its block buffer."""

    start: int
    total: int | None
    validator: str | None

    def readinto_blocking(self, view: memoryview, flush_s: float) -> int:
        """Fill ``view``; return when it is full, at the end of the body, or after ``flush_s``
        seconds holding at least one byte. 0 only at the end. Raises TransientError (stall,
        network) or PermanentError. Called from a worker thread."""
        ...

    def interrupt(self) -> None:
        """Make a ``readinto_blocking`` in progress return soon (thread-safe)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class RemoteFile(Protocol):
    """One file of a set a source resolved: where it goes and how to fetch it."""

    path: str  # relative to the download's directory; "/"-separated, no "." or ".."
    ref: str  # a reference ``resolve_source`` understands, naming exactly this file
    size: int | None
    sha256: str | None


@runtime_checkable
class FileSetSource(Protocol):
    """A Source whose reference may name several files that make one model (the shards of a
    split model, a repository's files picked by ``include`` patterns)."""

    ref: str

    async def resolve_files(
        self, filename: str | None, include: list[str] | None
    ) -> list[RemoteFile] | None:
        """The files of the set, in order (a split model's first shard first), or None when the
        reference (with ``filename``) names a single file. Raises InvalidRequest when the
        files match more than one model or a set is incomplete, listing them."""
        ...


@runtime_checkable
class DownloadStore(Protocol):
    """Keeps download records across restarts. Returned by the ``open_store`` hook."""

    async def load_all(self) -> list[DownloadRecord]: ...

    async def save(self, record: DownloadRecord) -> None: ...

    async def delete(self, model_id: str) -> None: ...

    async def get_meta(self, key: str) -> bytes | None:
        """A small kernel value (runtime settings) saved with ``put_meta``, or None."""
        ...

    async def put_meta(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class QueuingBody(Protocol):
    """A BlockingBody that can say how many bytes already wait in its socket, so the pump
    reads them without blocking before it writes what it holds."""

    def queued(self) -> int: ...


@runtime_checkable
class QuarantiningStore(Protocol):
    """A store that sets aside records it cannot read (instead of failing to start) and
    lists them, as ``model id: why``; ``GET /health/ready`` reports them."""

    quarantined: list[str]


# --- leases: one node of a fleet fetches a file for all ------------------------------------
# A store whose database the fleet shares may also keep leases (``LeasingStore``); the S3
# cache plugin fetches through them. Nothing else in the kernel uses them.


class LeaseState(msgspec.Struct, kw_only=True):
    """A lease as the board last saw it (``LeaseBoard.read``)."""

    file_key: str
    holder: str | None  # the node id holding it, None when nobody does
    token: int  # grows by one at every claim
    live: bool  # the holder's lease has not run out
    size: int | None
    done: int  # bytes the holder reported
    state: str  # fetching | complete | aborted
    info: dict[str, Any]  # the holder's small document (an upload id...)
    seconds_left: float


@runtime_checkable
class Lease(Protocol):
    """A lease this node holds (``LeaseBoard.claim``). Every write is fenced by ``token``:
    once another node has claimed the file, it changes nothing and raises LeaseLost."""

    @property
    def token(self) -> int: ...

    @property
    def info(self) -> dict[str, Any]:
        """The lease's document as claimed (a takeover finds its predecessor's upload id),
        updated by ``write``."""
        ...

    @property
    def valid(self) -> bool:
        """Still ours as far as this node can tell: not fenced off, and renewed within the
        lease time by this node's own clock (so a node cut off from the board stops)."""
        ...

    def check(self) -> None:
        """Raise LeaseLost unless ``valid``."""
        ...

    async def write(
        self,
        *,
        done: int | None = None,
        size: int | None = None,
        info: dict[str, Any] | None = None,
        state: str | None = None,
        renew: bool = True,
    ) -> None:
        """Renew the lease and record progress (``info`` is merged). Raises LeaseLost when
        the lease was taken over, StoreError when the board cannot be reached."""
        ...

    async def complete(self, *, size: int, info: dict[str, Any] | None = None) -> None:
        """The file is whole: nobody claims it again. Stops the heartbeat."""
        ...

    async def release(self, *, state: str | None = None) -> None:
        """Give the lease up now, so another node can claim it at once. Never raises."""
        ...

    def start_heartbeat(self) -> None:
        """Renew the lease in the background until ``stop_heartbeat``, ``complete`` or
        ``release``, or until it is lost."""
        ...

    async def stop_heartbeat(self) -> None: ...


@runtime_checkable
class LeaseBoard(Protocol):
    """One node's view of the fleet's leases, one per file key: who fetches each file, and
    who wants it. ``start()`` before any other call, ``close()`` last."""

    @property
    def node_id(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self, key: str) -> LeaseState | None: ...

    async def wait_change(self, key: str, wait_s: float | None = None) -> bool:
        """Return when the lease of ``key`` changes (True) or after ``wait_s`` seconds
        (default: the board's poll interval; False)."""
        ...

    async def claim(
        self, key: str, *, size: int | None = None, info: dict[str, Any] | None = None
    ) -> Lease | None:
        """The lease of ``key`` when nobody holds a live one and the file is not complete
        (``info`` merged into its document), else None."""
        ...

    async def reset(self, key: str, *, state: str = "fetching") -> None:
        """Forget the fetch of ``key`` (no holder, no upload id, 0 bytes): ``aborted`` unless
        it is complete, ``fetching`` even when it is (its cached copy went missing)."""
        ...

    async def want(self, key: str, model_id: str) -> None:
        """This node's download ``model_id`` wants the file."""
        ...

    async def unwant(self, key: str, model_id: str) -> int:
        """It no longer does; returns how many downloads (of any node) still do."""
        ...


@runtime_checkable
class LeasingStore(Protocol):
    """A DownloadStore in a database the whole fleet shares, which also keeps its leases."""

    def leases(self, fleet: FleetSettings) -> LeaseBoard:
        """A new board for this node (its id is the store's), set up by ``fleet``'s
        ``lease_s``, ``heartbeat_s``, ``poll_s`` and ``listen``. No I/O until ``start``."""
        ...


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    name: str
    total_memory: int
    free_memory: int


@runtime_checkable
class Engine(Protocol):
    """A loaded (or lazily loadable) model that answers requests."""

    model_id: str
    model_type: str

    async def complete(self, prompt: str, max_tokens: int) -> str: ...

    async def embed(self, texts: list[str]) -> list[list[float]]: ...

    async def close(self) -> None: ...


class Sampling(msgspec.Struct, kw_only=True, frozen=True):
    """How to generate text: OpenAI's sampling fields, validated by the API, with OpenAI's
    defaults (so ``temperature`` 1 and ``top_p`` 1 sample from the whole distribution)."""

    max_tokens: int | None = 16  # None: until the context ends
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed for this request
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    logprobs: int | None = None  # how many alternatives per token; None: no logprobs
    echo: bool = False  # completions only: the prompt comes first in the text


class Piece(msgspec.Struct, kw_only=True):
    """Some generated text (usually one token) from an engine's ``generate`` or ``chat``.

    The last piece of a generation has ``finish_reason`` (``stop``, ``length``) and the token
    counts. ``logprobs`` is OpenAI's completions shape (``tokens``, ``token_logprobs``,
    ``top_logprobs``, ``text_offset``) for the tokens of this piece."""

    text: str = ""
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class EngineBackend(Protocol):
    """Builds engines from model files. Returned (in a list) by ``register_engine_backends``."""

    name: str
    aliases: tuple[str, ...]

    async def create(
        self, model_id: str, path: str, model_type: str, spec: EngineSpec
    ) -> Engine: ...


# --- optional capabilities of an EngineBackend and its Engines ---------------------------
# As for sources: declared by having the members, checked with isinstance, nothing else.


@runtime_checkable
class CheckingBackend(Protocol):
    """A backend that rejects bad ``loading_parameters`` when the request is made."""

    def check(self, spec: EngineSpec, *, prefix: str = "") -> None:
        """Raise InvalidRequest(param=prefix + "loading_parameters...") for a bad spec."""
        ...


@runtime_checkable
class VerifyingBackend(Protocol):
    """A backend that checks downloaded files are ones it can load, before the kernel keeps
    them. The kernel asks the backend the download will be loaded with: its
    ``engine_creation.inference_engine``, else the default backend. Both methods are
    blocking (the kernel calls them in a worker thread) and raise PermanentError with a
    sentence saying what is wrong."""

    def verify_file(self, path: str, name: str) -> None:
        """Check one complete file: its bytes are at ``path`` (the ``.part``), ``name`` is the
        file name it will have. A rejected file is removed and the download fails."""
        ...

    def verify_set(self, paths: list[str]) -> None:
        """Check the files of a multi-file download together (in order), once all are in
        place: a split model's shards belong to one model, none is missing."""
        ...


@runtime_checkable
class ModelFileBackend(Protocol):
    """A backend that says which file of a multi-file download its engines load (a split
    model's first shard); without it, a set of several files is loaded from its directory."""

    def model_file(self, paths: list[str]) -> str | None:
        """One of ``paths`` (the set's files, relative, in order), or None for the directory."""
        ...


@runtime_checkable
class DescribedBackend(Protocol):
    """What ``GET /v1/engines`` shows of a backend beyond its name and aliases."""

    @property
    def description(self) -> str | None: ...

    @property
    def version(self) -> str | None: ...

    @property
    def available(self) -> bool:
        """False when its optional dependency is not installed."""
        ...


@runtime_checkable
class LazyEngine(Protocol):
    """An engine that loads on first use: ``loaded``, ``loading`` or ``unloaded``."""

    @property
    def state(self) -> str: ...


@runtime_checkable
class DescribedEngine(Protocol):
    """An engine with facts to show (context size, layers, file, ...)."""

    @property
    def details(self) -> dict[str, Any]: ...


@runtime_checkable
class GeneratingEngine(Protocol):
    """An engine that streams completions and honours every Sampling field."""

    def generate(self, prompt: str | list[int], sampling: Sampling) -> AsyncIterator[Piece]:
        """Pieces for ``prompt`` (text or token ids); the last has ``finish_reason`` and
        the token counts. Stops when closed."""
        ...


@runtime_checkable
class ChatEngine(Protocol):
    """An engine that answers chat messages; ``supports_chat`` says whether this model can
    (a model without a chat template cannot)."""

    @property
    def supports_chat(self) -> bool: ...

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling) -> AsyncIterator[Piece]: ...


@runtime_checkable
class CountingEngine(Protocol):
    """An engine whose completions report token counts (the OpenAI ``usage`` block)."""

    async def complete_detailed(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """``{text, finish_reason, prompt_tokens, completion_tokens}``."""
        ...


@runtime_checkable
class CountingEmbedder(Protocol):
    """An engine whose embeddings report the prompt token count and take token ids."""

    async def embed_detailed(
        self, texts: list[str] | list[list[int]]
    ) -> tuple[list[list[float]], int]:
        """One vector per text (or list of token ids), and the prompt token count."""
        ...


# --- bus events: frozen, tagged with the event name --------------------------------------


class DownloadCreated(msgspec.Struct, frozen=True, tag="download.created"):
    record: DownloadRecord


class DownloadStatus(msgspec.Struct, frozen=True, tag="download.status"):
    record: DownloadRecord
    previous: str


class DownloadProgress(msgspec.Struct, frozen=True, tag="download.progress"):
    record: DownloadRecord


class DownloadRetry(msgspec.Struct, frozen=True, tag="download.retry"):
    """A transient fault (a dropped connection, a 5xx, a stall): the transfer waits
    ``delay_s`` and tries again, resuming from its ``.part``. ``attempt`` counts failures in a
    row without progress; ``reason`` labels the ``modelkernel_retries_total`` metric."""

    model_id: str
    attempt: int
    reason: str
    error: str
    delay_s: float


class EngineCreated(msgspec.Struct, frozen=True, tag="engine.created"):
    model_id: str
    model_type: str
    inference_engine: str
    seconds: float = 0.0


Event: TypeAlias = (
    DownloadCreated | DownloadStatus | DownloadProgress | DownloadRetry | EngineCreated
)

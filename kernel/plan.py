"""Turning a create request into a validated, immutable :class:`DownloadPlan`.

Everything that can refuse a request is checked here, before the manager takes a lock or
touches a record: the model id, the URL and the network policy, the digest, the bandwidth
cap, ``include`` patterns, the source that claims the URL (which may pick the file, or list a
set of files: a split model's shards, a repository's files), every file name and path, and
the engine spec. The plan says where each file goes; the manager only turns it into a record.
No file is read or written here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Required, TypedDict, Unpack

import msgspec

from kernel.config import MAX_RATE, NetworkSettings
from kernel.errors import InvalidRequest
from kernel.netpolicy import NetPolicy
from kernel.types import (
    DownloadRecord,
    EngineBackend,
    EngineSpec,
    FileRecord,
    FileSetSource,
    ModelFileBackend,
    ModelType,
    NamedSource,
    PickingSource,
    RemoteFile,
    Source,
)
from kernel.validation import validate_filename, validate_model_id, validate_url

if TYPE_CHECKING:
    from kernel.engines import EngineRegistry

__all__ = ["DownloadPlan", "DownloadRequest", "Planner", "check_rate"]


class DownloadRequest(TypedDict, total=False):
    """What a create asks for (``POST /v1/downloads``, a startup model): the keyword
    arguments of ``DownloadManager.create``. Left out: no digest, no file name (the source
    names it), priority 0, no per-download cap, no engine, one file (no ``include``)."""

    model_id: Required[str]
    url: Required[str]
    model_type: ModelType  # "llm" when left out
    sha256: str | None
    filename: str | None
    priority: int
    engine: EngineSpec | None
    max_bytes_per_second: int
    include: list[str] | None


class DownloadPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A download that may be created: every field checked, every path decided."""

    model_id: str
    url: str  # what the transfer fetches: a picked file's own reference when one was picked
    local_path: str  # the file, or for a set what engines load (or the model's directory)
    files: tuple[FileRecord, ...] | None  # a set of files; None = the one file at local_path
    model_type: ModelType
    engine: EngineSpec | None  # validated; the default backend named when none was
    priority: int
    expected_sha256: str | None  # lower case
    max_bytes_per_second: int

    def record(self, seq: int, now: int) -> DownloadRecord:
        """A new record for this plan (its file records are copies, free to change)."""
        files = None if self.files is None else [msgspec.structs.replace(f) for f in self.files]
        return DownloadRecord(
            model_id=self.model_id,
            url=self.url,
            local_path=self.local_path,
            files=files,
            total_bytes=sum(f.size for f in files) if files else 0,
            download_type="startup" if self.engine is not None else "regular",
            model_type=self.model_type,
            engine=self.engine,
            priority=self.priority,
            seq=seq,
            created_at=now,
            start_time=now,
            expected_sha256=self.expected_sha256,
            max_bytes_per_second=self.max_bytes_per_second,
        )


class Planner:
    """Plans downloads into ``models_dir/<model_id>/``."""

    def __init__(
        self,
        models_dir: Path,
        network: NetworkSettings,
        resolve_source: Callable[[str], Source],
        engines: EngineRegistry,
    ) -> None:
        self.models_dir = models_dir
        self.network = network
        self.resolve_source = resolve_source
        self.engines = engines

    async def plan(self, **request: Unpack[DownloadRequest]) -> DownloadPlan:
        """The plan for a create request; InvalidRequest (naming the field) when refused."""
        self._check(request)
        model_id, sha256 = request["model_id"], request.get("sha256")
        url, name, remote = await self._resolve(
            model_id, request["url"], request.get("filename"), request.get("include")
        )
        engine = request.get("engine")
        if engine is not None:
            engine = self.engines.validate(engine)  # names the default engine when none is
        directory = self.models_dir / model_id
        files = None if remote is None else _file_records(directory, remote)
        return DownloadPlan(
            model_id=model_id,
            url=url,
            local_path=(
                str(directory / name)
                if files is None
                else _primary(directory, files, self.engines.loader(engine))
            ),
            files=files,
            model_type=request.get("model_type", "llm"),
            engine=engine,
            priority=request.get("priority", 0),
            expected_sha256=sha256.lower() if sha256 else None,
            max_bytes_per_second=request.get("max_bytes_per_second", 0),
        )

    def _check(self, request: DownloadRequest) -> None:
        """The request's own fields, before any source is asked about them. A keyword that
        is not one of DownloadRequest's, or a required one left out, is a caller's bug: a
        TypeError, as for any function's keywords (type checkers catch it earlier)."""
        unknown = request.keys() - DownloadRequest.__annotations__.keys()
        missing = {"model_id", "url"} - request.keys()  # Required[] (strings at run time here)
        if unknown or missing:
            raise TypeError(
                "create() takes DownloadRequest's keywords: "
                + "; ".join(
                    f"{what} {', '.join(sorted(names))}"
                    for what, names in (("unexpected", unknown), ("missing", missing))
                    if names
                )
            )
        validate_model_id(request["model_id"])
        validate_url(request["url"])
        NetPolicy(self.network).check_url(request["url"])  # a refused host or address: 400
        sha256, include = request.get("sha256"), request.get("include")
        if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise InvalidRequest("sha256 must be 64 hexadecimal characters.", param="sha256")
        check_rate(request.get("max_bytes_per_second", 0))
        if include is not None and (
            not include or any(not p or len(p) > 1024 for p in include) or len(include) > 100
        ):
            raise InvalidRequest(
                "include must be a list of 1 to 100 non-empty file name patterns.", param="include"
            )

    async def _resolve(
        self, model_id: str, url: str, filename: str | None, include: list[str] | None
    ) -> tuple[str, str, list[RemoteFile] | None]:
        """Ask the source that claims ``url`` what to fetch: (the reference, the one file's
        name or "" for a set, the set's files or None)."""
        source = self.resolve_source(url)
        try:
            if isinstance(source, FileSetSource):
                # A split model's shards, or a repository's files picked by include patterns.
                remote = await source.resolve_files(filename, include)
                if remote is not None:
                    return url, "", remote
            elif include is not None:
                raise InvalidRequest(
                    f"include picks several files of a repository (hf://owner/repo); {url} "
                    "names one file.",
                    param="include",
                )
            if isinstance(source, PickingSource):
                # The source may pick the file itself (a repository ref plus "*Q4_K_M.*":
                # it lists the repository); its ref then names that one file, kept in the record.
                filename = await source.resolve_filename(filename)
                url = source.ref
            name = validate_filename(filename) if filename else _default_filename(source, model_id)
            return url, name, None
        finally:
            await source.aclose()  # the transfer task resolves its own


def check_rate(max_bytes_per_second: int) -> None:
    if not 0 <= max_bytes_per_second <= MAX_RATE:
        raise InvalidRequest(
            f"max_bytes_per_second must be between 0 (unlimited) and {MAX_RATE}.",
            param="max_bytes_per_second",
        )


def _file_records(directory: Path, remote: list[RemoteFile]) -> tuple[FileRecord, ...]:
    """The set's files under the model's directory; every path component is checked."""
    records = []
    seen: set[str] = set()
    for item in remote:
        parts = item.path.split("/")
        for part in parts:
            validate_filename(part, param="url")
        if item.path.lower() in seen:
            raise InvalidRequest(f"The file {item.path!r} is listed twice.", param="url")
        seen.add(item.path.lower())
        records.append(
            FileRecord(
                path=item.path,
                url=item.ref,
                local_path=str(directory.joinpath(*parts)),
                size=item.size or 0,
                expected_sha256=item.sha256.lower() if item.sha256 else None,
            )
        )
    return tuple(records)


def _primary(directory: Path, files: tuple[FileRecord, ...], loader: EngineBackend | None) -> str:
    """What engines load: the one file of a one-file set, else the file the backend that will
    load the set picks (a split model's first shard), else the model's directory."""
    if len(files) == 1:
        return files[0].local_path
    paths = [f.path for f in files]
    chosen = loader.model_file(paths) if isinstance(loader, ModelFileBackend) else None
    return next((f.local_path for f in files if f.path == chosen), str(directory))


def _default_filename(source: Source, model_id: str) -> str:
    name = source.filename if isinstance(source, NamedSource) else None
    try:
        return validate_filename(name) if name else f"{model_id}.bin"
    except InvalidRequest:
        return f"{model_id}.bin"

"""HubSource: one file of a Hugging Face repository, as the hub serves it.

The protocol is huggingface_hub's: a HEAD on ``{endpoint}/{repo}/resolve/{revision}/{path}``
without following redirects answers the commit (``X-Repo-Commit``), the size
(``X-Linked-Size``), the LFS sha256 (``X-Linked-Etag``) and, for an LFS file, a ``Location`` on
the CDN. Relative redirects (a renamed repository) are followed on the hub; an absolute one is
the CDN, which gets no ``Authorization``: the token goes to the hub's own origin only.

Pinning: ``probe()`` resolves the revision to a commit, and ``open()`` asks the hub again for
that commit's file (a fresh CDN location: the signed URLs expire), checking it is the file the
partial download came from. The validator the kernel records is the LFS etag, so a branch that
moved to another version of the file restarts the download at byte 0 instead of splicing two
versions; the sha256 is verified by the kernel before the rename.

Segments (``RangedSource``): a large file may come over several connections, each ``open()``
asking the CDN for one range. The ranges of a split are opened together, so they share one
answer of the hub: a location the hub gave less than ``LOCATION_REUSE_S`` ago is reused (one
HEAD, under a lock, for all of them), and one the CDN refuses (its signature expired) is asked
for again, once, by whichever open finds it refused first.

The CDN is sent ``Range``; ``If-Range`` carries a validator the CDN itself issued (its own
ETag, learnt from an earlier answer in this run) - never the LFS etag, which a CDN's ETag need
not equal. Across a pause the range is safe without it: the location is for a pinned commit
whose etag was just checked, and the whole file is hashed against the LFS sha256 at the end.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import NoReturn
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import msgspec
import structlog

from kernel.errors import (
    InvalidRequest,
    PermanentError,
    SourceError,
    TransientError,
    ValidatorChanged,
)
from kernel.httpclient import HttpSource
from kernel.netpolicy import NetPolicy, guarded_transport
from kernel.pump import is_blocking
from kernel.tls import tls_context, tls_failure
from kernel.types import Body, Probe, QueuingBody
from plugins.hf_source._errors import check_hub_response
from plugins.hf_source._ref import HubRef, has_glob, read_token_file
from plugins.hf_source._shards import shard_name

__all__ = ["HubBody", "HubFile", "HubSource"]

log = structlog.get_logger()

USER_AGENT = "modelkernel/0.1 (hf_source)"
MAX_HUB_REDIRECTS = 5
# How long a CDN location from the hub is reused by further opens (the ranges of a split, the
# retries after a fault) before the hub is asked again. Far below the expiry of the hub's
# signed URLs (an hour); a location the CDN refuses earlier is asked for again at once.
LOCATION_REUSE_S = 60.0
SHOWN_CANDIDATES = 20
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class _FileMeta:
    """What one HEAD on a resolve URL says about the file."""

    commit: str | None
    etag: str | None  # quoted: the LFS sha256 for an LFS file, the git blob id otherwise
    size: int | None
    location: str | None  # the CDN URL of an LFS file; None when the hub serves the bytes

    @property
    def sha256(self) -> str | None:
        tag = self.etag.strip('"') if self.etag else ""
        return tag.lower() if _SHA256.match(tag) else None

    @classmethod
    def from_response(cls, response: httpx.Response, location: str | None) -> _FileMeta:
        headers = response.headers
        raw = headers.get("x-linked-etag") or headers.get("etag")
        etag = None
        if raw and raw.strip():
            etag = '"' + raw.strip().removeprefix("W/").strip('"') + '"'
        size_text = headers.get("x-linked-size") or (
            headers.get("content-length") if location is None else None
        )
        size = int(size_text) if size_text and size_text.strip().isdigit() else None
        return cls(headers.get("x-repo-commit"), etag, size, location)


class _Lfs(msgspec.Struct):
    sha256: str | None = None
    size: int | None = None


class _RepoFile(msgspec.Struct):
    rfilename: str
    size: int | None = None  # with ?blobs=true
    lfs: _Lfs | None = None


@dataclass(frozen=True)
class HubFile:
    """One file of a set (kernel.types.RemoteFile): its local path, pinned reference, size and
    LFS sha256 as the repository listing gives them."""

    path: str
    ref: str
    size: int | None
    sha256: str | None


class _RepoInfo(msgspec.Struct):
    """The part of ``GET /api/{type}s/{repo}/revision/{rev}`` this plugin reads."""

    sha: str | None = None
    siblings: list[_RepoFile] = msgspec.field(default_factory=list)


class HubBody:
    """The CDN's (or hub's) response body, with the LFS etag as its validator and the CDN's
    signed query string kept out of error messages. A fast-path body (kernel.pump) stays one:
    the kernel reads it in a worker thread."""

    def __init__(self, inner: Body, validator: str | None, url: str, owner: HttpSource) -> None:
        self._inner = inner
        self._owner = owner
        self.start = inner.start
        self.total = inner.total
        self.validator = validator or inner.validator
        self._url = url
        if is_blocking(inner):
            self.readinto_blocking = self._readinto_blocking
            self.interrupt = inner.interrupt  # type: ignore[attr-defined]
            if isinstance(inner, QueuingBody):
                self.queued = inner.queued

    def _readinto_blocking(self, view: memoryview, flush_s: float) -> int:
        try:
            n: int = self._inner.readinto_blocking(view, flush_s)  # type: ignore[attr-defined]
        except SourceError as exc:
            _reraise_redacted(exc, self._url)
        return n

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner.chunks():
                yield chunk
        except SourceError as exc:
            _reraise_redacted(exc, self._url)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._owner.aclose()


class HubSource:
    """Fetches ``ref`` (a file of a hub repository) through ``endpoint``; a RangedSource."""

    supports_segments = True  # the CDN (and the hub, for a small file) answers byte ranges

    def __init__(
        self,
        hub_ref: HubRef,
        *,
        ref: str,
        endpoint: str,
        token: str | None = None,
        stall_timeout_s: float = 30.0,
        ca_bundle: str | None = None,
        policy: NetPolicy | None = None,
    ) -> None:
        self.ref = ref  # what the record keeps: the user's reference
        self._ca_bundle = ca_bundle
        self._policy = policy  # the destination policy, for the hub and the CDN alike
        self.hub_ref = hub_ref
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._token_looked_up = token is not None
        self._timeout = httpx.Timeout(connect=10.0, read=stall_timeout_s, write=30.0, pool=10.0)
        self._stall = stall_timeout_s
        self._hub: httpx.AsyncClient | None = None
        self._meta: _FileMeta | None = None
        self._listing: _RepoInfo | None = None  # the repository's files, once listed
        self._cdn_validators: dict[str, str] = {}  # CDN URL without query -> its own ETag
        self._located: tuple[_FileMeta, float] | None = None  # the pinned file's HEAD, and when
        self._locating = asyncio.Lock()  # one HEAD for the opens of a split

    @property
    def filename(self) -> str | None:
        """The local file name: the last part of the path in the repository."""
        return self.hub_ref.basename

    @property
    def commit(self) -> str | None:
        """The commit the revision resolved to, once probed."""
        return self._meta.commit if self._meta else None

    # -- clients -----------------------------------------------------------------------------

    async def _token_value(self) -> str | None:
        if not self._token_looked_up:
            self._token = await asyncio.to_thread(read_token_file)
            self._token_looked_up = True
        return self._token

    async def _hub_client(self) -> httpx.AsyncClient:
        """Talks to the endpoint only, never follows a redirect by itself, carries the token."""
        if self._hub is None:
            headers = {"user-agent": USER_AGENT, "accept-encoding": "identity"}
            token = await self._token_value()
            if token:
                headers["authorization"] = f"Bearer {token}"
            self._hub = httpx.AsyncClient(
                follow_redirects=False, timeout=self._timeout, headers=headers,
                verify=tls_context(self._ca_bundle),
            )  # fmt: skip
            if self._policy is not None:  # after construction: keeps the environment's proxies
                self._hub._transport = guarded_transport(
                    self._policy, tls_context(self._ca_bundle)
                )
        return self._hub

    async def aclose(self) -> None:
        if self._hub is not None:
            await self._hub.aclose()
        self._hub = None

    # -- the Source protocol -------------------------------------------------------------------

    async def probe(self) -> Probe:
        ref = self._file_ref()
        meta = await self._head(ref.resolve_url(self.endpoint, ref.rev))
        self._meta = meta
        log.info(
            "hub.resolved", repo=ref.repo, path=ref.path, revision=ref.rev, commit=meta.commit,
            size=meta.size, lfs=meta.location is not None,
        )  # fmt: skip
        return Probe(
            size=meta.size,
            validator=meta.etag,
            accept_ranges=True,
            sha256=meta.sha256,
            final_url=self._pinned_url(),
            filename=self.filename,
        )

    async def open(self, offset: int, validator: str | None, end: int | None = None) -> HubBody:
        """The bytes from ``offset`` (to ``end``, inclusive, when given) of the pinned file:
        from the CDN for an LFS file, from the hub for a small one."""
        if self._meta is None:
            await self.probe()
        assert self._meta is not None
        if validator is not None and self._meta.etag is not None and validator != self._meta.etag:
            raise ValidatorChanged(f"{self.ref} changed on the hub since the download began.")
        meta, reused = await self._location()
        try:
            return await self._open_at(meta, offset, end)
        except PermanentError:
            if not reused:
                raise
        # A reused location the CDN refuses (a signature that expired): ask the hub again.
        log.info("hub.location_refused", url=_without_query(meta.location or self._pinned_url()))
        meta, _ = await self._location(refused=meta)
        return await self._open_at(meta, offset, end)

    async def _location(self, refused: _FileMeta | None = None) -> tuple[_FileMeta, bool]:
        """The pinned commit's file as the hub last described it (its CDN location) and whether
        that answer was reused: a HEAD unless one answered less than ``LOCATION_REUSE_S`` ago
        and is not ``refused``. Concurrent opens wait for one HEAD rather than each sending
        their own; a location another open already replaced is not asked for again."""
        async with self._locating:
            located = self._located
            if (
                located is not None
                and located[0] is not refused
                and time.monotonic() - located[1] < LOCATION_REUSE_S
            ):
                return located[0], True
            meta = await self._head(self._pinned_url())  # and a fresh CDN location
            expected = self._meta.etag if self._meta else None
            if expected is not None and meta.etag != expected:
                raise ValidatorChanged(f"{self.ref} changed on the hub since the download began.")
            self._located = (meta, time.monotonic())
            return meta, False

    async def _open_at(self, meta: _FileMeta, offset: int, end: int | None) -> HubBody:
        expected = self._meta.etag if self._meta else None
        ranged = offset > 0 or end is not None  # If-Range goes with a Range only
        headers = {"user-agent": USER_AGENT}
        if meta.location is None:  # a small (non-LFS) file: the hub serves it itself
            url = self._pinned_url()
            if_range = expected if ranged else None
            token = await self._token_value()
            if token:  # dropped by the fast path if the hub redirects to another origin
                headers["authorization"] = f"Bearer {token}"
        else:  # the CDN: no credentials
            url = meta.location
            if_range = self._cdn_validators.get(_without_query(url)) if ranged else None
        source = HttpSource(
            url, headers=headers, stall_timeout_s=self._stall, ca_bundle=self._ca_bundle,
            policy=self._policy,
        )  # fmt: skip
        try:
            inner = await source.open(offset, if_range, end)
        except SourceError as exc:
            await source.aclose()
            _reraise_redacted(exc, url)
        except BaseException:
            await source.aclose()
            raise
        if meta.location is not None and inner.validator:
            self._cdn_validators[_without_query(url)] = inner.validator
        return HubBody(inner, expected, url, source)

    # -- a repository reference plus a file name or pattern -------------------------------------

    async def resolve_files(
        self, filename: str | None, include: list[str] | None
    ) -> list[HubFile] | None:
        """The files of a multi-file model, or None when the reference names one file.

        * ``include`` patterns on a repository reference: every file matching one of them
          (each pattern must match something); GGUF files among them must be one model.
        * a pattern (``filename`` on a repository reference, or a glob in the reference's
          path) matching the shards of one split GGUF, or a reference naming one shard: the
          whole shard set, which must be complete in the repository.

        Every file is pinned to the commit the listing answered, so the shards all come from
        one version of the repository. Raises InvalidRequest, listing what matched.
        """
        ref = self.hub_ref
        if include is not None:
            if ref.path is not None or filename:
                raise InvalidRequest(
                    f"include picks files of a repository: give a repository reference such "
                    f"as hf://{ref.repo}@{ref.rev} and no filename (got {self.ref}"
                    + (f" with filename {filename!r})." if filename else ")."),
                    param="include",
                )
            try:
                info = await self._listing_info()
            finally:
                await self.aclose()
            return self._include_set(info, include)
        if ref.path is None:
            pattern, param = filename, "filename"
            if not pattern:
                return None  # resolve_filename explains what a repository reference needs
        elif has_glob(ref.path) or shard_name(ref.path) is not None:
            pattern, param = ref.path, "url"
        else:
            return None  # one file: nothing to list
        try:
            info = await self._listing_info()
        finally:
            await self.aclose()
        files = [f.rfilename for f in info.siblings]
        where = f"{ref.repo}@{ref.rev}"
        matches = _match(pattern, files)
        if not matches:
            if param == "filename":
                return None  # resolve_filename's "no file matches" with the file list
            raise InvalidRequest(
                f"No file in {where} matches {pattern!r}. Files: {_shown(files)}.", param=param
            )
        models = _models(matches)
        if len(models) > 1:
            if param == "filename":
                return None  # resolve_filename's "matches N files" listing them
            raise InvalidRequest(
                f"{self.ref} matches {len(matches)} files of {len(models)} models in {where}: "
                f"{_shown(matches)}; give a pattern that matches one model (one file, or the "
                "shards of one split GGUF).",
                param=param,
            )
        shards = _shard_set(matches[0], files, where, param)
        if shards is None:
            if param == "url":  # a glob in the reference that picked one file
                self.hub_ref = ref.with_path(matches[0])
                self.ref = str(self.hub_ref)
                log.info("hub.file_picked", pattern=pattern, path=matches[0], ref=self.ref)
            return None
        log.info("hub.split_model", pattern=pattern, shards=len(shards), commit=info.sha)
        return [self._hub_file(info, path, path.rsplit("/", 1)[-1]) for path in shards]

    def _include_set(self, info: _RepoInfo, include: list[str]) -> list[HubFile]:
        files = [f.rfilename for f in info.siblings]
        where = f"{self.hub_ref.repo}@{self.hub_ref.rev}"
        picked: set[str] = set()
        for pattern in include:
            found = _match(pattern, files)
            if not found:
                raise InvalidRequest(
                    f"No file in {where} matches the include pattern {pattern!r}. "
                    f"Files: {_shown(files)}.",
                    param="include",
                )
            picked.update(found)
        ggufs = sorted(p for p in picked if p.lower().endswith(".gguf"))
        models = _models(ggufs)
        if len(models) > 1:
            raise InvalidRequest(
                f"The include patterns match GGUF files of {len(models)} models in {where}: "
                f"{_shown(ggufs)}; a download is one model (one file, or the shards of one "
                "split GGUF).",
                param="include",
            )
        ordered: list[str] = []
        if ggufs:
            ordered = _shard_set(ggufs[0], files, where, "include") or ggufs
        ordered += sorted(picked - set(ordered))
        log.info("hub.file_set", include=include, files=len(ordered), commit=info.sha)
        return [self._hub_file(info, path, path) for path in ordered]

    def _hub_file(self, info: _RepoInfo, path: str, local: str) -> HubFile:
        meta = next((f for f in info.siblings if f.rfilename == path), None)
        size = sha256 = None
        if meta is not None:
            size = meta.lfs.size if meta.lfs and meta.lfs.size is not None else meta.size
            digest = meta.lfs.sha256 if meta.lfs else None
            sha256 = digest.lower() if digest and _SHA256.match(digest) else None
        pinned = replace(self.hub_ref, path=path, revision=info.sha or self.hub_ref.revision)
        return HubFile(path=local, ref=str(pinned), size=size, sha256=sha256)

    async def resolve_filename(self, filename: str | None) -> str | None:
        """The local file name for a create request's ``filename``.

        For a file reference, ``filename`` is only the local name and is returned as it is.
        For a repository reference it picks the file: an exact name or a glob
        (``*Q4_K_M.gguf``) matched against the repository's files at the revision; exactly one
        must match. ``self.ref`` then names that file, for the record. Raises InvalidRequest.
        """
        if self.hub_ref.path is not None:
            if filename and has_glob(filename):
                raise InvalidRequest(
                    f"A filename pattern picks a file of a repository reference such as "
                    f"hf://{self.hub_ref.repo}@{self.hub_ref.rev}, but {self.ref} already names "
                    "one file.",
                    param="filename",
                )
            return filename
        try:
            files = [f.rfilename for f in (await self._listing_info()).siblings]
        finally:
            await self.aclose()
        where = f"{self.hub_ref.repo}@{self.hub_ref.rev}"
        if not filename:
            ggufs = [f for f in files if f.lower().endswith(".gguf")] or files
            raise InvalidRequest(
                f"{self.ref} names a repository, not a file: add the path "
                f'(hf://{self.hub_ref.repo}/<path>) or a "filename" pattern such as '
                f'"*Q4_K_M.gguf". Files in {where}: {_shown(ggufs)}.',
                param="filename",
            )
        matches = _match(filename, files)
        if len(matches) != 1:
            if matches:
                raise InvalidRequest(
                    f"The filename {filename!r} matches {len(matches)} files in {where}: "
                    f"{_shown(matches)}; give a pattern that matches one model (one file, or "
                    "the shards of one split GGUF).",
                    param="filename",
                )
            raise InvalidRequest(
                f"No file in {where} matches the filename {filename!r}. Files: {_shown(files)}.",
                param="filename",
            )
        self.hub_ref = self.hub_ref.with_path(matches[0])
        self.ref = str(self.hub_ref)
        self._meta = None
        log.info("hub.file_picked", pattern=filename, path=matches[0], ref=self.ref)
        return self.hub_ref.basename

    async def _listing_info(self) -> _RepoInfo:
        """The repository's files at the revision (with sizes and LFS digests), listed once
        per source."""
        if self._listing is not None:
            return self._listing
        url = self.hub_ref.api_url(self.endpoint) + "?blobs=true"
        try:
            response = await self._hub_get(url)
            check_hub_response(
                response, self.hub_ref, endpoint=self.endpoint, has_token=bool(self._token)
            )
            info = msgspec.json.decode(response.content, type=_RepoInfo)
        except SourceError as exc:
            raise InvalidRequest(exc.message, param="url") from exc
        except msgspec.DecodeError as exc:
            raise InvalidRequest(
                f"The hub at {self.endpoint} sent an unreadable file list for "
                f"{self.hub_ref.repo}: {exc}.",
                param="url",
            ) from exc
        self._listing = info
        return info

    # -- hub requests --------------------------------------------------------------------------

    def _file_ref(self) -> HubRef:
        if self.hub_ref.path is None:
            raise PermanentError(
                f"{self.ref} names a repository, not a file: give the file's path, or a "
                "filename pattern when creating the download."
            )
        return self.hub_ref

    def _pinned_url(self) -> str:
        """The resolve URL at the probed commit (at the revision until probed)."""
        ref = self._file_ref()
        commit = self._meta.commit if self._meta and self._meta.commit else ref.rev
        return ref.resolve_url(self.endpoint, commit)

    async def _head(self, url: str) -> _FileMeta:
        """HEAD a resolve URL on the hub; relative redirects are followed, an absolute one is
        the CDN location and is not."""
        client = await self._hub_client()
        for _ in range(MAX_HUB_REDIRECTS + 1):
            response = await self._send(client, "HEAD", url)
            location = response.headers.get("location")
            if response.is_redirect and location:
                if not urlsplit(location).netloc:
                    url = urljoin(url, location)
                    continue
                return _FileMeta.from_response(response, location)
            check_hub_response(
                response, self.hub_ref, endpoint=self.endpoint, has_token=bool(self._token)
            )
            return _FileMeta.from_response(response, None)
        raise PermanentError(f"The hub redirected {self.ref} too many times.")

    async def _hub_get(self, url: str) -> httpx.Response:
        client = await self._hub_client()
        for _ in range(MAX_HUB_REDIRECTS + 1):
            response = await self._send(client, "GET", url)
            location = response.headers.get("location")
            if not (response.is_redirect and location and not urlsplit(location).netloc):
                return response
            url = urljoin(url, location)
        raise PermanentError(f"The hub redirected {self.ref} too many times.")

    async def _send(self, client: httpx.AsyncClient, method: str, url: str) -> httpx.Response:
        try:
            return await client.request(method, url)
        except httpx.TransportError as exc:
            refused = tls_failure(exc, urlsplit(url).netloc)
            if refused is not None:
                raise refused from exc
            raise TransientError(
                f"Network error ({type(exc).__name__}) while asking the hub at {self.endpoint} "
                f"about {self.ref}: {exc or 'no detail'}",
                reason="network",
            ) from exc


def _match(pattern: str, files: list[str]) -> list[str]:
    """Files whose path or name matches ``pattern``; case-insensitively if nothing matches
    with case (quantisation names are spelt ``Q4_K_M`` and ``q4_k_m``)."""
    for fold in (str, str.lower):
        wanted = fold(pattern)
        found = [
            f for f in files
            if fnmatch.fnmatchcase(fold(f), wanted)
            or fnmatch.fnmatchcase(fold(f.rsplit("/", 1)[-1]), wanted)
        ]  # fmt: skip
        if found:
            return sorted(found)
    return []


def _models(paths: list[str]) -> dict[str, list[str]]:
    """Paths grouped by the model they belong to: a split GGUF's shards together (same
    prefix and shard count), every other file alone."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        shard = shard_name(path)
        key = f"{shard.prefix}\0{shard.count}" if shard is not None else path
        groups.setdefault(key, []).append(path)
    return groups


def _shard_set(path: str, files: list[str], where: str, param: str) -> list[str] | None:
    """Every shard of the split model ``path`` is a shard of, in order, from the repository's
    ``files``; None when ``path`` is not a shard of a model in several files. A shard missing
    from the repository is an InvalidRequest naming it."""
    shard = shard_name(path)
    if shard is None or shard.count == 1:
        return None
    by_no: dict[int, str] = {}
    for candidate in files:
        other = shard_name(candidate)
        if other is not None and (other.prefix, other.count) == (shard.prefix, shard.count):
            by_no[other.no] = candidate
    missing = [n for n in range(1, shard.count + 1) if n not in by_no]
    if missing:
        name = shard.prefix.rsplit("/", 1)[-1]
        absent = ", ".join(f"{name}-{n:05d}-of-{shard.count:05d}.gguf" for n in missing)
        raise InvalidRequest(
            f"The split model {shard.prefix} has {shard.count} shards but {where} lacks "
            f"{len(missing)} of them: {absent}.",
            param=param,
        )
    return [by_no[n] for n in range(1, shard.count + 1)]


def _shown(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(sorted(names)[:SHOWN_CANDIDATES])
    more = len(names) - SHOWN_CANDIDATES
    return shown + (f" and {more} more" if more > 0 else "")


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _reraise_redacted(exc: SourceError, url: str) -> NoReturn:
    """Raise ``exc`` again, without a signed URL's query string (its credentials)."""
    shown = _without_query(url)
    if shown == url or url not in exc.message:
        raise exc
    message = exc.message.replace(url, shown)
    if isinstance(exc, TransientError):
        raise TransientError(message, retry_after=exc.retry_after, reason=exc.reason) from exc
    raise type(exc)(message) from exc

"""An emulated Hugging Face hub on loopback, for hf_source's end-to-end tests.

It runs on the :class:`~tests.helpers.origin.Origin` machinery (uvicorn in a thread, request
log, ``faults``: ``fail_statuses`` + ``retry_after`` make the hub answer 429 with Retry-After)
and answers what huggingface_hub expects of huggingface.co:

* ``HEAD``/``GET /{owner}/{repo}/resolve/{revision}/{path}``: an LFS file is a 302 to the CDN
  (a second Origin, the blob named by its sha256, with a signed-looking query, a new signature
  each time: ``expire_locations`` makes the CDN refuse those given so far with 403) carrying
  ``X-Repo-Commit``, ``X-Linked-Size`` and ``X-Linked-Etag`` (the quoted sha256); a small
  (non-LFS) file is served by the hub itself with its git blob id as ETag, Range and If-Range.
* ``GET /api/models/{owner}/{repo}[/revision/{revision}]``: ``{"id", "sha", "siblings":
  [{"rfilename", "blobId", "size", "lfs": {"sha256", "size"}}]}`` (what ``?blobs=true`` adds
  is always sent).
* errors as the hub sends them: ``X-Error-Code`` RepoNotFound (401 without a token, 404 with
  one; a private repo the token cannot read is indistinguishable), GatedRepo (401 without a
  token, 403 with one not granted access), RevisionNotFound, EntryNotFound; an unknown token is
  a 401 "Invalid credentials"; a renamed repository answers a relative 307.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from tests.helpers.origin import Origin, _parse_range, _Reply, _text

__all__ = ["Hub", "HubRepo", "gguf_blob", "is_lfs"]

LFS_SUFFIXES = (".gguf", ".bin", ".safetensors", ".pt", ".onnx")


def gguf_blob(size: int, seed: int = 0) -> bytes:
    """Bytes that look like a GGUF file (magic, version 3), ``size`` long in all."""
    head = b"GGUF" + (3).to_bytes(4, "little")
    return head + hashlib.shake_256(f"gguf-{seed}".encode()).digest(max(size - len(head), 0))


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    gated: bool = False
    private: bool = False
    readers: set[str] = field(default_factory=set)  # tokens that may read a gated/private repo
    branches: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files


class Hub(Origin):
    """The emulated hub; ``cdn`` is the Origin that serves LFS blobs."""

    def __init__(self, cdn: Origin, tls: object = None) -> None:
        super().__init__(tls=tls)
        self.cdn = cdn
        self.tokens: set[str] = set()  # every token the hub knows
        self.repos: dict[str, HubRepo] = {}
        self.renamed: dict[str, str] = {}
        self.signed: list[str] = []  # the query string of each CDN location given, in order
        self._counter = 0
        self._signatures = 0  # never reset: a signature is not given twice by one server

    # -- content -------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        gated: bool = False,
        private: bool = False,
        readers: tuple[str, ...] = (),
    ) -> str:
        """Create (or replace) a repository whose main branch holds ``files``; its commit."""
        with self._lock:
            self.repos[repo_id] = HubRepo(repo_id, gated, private, set(readers))
        return self.commit(repo_id, files, replace=True)

    def commit(
        self, repo_id: str, files: dict[str, bytes], branch: str = "main", *, replace: bool = False
    ) -> str:
        """A new commit on ``branch`` with ``files`` added (or only them, with ``replace``)."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch)
            tree = {} if replace or parent is None else dict(repo.commits[parent])
            tree.update(files)
            self._counter += 1
            commit = hashlib.sha1(f"{repo_id}:{self._counter}".encode(), usedforsecurity=False)
            sha = commit.hexdigest()
            repo.commits[sha] = tree
            repo.branches[branch] = sha
        for path, data in files.items():
            if is_lfs(path):
                self.cdn.add_file(self.blob_name(data), data)
        return sha

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        with self._lock:
            self.repos[repo_id].branches[name] = commit

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            self.renamed[old] = new

    @staticmethod
    def blob_name(data: bytes) -> str:
        """The CDN path of an LFS blob: content-addressed, like the real one."""
        sha = hashlib.sha256(data).hexdigest()
        return f"repos/{sha[:2]}/{sha[2:4]}/{sha}"

    def expire_locations(self) -> int:
        """Make every CDN location given so far expired (the CDN answers it 403); how many."""
        with self._lock:
            signed = list(self.signed)
        with self.cdn._lock:
            self.cdn.faults.expired_queries.update(signed)
        return len(signed)

    def resolve_url(self, repo_id: str, revision: str, path: str) -> str:
        return f"{self.base_url}/{repo_id}/resolve/{revision}/{path}"

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.tokens.clear()
            self.repos.clear()
            self.renamed.clear()
            self.signed.clear()

    # -- the routes (called by Origin._app with the lock held) -----------------------------------

    def _decide(self, method: str, name: str, headers: dict[str, str]) -> _Reply:
        faults = self.faults
        if faults.fail_statuses:
            status = faults.fail_statuses.pop(0)
            extra = [] if faults.retry_after is None else [("retry-after", str(faults.retry_after))]
            return _json(status, {"error": f"injected failure {status}"}, *extra)
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed\n", ("allow", "GET, HEAD"))
        parts = name.split("/")
        auth = headers.get("authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is not None and token not in self.tokens:
            return _error(401, None, "Invalid credentials in Authorization header")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(parts[2:], token)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(method, parts, headers, token)
        return _text(404, "not found\n")

    def _access(self, repo_id: str, token: str | None, *, listing: bool = False) -> _Reply | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token not in repo.readers):
            return _error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        if repo.gated and token not in repo.readers and not listing:  # metadata stays public
            if token is None:
                return _error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. "
                    "You must have access to it and be authenticated to access it.",
                )
            return _error(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list.",
            )
        return None

    def _api(self, rest: list[str], token: str | None) -> _Reply:
        repo_id, tail = "/".join(rest[:2]), rest[2:]
        if repo_id in self.renamed:
            moved = "/".join(["", "api", "models", self.renamed[repo_id], *tail])
            return _text(307, "moved\n", ("location", moved))
        if (denied := self._access(repo_id, token, listing=True)) is not None:
            return denied
        repo = self.repos[repo_id]
        revision = "/".join(tail[1:]) if tail[:1] == ["revision"] else "main"
        commit = self._commit_of(repo, revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [_sibling(path, data) for path, data in sorted(repo.commits[commit].items())]
        return _json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": repo.private,
                "gated": repo.gated,
                "siblings": siblings,
            },
        )

    def _resolve(
        self, method: str, parts: list[str], headers: dict[str, str], token: str | None
    ) -> _Reply:
        repo_id = "/".join(parts[:2])
        if repo_id in self.renamed:
            moved = "/".join(["", self.renamed[repo_id], *parts[2:]])
            return _text(307, "moved\n", ("location", moved))
        if (denied := self._access(repo_id, token)) is not None:
            return denied
        repo = self.repos[repo_id]
        # The path is already percent-decoded, so a revision may span segments ("refs/pr/1").
        rest = parts[3:]
        revision, path = rest[0], "/".join(rest[1:])
        for cut in range(len(rest) - 1, 0, -1):
            if self._commit_of(repo, "/".join(rest[:cut])) is not None:
                revision, path = "/".join(rest[:cut]), "/".join(rest[cut:])
                break
        commit = self._commit_of(repo, revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.commits[commit].get(path)
        if data is None:
            return _error(404, "EntryNotFound", "Entry not found", ("x-repo-commit", commit))
        common = [("x-repo-commit", commit), ("accept-ranges", "bytes")]
        if is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            self._signatures += 1
            query = f"X-Amz-Expires=3600&X-Amz-Signature={self._signatures:016x}"
            self.signed.append(query)
            location = f"{self.cdn.url(self.blob_name(data))}?{query}"
            return _text(302, f"Found. Redirecting to {location}", *common,
                         ("location", location), ("x-linked-size", str(len(data))),
                         ("x-linked-etag", f'"{sha}"'), ("etag", f'"{sha}"'))  # fmt: skip
        return _serve(data, f'"{git_blob_id(data)}"', headers, common)

    @staticmethod
    def _commit_of(repo: HubRepo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.commits else None


def _sibling(path: str, data: bytes) -> dict[str, object]:
    """A file as ``?blobs=true`` lists it (always sent here: extra keys are harmless)."""
    entry: dict[str, object] = {"rfilename": path, "blobId": git_blob_id(data), "size": len(data)}
    if is_lfs(path):
        sha = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
    return entry


def _json(status: int, body: object, *headers: tuple[str, str]) -> _Reply:
    data = json.dumps(body).encode()
    return _Reply(status, [("content-type", "application/json"),
                           ("content-length", str(len(data))), *headers], data)  # fmt: skip


def _error(status: int, code: str | None, message: str, *headers: tuple[str, str]) -> _Reply:
    extra = [("x-error-message", message), *headers]
    if code is not None:
        extra.append(("x-error-code", code))
    return _json(status, {"error": message}, *extra)


def _serve(
    data: bytes, etag: str, headers: dict[str, str], common: list[tuple[str, str]]
) -> _Reply:
    """A file the hub serves itself, with single ranges and If-Range."""
    out = [*common, ("etag", etag), ("content-type", "application/octet-stream")]
    span = None
    if "range" in headers and headers.get("if-range", etag) == etag:
        span = _parse_range(headers["range"], len(data))
    if span is None:
        return _Reply(200, [*out, ("content-length", str(len(data)))], data, stream=True)
    if span[0] >= len(data):
        return _text(416, "range not satisfiable\n", ("content-range", f"bytes */{len(data)}"))
    body = data[span[0] : span[1]]
    out += [("content-range", f"bytes {span[0]}-{span[1] - 1}/{len(data)}"),
            ("content-length", str(len(body)))]  # fmt: skip
    return _Reply(206, out, body, stream=True)

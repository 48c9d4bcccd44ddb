"""Hub references: ``hf://`` refs and resolve URLs, the endpoint, and the token.

Forms understood (``owner/repo`` may be prefixed by ``datasets/`` or ``spaces/``)::

    hf://owner/repo/path/in/repo.gguf            file at the default branch (main)
    hf://owner/repo/path/in/repo.gguf@revision   file at a branch, tag or commit ("refs/pr/1" too)
    hf://owner/repo@revision/path/in/repo.gguf   huggingface_hub's HfFileSystem spelling
    hf://owner/repo[@revision]                   a repository: the create request's
                                                 ``filename`` (a name or a glob) picks the file
    https://huggingface.co/owner/repo/resolve/<revision>/<path>   (hf.co, /blob/ links too)
    <configured endpoint>/owner/repo/resolve/<revision>/<path>

Whatever the form, requests go to the configured endpoint. A path that itself contains ``@``
needs an explicit revision (``hf://o/r/a@b.gguf@main``): the revision is after the last ``@``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from kernel.errors import InvalidRequest

__all__ = [
    "DEFAULT_ENDPOINT",
    "HubRef",
    "configured_token",
    "has_glob",
    "hub_endpoint",
    "read_token_file",
    "token_path",
]

DEFAULT_ENDPOINT = "https://huggingface.co"
SCHEME = "hf://"
HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space", "models": "model"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_USAGE = "use hf://owner/repo/path/in/repo.gguf[@revision] or hf://owner/repo[@revision]"


def has_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


@dataclass(frozen=True)
class HubRef:
    """One repository (and, unless it names the whole repository, one file in it)."""

    repo_id: str  # "owner/repo" (or a legacy one-part id, from resolve URLs only)
    path: str | None = None  # path in the repository, None for a repository reference
    revision: str | None = None  # None: the default branch
    repo_type: str = "model"

    @property
    def rev(self) -> str:
        return self.revision or "main"

    @property
    def repo(self) -> str:
        """The repository as the user sees it: ``owner/repo`` or ``datasets/owner/repo``."""
        return _URL_PREFIX[self.repo_type] + self.repo_id

    @property
    def basename(self) -> str | None:
        return self.path.rsplit("/", 1)[-1] if self.path else None

    def with_path(self, path: str) -> HubRef:
        return replace(self, path=path)

    def __str__(self) -> str:
        if self.path is None:
            return f"{SCHEME}{self.repo}" + (f"@{self.revision}" if self.revision else "")
        if "@" in self.path:  # the HfFileSystem spelling keeps such a path unambiguous
            return f"{SCHEME}{self.repo}@{quote(self.rev, safe='')}/{self.path}"
        return f"{SCHEME}{self.repo}/{self.path}" + (f"@{self.revision}" if self.revision else "")

    # -- URLs on the endpoint --------------------------------------------------------------

    def resolve_url(self, endpoint: str, revision: str) -> str:
        assert self.path is not None
        return f"{endpoint}/{self.repo}/resolve/{quote(revision, safe='')}/{quote(self.path)}"

    def api_url(self, endpoint: str) -> str:
        return (
            f"{endpoint}/api/{self.repo_type}s/{self.repo_id}/revision/{quote(self.rev, safe='')}"
        )

    def page_url(self, endpoint: str) -> str:
        return f"{endpoint}/{self.repo}"

    # -- parsing -----------------------------------------------------------------------------

    @classmethod
    def parse(cls, ref: str, endpoint: str) -> HubRef | None:
        """The reference ``ref`` names, None if it is not a hub reference. A malformed
        ``hf://`` ref, or a resolve URL without a file, raises InvalidRequest(param="url")."""
        if ref[: len(SCHEME)].lower() == SCHEME:
            return cls._parse_hf(ref)
        return cls._parse_url(ref, endpoint)

    @classmethod
    def _parse_hf(cls, ref: str) -> HubRef:
        rest = ref[len(SCHEME) :]
        parts = rest.split("/")
        repo_type = "model"
        if parts[0] in _TYPE_PREFIXES and len(parts) > 2:
            repo_type = _TYPE_PREFIXES[parts.pop(0)]
        if len(parts) < 2:
            raise _bad(ref, "it names no repository")
        owner, name, tail = parts[0], parts[1], parts[2:]
        revision: str | None = None
        if "@" in name:  # hf://owner/repo@rev[/path]: the revision is quoted ("refs%2Fpr%2F1")
            name, _, quoted = name.partition("@")
            revision = unquote(quoted)
            path = "/".join(tail) or None
        else:
            path = "/".join(tail) or None
            if path is not None and "@" in path:
                path, _, revision = path.rpartition("@")
                path = path or None
        if not (_NAME.match(owner) and _NAME.match(name)):
            raise _bad(ref, "the repository must be owner/repo (letters, digits, - _ .)")
        if revision is not None and not _valid_revision(revision):
            raise _bad(ref, f"invalid revision {revision!r}")
        if path is not None:
            _check_path(ref, path)
        return cls(f"{owner}/{name}", path, revision, repo_type)

    @classmethod
    def _parse_url(cls, ref: str, endpoint: str) -> HubRef | None:
        url = urlsplit(ref)
        if url.scheme.lower() not in ("http", "https"):
            return None
        base = urlsplit(endpoint)
        host = (url.hostname or "").lower()
        if host in HUB_HOSTS and not url.port:
            path = url.path
        elif (url.scheme.lower(), url.netloc.lower()) == (base.scheme.lower(), base.netloc.lower()):
            prefix = base.path.rstrip("/")
            if not url.path.startswith(prefix + "/"):
                return None
            path = url.path[len(prefix) :]
        else:
            return None
        segments = path.strip("/").split("/")
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type = _TYPE_PREFIXES[segments.pop(0)]
        marker = next(
            (i for i in (1, 2) if len(segments) > i and segments[i] in ("resolve", "blob")), None
        )
        if marker is None:
            return None  # some other page of the hub: not a file, not ours
        repo_parts = segments[:marker]
        if not all(_NAME.match(p) for p in repo_parts):
            return None
        if len(segments) < marker + 3 or not all(segments[marker + 2 :]):
            raise _bad(ref, "a resolve URL needs /resolve/<revision>/<path/in/repo>")
        revision = unquote(segments[marker + 1])
        file_path = "/".join(unquote(s) for s in segments[marker + 2 :])
        if not _valid_revision(revision):
            raise _bad(ref, f"invalid revision {revision!r}")
        _check_path(ref, file_path)
        return cls("/".join(repo_parts), file_path, revision, repo_type)


def _valid_revision(revision: str) -> bool:
    return bool(revision) and not any(c.isspace() or not c.isprintable() for c in revision)


def _check_path(ref: str, path: str) -> None:
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise _bad(ref, f"invalid path in the repository {path!r}")
    if any(not c.isprintable() for c in path):
        raise _bad(ref, "the path contains control characters")


def _bad(ref: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid Hugging Face reference {ref[:300]!r}: {why}; {_USAGE}.", param="url"
    )


# --- endpoint and token -------------------------------------------------------------------------


def hub_endpoint(configured: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """``sources.huggingface.endpoint``, else ``HF_ENDPOINT``, else https://huggingface.co."""
    endpoint = configured or environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return endpoint.rstrip("/")


def configured_token(configured: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """``sources.huggingface.token``, else ``HF_TOKEN`` (or the older
    ``HUGGING_FACE_HUB_TOKEN``). The token file is read later, by the source: no I/O here."""
    for token in (configured, environ.get("HF_TOKEN"), environ.get("HUGGING_FACE_HUB_TOKEN")):
        if token and token.strip():
            return token.strip()
    return None


def token_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where huggingface_hub keeps the token of ``hf auth login``: ``HF_TOKEN_PATH``, else
    ``$HF_HOME/token``; ``HF_HOME`` defaults to ``$XDG_CACHE_HOME/huggingface`` or
    ``~/.cache/huggingface``."""
    if environ.get("HF_TOKEN_PATH"):
        return Path(environ["HF_TOKEN_PATH"]).expanduser()
    home = environ.get("HF_HOME")
    if not home:
        cache = environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        home = os.path.join(cache, "huggingface")
    return Path(home).expanduser() / "token"


def read_token_file(environ: Mapping[str, str] = os.environ) -> str | None:
    """The token saved by huggingface_hub, or None (blocking: call it in a worker thread)."""
    try:
        token = token_path(environ).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None

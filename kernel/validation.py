"""Input checks shared by the API and the kernel: ids, URLs and file names are rejected
(never silently rewritten) when they could escape ``models_dir`` or confuse a log line."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from urllib.parse import urlsplit

import idna

from kernel.errors import InvalidRequest

__all__ = [
    "MAX_FILENAME_BYTES",
    "MAX_URL_LENGTH",
    "MODEL_ID",
    "http_url_problem",
    "redact_text",
    "redact_url",
    "validate_filename",
    "validate_model_id",
    "validate_url",
]

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")


def validate_model_id(model_id: str, *, param: str = "model_id", code: str | None = None) -> None:
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidRequest(
            f"Invalid model ID {model_id[:140]!r}: use 1-128 letters, digits and . _ : @ + - "
            "starting with a letter or digit.",
            param=param,
            code=code,
        )


MAX_URL_LENGTH = 8192


# scheme://userinfo@ : what the API, events and logs never show (up to the last "@" before the
# path, as a URL parser reads it).
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its credentials (``user:password@``) replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", url)


def redact_text(text: str) -> str:
    """Every URL's credentials in ``text`` (an error message, a log value) replaced."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


# A file name is at most 255 bytes on common file systems, and the partial file adds ".part".
MAX_FILENAME_BYTES = 255 - len(".part")
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


def validate_url(url: str, *, param: str = "url") -> None:
    """Bounded length, no control characters, and an ``http(s)`` URL well-formed (host, port).
    Which schemes work is up to the source plugins."""
    if not url or len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"The URL must be 1 to {MAX_URL_LENGTH} characters long.", param=param)
    if any(unicodedata.category(c)[0] == "C" for c in url):
        raise InvalidRequest("The URL contains control characters.", param=param)
    if url[:8].lower().startswith(("http://", "https://")):
        problem = http_url_problem(url)
        if problem is not None:
            raise InvalidRequest(problem, param=param)


def http_url_problem(url: str) -> str | None:
    """What is wrong with an ``http(s)`` URL (its host or port), as a sentence for the user;
    None when it is well-formed. Sources check each redirect target with it too."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"The URL {url[:200]!r} is not valid: {exc}."
    if parts.scheme.lower() not in ("http", "https"):
        return f"The URL {url[:200]!r} is not an http:// or https:// URL."
    hostport = parts.netloc.rpartition("@")[2]
    raw_port = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    raw_port = raw_port.rpartition(":")[2] if ":" in raw_port else ""
    try:
        port = parts.port
    except ValueError:
        port = None
    if raw_port and (port is None or not 1 <= port <= 65535):
        return f"The URL's port {raw_port[:20]!r} is not a number from 1 to 65535."
    host = parts.hostname or ""
    if not host:
        return f"The URL {url[:200]!r} has no host name."
    problem = _host_problem(host)
    return None if problem is None else f"The URL's host name {host[:260]!r} {problem}."


def _host_problem(host: str) -> str | None:
    """What is wrong with a host name (None when it is an IP address or a valid name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253:
        return "is longer than 253 characters"
    for label in name.split("."):
        if not label:
            return "has an empty label (two dots in a row, or a leading dot)"
        try:
            ascii_label = (
                label
                if label.isascii() and not label.startswith("xn--")
                else (idna.encode(label, uts46=True).decode("ascii"))
            )
            if label.startswith("xn--"):
                idna.decode(label)
        except (idna.IDNAError, UnicodeError) as exc:
            return f"is not a valid international domain name ({exc})"
        if len(ascii_label) > 63:
            return "has a label longer than 63 characters"
        if not _HOST_LABEL.match(ascii_label.lower()):
            return f"has a label with characters a host name cannot hold ({label[:63]!r})"
    return None


def validate_filename(name: str, *, param: str = "filename") -> str:
    """A single path component that cannot escape its directory: rejected, never rewritten."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(unicodedata.category(c)[0] == "C" for c in name)
    ):
        raise InvalidRequest(f"Invalid file name {name[:300]!r}.", param=param)
    if len(name.encode()) > MAX_FILENAME_BYTES:
        raise InvalidRequest(
            f"The file name is {len(name.encode())} bytes long; at most {MAX_FILENAME_BYTES} "
            "bytes fit (the partial file adds '.part' within the 255-byte limit).",
            param=param,
        )
    return name

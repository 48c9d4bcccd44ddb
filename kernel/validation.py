"""Input checks shared by the API and the kernel: ids, URLs and file names are rejected
(never silently rewritten) when they could escape ``models_dir`` or confuse a log line."""

from __future__ import annotations

import re
import unicodedata

from kernel.errors import InvalidRequest

__all__ = ["MAX_URL_LENGTH", "MODEL_ID", "validate_filename", "validate_model_id", "validate_url"]

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


def validate_url(url: str, *, param: str = "url") -> None:
    """Bounded length, no control characters. Which schemes work is up to the source plugins."""
    if not url or len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"The URL must be 1 to {MAX_URL_LENGTH} characters long.", param=param)
    if any(unicodedata.category(c)[0] == "C" for c in url):
        raise InvalidRequest("The URL contains control characters.", param=param)


def validate_filename(name: str, *, param: str = "filename") -> str:
    """A single path component that cannot escape its directory: rejected, never rewritten."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or len(name.encode()) > 255
        or any(unicodedata.category(c)[0] == "C" for c in name)
    ):
        raise InvalidRequest(f"Invalid file name {name[:300]!r}.", param=param)
    return name

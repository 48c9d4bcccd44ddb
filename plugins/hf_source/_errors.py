"""The hub's error answers, as the kernel's typed source errors with a sentence each.

The hub says what went wrong in ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``) and ``X-Error-Message``; a HEAD answer has no body, so the
headers are all there is. A missing or private repository both answer ``RepoNotFound`` (401
without a token, 404 with one): the hub does not say which.
"""

from __future__ import annotations

import httpx

from kernel.errors import PermanentError, SourceError, TransientError
from kernel.http import retry_after_seconds
from plugins.hf_source._ref import HubRef

__all__ = ["TOKEN_HINT", "check_hub_response", "retry_after"]

TOKEN_HINT = "set HF_TOKEN (or sources.huggingface.token)"  # noqa: S105 (advice, not a secret)
DISABLED = "Access to this resource is disabled."


def retry_after(response: httpx.Response) -> float | None:
    return retry_after_seconds(response.headers)


def check_hub_response(
    response: httpx.Response, ref: HubRef, *, endpoint: str, has_token: bool
) -> None:
    """Raise the typed error for a failed hub answer; return for any status below 400."""
    if response.status_code >= 400:
        raise hub_error(response, ref, endpoint=endpoint, has_token=has_token)


def hub_error(
    response: httpx.Response, ref: HubRef, *, endpoint: str, has_token: bool
) -> SourceError:
    status = response.status_code
    code = response.headers.get("x-error-code")
    server = (response.headers.get("x-error-message") or "").strip()
    said = f": {server}" if server else ""
    repo, page = ref.repo, ref.page_url(endpoint)
    if status == 429:
        wait = retry_after(response)
        when = f"; retrying after {wait:g} s" if wait is not None else "; retrying later"
        return TransientError(
            f"The Hugging Face hub at {endpoint} is rate limiting requests (HTTP 429){when}.",
            retry_after=wait,
            reason="http_429",
        )
    if status == 408 or status >= 500:
        return TransientError(
            f"The Hugging Face hub at {endpoint} answered HTTP {status}{said} for {ref}.",
            retry_after=retry_after(response),
            reason=f"http_{status}",
        )
    if code == "RevisionNotFound":
        return PermanentError(f"Revision {ref.rev!r} was not found in repository {repo}.")
    if code == "EntryNotFound":
        return PermanentError(
            f"File {ref.path!r} was not found in repository {repo} at revision {ref.rev!r}."
        )
    if code == "GatedRepo":
        if has_token:
            return PermanentError(
                f"Repository {repo} is gated and the configured token has not been granted "
                f"access (HTTP {status}): request access at {page}, then {TOKEN_HINT} to a "
                "token of the account that was granted it."
            )
        return PermanentError(
            f"Repository {repo} is gated and no token is configured (HTTP {status}): request "
            f"access at {page}, then {TOKEN_HINT} to a token of that account."
        )
    if server == DISABLED:
        return PermanentError(f"Repository {repo} has been disabled on the hub.")
    if code == "RepoNotFound" or (status == 401 and not has_token and not code):
        if has_token:
            hint = "check its name; if it is private, the configured token cannot read it"
        else:
            hint = f"check its name; if it is private, {TOKEN_HINT} to a token that can read it"
        return PermanentError(
            f"Repository {repo} was not found on {endpoint} (HTTP {status}): {hint}."
        )
    if status in (401, 403):
        return PermanentError(
            f"The hub refused access to {repo} (HTTP {status}{said}): {TOKEN_HINT} to a valid "
            "token with read access."
        )
    if status == 404:
        return PermanentError(f"Not found on the hub (HTTP 404{said}): {ref}.")
    return PermanentError(f"The hub refused the request for {ref} with HTTP {status}{said}.")

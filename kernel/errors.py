"""Typed errors that cross the kernel and plugin boundaries.

::

    KernelError
    ├── SourceError                 raised by Source.probe() / Source.open()
    │   ├── TransientError          retry with backoff, resuming from the .part file
    │   ├── PermanentError          fail the download now; the message is shown to the user
    │   └── ValidatorChanged        the remote file changed: restart from byte 0
    ├── NotFound                    what the request names does not exist
    │   └── DownloadNotFound        no download with that model id
    ├── Conflict                    it exists already, or is not ready yet
    │   └── DownloadExists          a non-terminal download with that id already exists
    ├── InvalidState                the action is not allowed in the download's status
    ├── InvalidRequest              bad input; ``param`` names the offending field
    ├── EngineError                 an engine backend could not build or run an engine
    │   └── ModelLoadingFailed      a model file given by path could not be loaded
    ├── StoreError                  a store (or its lease board) cannot be used, now or at all
    └── LeaseLost                   a lease this node held was taken over or ran out

Kernel errors know nothing about HTTP: the API maps each class to a status and an error type
in one table (kernel/api/errors.py). Every error carries ``param`` (the request field it is
about) and ``code`` (a stable machine-readable reason), both optional. Every message is a
finished sentence for the user; data lives in attributes.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "DownloadExists",
    "DownloadNotFound",
    "EngineError",
    "InvalidRequest",
    "InvalidState",
    "KernelError",
    "LeaseLost",
    "ModelLoadingFailed",
    "NotFound",
    "PermanentError",
    "SourceError",
    "StoreError",
    "TransientError",
    "ValidatorChanged",
]


class KernelError(Exception):
    """Base of every error the kernel raises on purpose. ``param`` and ``code`` default to
    the class's own (None unless a subclass says otherwise)."""

    param: str | None = None
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class SourceError(KernelError):
    """A source could not deliver bytes."""


class TransientError(SourceError):
    """A fault that may go away: connection errors, resets, stalls, 5xx, 408, 429."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, reason: str = "network"
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason  # short label for metrics: network, stall, http_503, short_body


class PermanentError(SourceError):
    """A fault that retrying cannot fix: 404, 401/403, a bad reference, a failed check."""


class ValidatorChanged(SourceError):
    """The remote file is not the one the partial file came from; start again at byte 0."""


class NotFound(KernelError):
    """What the request names (a model, a download) does not exist."""


class Conflict(KernelError):
    """What the request would create exists already, or what it needs is not ready yet."""


class DownloadNotFound(NotFound):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"No download found for model ID: {model_id}", param="model_id")
        self.model_id = model_id


class DownloadExists(Conflict):
    code = "download_exists"

    def __init__(self, model_id: str, status: str) -> None:
        super().__init__(
            f"A download for model ID {model_id} is already {status}; "
            "cancel it first or wait for it to end.",
            param="model_id",
        )
        self.model_id = model_id
        self.status = status


class InvalidState(KernelError):
    def __init__(self, model_id: str, action: str, status: str) -> None:
        super().__init__(f"Cannot {action} download {model_id} with status: {status}")
        self.model_id = model_id
        self.action = action
        self.status = status


class InvalidRequest(KernelError):
    """Bad input; ``param`` names the offending field."""


class EngineError(KernelError):
    """An engine backend failed; the message is the backend's reason."""

    code = "engine_error"


class ModelLoadingFailed(EngineError):
    """A model file the request named could not be loaded (the request's fault, not the
    server's: the file is not a model the engine can load)."""

    code = "model_loading_failed"


class StoreError(KernelError):
    """A store, or its lease board, cannot be used: unreachable (the caller may retry), damaged
    or from a newer version (fatal at start); the message says why and what to do."""

    code = "store_error"


class LeaseLost(KernelError):
    """This node no longer holds the lease (another node claimed it, or it ran out): the
    holder must stop writing for it."""

    code = "lease_lost"

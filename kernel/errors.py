"""Typed errors that cross the kernel and plugin boundaries.

::

    KernelError
    ├── SourceError                 raised by Source.probe() / Source.open()
    │   ├── TransientError          retry with backoff, resuming from the .part file
    │   ├── PermanentError          fail the download now; the message is shown to the user
    │   └── ValidatorChanged        the remote file changed: restart from byte 0
    ├── DownloadNotFound            no download with that model id
    ├── DownloadExists              a non-terminal download with that id already exists
    ├── InvalidState                the action is not allowed in the download's status
    ├── InvalidRequest              bad input; ``param`` names the offending field
    └── EngineError                 an engine backend could not build or run an engine

Kernel errors know nothing about HTTP: the API maps them to status codes in one table.
Every message is a finished sentence for the user; data lives in attributes.
"""

from __future__ import annotations

__all__ = [
    "DownloadExists",
    "DownloadNotFound",
    "EngineError",
    "InvalidRequest",
    "InvalidState",
    "KernelError",
    "PermanentError",
    "SourceError",
    "TransientError",
    "ValidatorChanged",
]


class KernelError(Exception):
    """Base of every error the kernel raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class DownloadNotFound(KernelError):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"No download found for model ID: {model_id}")
        self.model_id = model_id


class DownloadExists(KernelError):
    def __init__(self, model_id: str, status: str) -> None:
        super().__init__(
            f"A download for model ID {model_id} is already {status}; "
            "cancel it first or wait for it to end."
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
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class EngineError(KernelError):
    """An engine backend failed; the message is the backend's reason."""

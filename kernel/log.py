"""Logging: the one ``structlog.configure`` call. The CLI calls it; tests never do."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from kernel.validation import redact_text

__all__ = ["configure_logging", "redact_secrets"]


def redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A processor: credentials in URLs (``user:pw@``) in any value, nested ones and
    rendered tracebacks included, become ``***@``."""
    return {key: _redact(value) for key, value in event.items()}


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Console lines on a TTY, JSON lines otherwise (or as ``json`` says)."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: list[structlog.typing.Processor] = (
        [structlog.processors.dict_tracebacks, redact_secrets, structlog.processors.JSONRenderer()]
        if json
        else [redact_secrets, structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )

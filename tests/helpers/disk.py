"""A full disk, injected at the kernel's one write seam (kernel._files._pwrite)."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

import kernel._files


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Let ``limit`` bytes be written, then fail every write with ENOSPC."""
    written = 0

    def pwrite_until_full(fd: int, view: Any, pos: int) -> int:
        nonlocal written
        if written >= limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += len(view)
        return os.pwrite(fd, view, pos)

    monkeypatch.setattr(kernel._files, "_pwrite", pwrite_until_full)

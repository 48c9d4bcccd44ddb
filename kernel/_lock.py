"""StateLock: one server per state_dir, enforced with an exclusive flock on a lock file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kernel.errors import KernelError

__all__ = ["StateLock", "StateLocked"]


class StateLocked(KernelError):
    def __init__(self, path: Path, holder: str) -> None:
        who = f" (pid {holder})" if holder else ""
        super().__init__(
            f"Another modelkernel server{who} holds the lock {path}; stop it, or give this "
            "one another state directory (--state-dir)."
        )
        self.path = path


class StateLock:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "modelkernel.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StateLocked(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

"""The ``.part`` file: positional writes in worker threads, background writeback, hashing,
and the durable rename. One seam each for fault-injection tests: ``_pwrite`` (the write
layer, where ENOSPC is injected)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
from typing import Any

from kernel.errors import PermanentError

__all__ = [
    "PartFile",
    "Writeback",
    "disk_error",
    "file_sha256",
    "hash_file_into",
    "make_parent",
    "open_nofollow",
    "open_parent",
    "pwrite_all",
    "remove",
    "rename_durably",
    "size_of",
    "write_at",
]

SYNC_EVERY = 32 << 20  # start background writeback after this many bytes
_pwrite = os.pwrite


class PartFile:
    """The ``.part`` file: positional writes in a worker thread, optional running sha256."""

    def __init__(self, path: str, offset: int, hashing: bool) -> None:
        self.path = path
        self.fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT)
        os.ftruncate(self.fd, offset)
        self.pos = offset  # bytes known to be on disk
        self.issued = offset  # bytes handed to writes, landed or not
        self.hasher = hashlib.sha256() if hashing else None
        self.writeback = Writeback(self.fd)

    async def hash_existing(self) -> None:
        if self.hasher is None or self.pos == 0:
            return
        await asyncio.to_thread(hash_file_into, self.path, self.pos, self.hasher)

    def _write(self, data: bytes | memoryview, pos: int) -> None:
        pwrite_all(self.fd, data, pos)
        if self.hasher is not None:
            self.hasher.update(data)

    def submit(self, data: bytes | memoryview) -> asyncio.Future[None]:
        """Start writing ``data`` after everything submitted so far, in a worker thread."""
        pos, self.issued = self.issued, self.issued + len(data)
        return asyncio.get_running_loop().run_in_executor(None, self._write, data, pos)

    async def complete(self, pending: asyncio.Future[None], size: int) -> None:
        """Wait for a submitted write. A cancelled caller still waits for the bytes to land,
        so the file never changes after the task has stopped."""
        try:
            await _landed(pending, self.path)
        except asyncio.CancelledError:
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                self.pos += size  # it landed: the counters must agree with the file
            raise
        self.pos += size
        self.writeback.wrote(size)

    async def write(self, data: bytes) -> None:
        await self.complete(self.submit(data), len(data))

    async def sync_and_close(self) -> None:
        await self.writeback.sync()
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Writeback:
    """Starts flushing a file to disk in the background every ``SYNC_EVERY`` bytes written,
    on a duplicate descriptor (so closing the file never races it): the disk works while the
    network does, and the fsync before the rename has only the tail left."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._unsynced = 0
        self._running: asyncio.Future[None] | None = None

    def wrote(self, n: int) -> None:
        self._unsynced += n
        if self._unsynced >= SYNC_EVERY and (self._running is None or self._running.done()):
            self._unsynced = 0
            self._running = asyncio.get_running_loop().run_in_executor(
                None, _datasync_dup, os.dup(self.fd)
            )

    async def sync(self) -> None:
        """Everything written is on disk (the final, durable flush)."""
        if self._running is not None:
            await self._running
        await asyncio.to_thread(os.fsync, self.fd)


def _datasync_dup(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    view = memoryview(data)
    while view:
        written = _pwrite(fd, view, pos)
        view = view[written:]
        pos += written


async def _landed(pending: asyncio.Future[None], path: str) -> None:
    """Await a write in a worker thread; on cancellation let it land first. Disk errors
    become PermanentError with a message a user can act on."""
    try:
        await asyncio.shield(pending)
    except asyncio.CancelledError:
        await asyncio.wait({pending})
        raise
    except OSError as exc:
        raise disk_error(exc, path) from exc


def disk_error(exc: OSError, path: str) -> PermanentError:
    """A failed write, in words a user can act on."""
    if exc.errno == errno.ENOSPC:
        return PermanentError(
            f"The disk is full ({os.path.dirname(path)}): free some space, then start the "
            "download again; it continues from the partial file, which is kept."
        )
    return PermanentError(f"Cannot write {path}: {exc.strerror}.")


async def write_at(fd: int, data: memoryview, pos: int, path: str) -> None:
    loop = asyncio.get_running_loop()
    await _landed(loop.run_in_executor(None, pwrite_all, fd, data, pos), path)


def hash_file_into(path: str, length: int, hasher: Any) -> None:
    with open(path, "rb") as f:
        remaining = length
        while remaining > 0:
            block = f.read(min(8 << 20, remaining))
            if not block:
                break
            hasher.update(block)
            remaining -= len(block)


def file_sha256(path: str) -> str:
    hasher = hashlib.sha256()
    hash_file_into(path, os.path.getsize(path), hasher)
    return hasher.hexdigest()


# --- no symbolic links on the way in: every path the kernel writes is opened so that it
# cannot lead elsewhere. The directory holding a file is opened and must be the directory
# named (no link anywhere on its path: the kernel's paths are built from the resolved
# models_dir), and the file itself is opened or replaced relative to that directory with
# O_NOFOLLOW, so a link planted in models_dir is never written through.


def _unsafe(path: str, why: str) -> PermanentError:
    return PermanentError(
        f"{path} {why}; modelkernel never writes through symbolic links in models_dir. "
        "Remove the link, then start the download again."
    )


def open_parent(path: str) -> tuple[int, str]:
    """Open the directory holding ``path``: (directory descriptor, file name). Raises
    PermanentError when the directory's path leads through a symbolic link, and
    FileNotFoundError when it does not exist."""
    parent, name = os.path.split(os.path.abspath(path))
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            actual = os.readlink(f"/proc/self/fd/{fd}")  # what was opened, race-free
        except OSError:
            actual = os.path.realpath(parent)  # no /proc: the best check available
        if actual != parent:
            raise _unsafe(path, f"leads through a symbolic link (to {actual})")
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def make_parent(path: str) -> None:
    """Create the directory that will hold ``path``, and check that it is one (no link)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except FileExistsError as exc:  # a dangling link, or a file, in the way
        raise _unsafe(path, "has something other than a directory on its path") from exc
    dir_fd, _ = open_parent(path)
    os.close(dir_fd)


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` or on the way to it."""
    dir_fd, name = open_parent(path)
    try:
        return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe(path, "is a symbolic link") from exc
        raise
    finally:
        os.close(dir_fd)


def size_of(path: str) -> int | None:
    """The size of the regular file at ``path``; None when there is none (a symbolic link
    is not a file the kernel has: it is never taken as a finished or partial download)."""
    try:
        dir_fd, name = open_parent(path)
    except FileNotFoundError:
        return None
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def remove(path: str) -> bool:
    """Remove the file (or link) at ``path``, never anything a link points to; True when
    something was removed."""
    try:
        dir_fd, name = open_parent(path)
    except FileNotFoundError:
        return False
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    finally:
        os.close(dir_fd)
    return True


def rename_durably(src: str, dst: str) -> None:
    """Rename the regular file ``src`` over ``dst`` (same directory; a link at ``dst`` is
    replaced, not followed), then sync the directory."""
    dir_fd, name = open_parent(dst)
    try:
        src_name = os.path.basename(src)
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise ValueError(f"{src} and {dst} are not in one directory")
        st = os.stat(src_name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(src, "is not a regular file")
        os.replace(src_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""Checks a SQLite write-ahead log before SQLite replays it.

SQLite replays a WAL up to its first frame that fails the checksum and silently ignores the
rest, and ignores a WAL whose header is damaged altogether: committed transactions would be
lost without a word. ``wal_damage`` reads the log as SQLite would (format in
https://www.sqlite.org/fileformat2.html#walformat) and says when that would happen: a bad
header in front of frames, or a bad frame followed by a committed frame of the same log.
A torn tail after the last commit (a crash while writing a transaction nobody was told about)
is normal and is not damage.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["wal_damage"]

_MAGIC = (0x377F0682, 0x377F0683)  # ...82: checksums over little-endian words, ...83: big
_HEADER = 32
_FRAME_HEADER = 24


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_damage(path: Path) -> str | None:
    """Why replaying the WAL at ``path`` would lose committed transactions, or None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) <= _HEADER:
        return None  # empty, or a header with no frames: nothing to lose
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:32])
    if magic not in _MAGIC or not 512 <= page_size <= 65536:
        return "its header is damaged, so every change it holds would be ignored"
    big = bool(magic & 1)
    sums = _checksum(data[:24], 0, 0, big)
    if sums != (c0, c1):
        return "its header is damaged, so every change it holds would be ignored"
    frame = _FRAME_HEADER + page_size
    count = (len(data) - _HEADER) // frame
    for n in range(count):
        pos = _HEADER + n * frame
        _page, _commit, f_salt1, f_salt2, f0, f1 = struct.unpack(">6I", data[pos : pos + 24])
        if (f_salt1, f_salt2) != (salt1, salt2):
            return None  # frames of an earlier use of the file: the log ends here
        sums = _checksum(data[pos : pos + 8], *sums, big)
        sums = _checksum(data[pos + 24 : pos + frame], *sums, big)
        if sums != (f0, f1):
            if _commit_after(data, n + 1, count, frame, (salt1, salt2)):
                return (
                    f"frame {n + 1} of {count} is damaged, so the transactions committed "
                    "after it would be lost"
                )
            return None  # a torn, uncommitted tail
    return None


def _commit_after(data: bytes, first: int, count: int, frame: int, salts: tuple[int, int]) -> bool:
    for n in range(first, count):
        pos = _HEADER + n * frame
        _page, commit, salt1, salt2 = struct.unpack(">4I", data[pos : pos + 16])
        if (salt1, salt2) == salts and commit:
            return True
    return False

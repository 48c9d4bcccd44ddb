"""Segmented transfers: one large file over several connections into one ``.part`` file.

The record keeps ``segments`` as ``[start, end, done]`` triples (``end`` exclusive), so pause,
resume and a restart of the server continue every segment where its confirmed bytes end. Each
connection asks for ``Range: bytes=start+done-(end-1)`` with ``If-Range``; an origin that
answers with anything but that exact range, or with another validator, restarts the whole
download from zero (two versions of a file are never spliced). Writes are positional, into a
``.part`` file sized up front (sparse), and ``done`` only grows once bytes are on disk. Each
segment's body goes through the transfer's byte loop (``fetch``: kernel/pump.py), the very
loop a single-stream download uses.

Splitting is adaptive (issue 12's measurements: on a fast link one stream beats several,
because every extra connection adds GIL hand-offs per TLS record; against an origin that
limits each connection, more connections win). A new segmented download starts as one
segment over the whole file; ``split`` (the transfer's policy) watches its throughput and cuts
the running range into more segments only when one connection is slow, each new one on its
own connection. The table in the record always covers the file, so a checkpoint taken at any
moment resumes correctly.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from kernel._files import open_nofollow
from kernel.errors import PermanentError, TransientError, ValidatorChanged
from kernel.types import DownloadRecord, RangedSource

__all__ = [
    "check_segments",
    "contiguous",
    "cut_segment",
    "plan_segments",
    "preallocate",
    "run_segments",
]

MIN_PIECE = 4 << 20  # no range is cut into pieces smaller than this

Fetch = Callable[[Any, list[int]], Awaitable[None]]  # (body, segment): its bytes to disk
Spawn = Callable[[list[int]], None]  # start fetching a new segment
Split = Callable[[Spawn], Coroutine[Any, Any, None]]  # the splitting policy, run beside the fetches


def plan_segments(size: int, connections: int) -> list[list[int]]:
    step = math.ceil(size / connections)
    return [[start, min(size, start + step), 0] for start in range(0, size, step)]


async def run_segments(
    rec: DownloadRecord,
    source: RangedSource,
    validator: str | None,
    *,
    fetch: Fetch,
    split: Split | None = None,
) -> None:
    """Fetch every unfinished segment concurrently (and those ``split`` adds while they run).
    The first failure stops the others and is raised; cancellation stops all of them before
    returning."""
    assert rec.segments is not None
    tasks: list[asyncio.Task[None]] = []

    def spawn(seg: list[int]) -> None:
        tasks.append(asyncio.create_task(_fetch(seg, source, validator, fetch)))

    for seg in rec.segments:
        if seg[2] < seg[1] - seg[0]:
            spawn(seg)
    if not tasks:
        return
    splitter: asyncio.Task[None] | None = None
    if split is not None:
        splitter = asyncio.create_task(split(spawn))
    try:
        while True:
            pending = [t for t in tasks if not t.done()]
            if not pending or any(_failed(t) for t in tasks):
                break
            # wakes at the first end, or soon after a split added tasks
            await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
    finally:
        everything = [*tasks, *([splitter] if splitter is not None else [])]
        for task in everything:
            task.cancel()
        await asyncio.wait(everything)
    for task in tasks:
        if _failed(task):
            raise task.exception()  # type: ignore[misc]
    if splitter is not None and _failed(splitter):
        raise splitter.exception()  # type: ignore[misc]


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def _fetch(seg: list[int], source: RangedSource, validator: str | None, fetch: Fetch) -> None:
    start, end, _ = seg
    offset = start + seg[2]
    body = await source.open(offset, validator, end=end - 1)  # a later cut stops it earlier
    try:
        if body.start != offset or (validator and body.validator and body.validator != validator):
            raise ValidatorChanged("The origin stopped honouring the ranges of this file.")
        await fetch(body, seg)
    finally:
        await body.aclose()
    if seg[2] < seg[1] - start:  # seg[1]: the end now, after any cut
        raise TransientError(
            f"A connection ended {seg[1] - start - seg[2]} bytes short of its range.",
            reason="short_body",
        )


def cut_segment(
    rec: DownloadRecord, seg: list[int], cut_at: Callable[[int], int], pos: int, pieces: int
) -> list[list[int]]:
    """Split what is left of ``seg`` (whose connection is at ``pos``) into ``pieces`` about
    equal ranges: ``cut_at(offset)`` stops its connection there (or a little later: the
    offset it returns), and the rest becomes new segments, inserted after it in the table.
    Returns the new segments (none when too little is left)."""
    assert rec.segments is not None
    old_end = seg[1]
    left = old_end - pos
    pieces = min(pieces, left // MIN_PIECE)
    if pieces < 2:
        return []
    cut = cut_at(pos + left // pieces)
    if cut >= old_end:
        return []
    step = math.ceil((old_end - cut) / (pieces - 1))
    new = [[b, min(old_end, b + step), 0] for b in range(cut, old_end, step)]
    seg[1] = cut
    index = next(i for i, s in enumerate(rec.segments) if s is seg)
    rec.segments[index + 1 : index + 1] = new
    return new


def contiguous(segments: list[list[int]]) -> int:
    """How many bytes from 0 are on disk: up to the first segment that is not complete (its
    start plus its confirmed bytes). Call it on the loop, where cuts happen: a cut shortens a
    segment and inserts the rest after it in one step."""
    for start, end, done in segments:
        if done < end - start:
            return start + done
    return segments[-1][1] if segments else 0


def preallocate(path: str, size: int) -> None:
    """Create the ``.part`` at its final size (sparse), for positional writes."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def check_segments(rec: DownloadRecord) -> None:
    """Refuse a segment table that cannot describe this file (a corrupt or foreign record)."""
    assert rec.segments is not None
    covered = 0
    for start, end, done in rec.segments:
        if start != covered or end <= start or not 0 <= done <= end - start:
            raise PermanentError("The saved segment table is inconsistent; start again.")
        covered = end
    if covered != rec.total_bytes:
        raise ValidatorChanged("The saved segments do not cover the file.")

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
segment over the whole file; ``split`` (the transfer's policy) watches its throughput and, only
when one connection is slow, cuts its range after a piece and starts more connections. Each
connection then takes pieces in file order, cut from the front of what is left, smaller and
smaller (``piece_size``): the connections end together, and the file's contiguous prefix
grows about as fast as the download, so its sha256 is nearly done at the last byte
(kernel/prefix_hash.py). The table in the record always covers the file, so a checkpoint
taken at any moment resumes correctly.
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
    "piece_size",
    "plan_segments",
    "preallocate",
    "run_segments",
]

MIN_PIECE = 4 << 20  # no range is cut into pieces smaller than this
# A free connection takes this share of what nobody fetches yet, over the connections running:
# pieces shrink towards the end, so the connections finish together and the last ranges
# complete about in file order (the contiguous prefix, which the sha256 follows, keeps up).
GUIDED = 2

Fetch = Callable[[Any, list[int]], Awaitable[None]]  # (body, segment): its bytes to disk
Spawn = Callable[[], None]  # start one more connection
Split = Callable[[Spawn], Coroutine[Any, Any, None]]  # the splitting policy, run beside the fetches


def plan_segments(size: int, connections: int) -> list[list[int]]:
    step = math.ceil(size / connections)
    return [[start, min(size, start + step), 0] for start in range(0, size, step)]


def piece_size(left: int, connections: int) -> int:
    """How much of ``left`` unclaimed bytes a connection takes next."""
    return max(MIN_PIECE, math.ceil(left / (GUIDED * max(1, connections))))


async def run_segments(
    rec: DownloadRecord,
    source: RangedSource,
    validator: str | None,
    *,
    fetch: Fetch,
    connections: int,
    split: Split | None = None,
) -> None:
    """Fetch every unfinished segment on ``connections`` connections at once (more when
    ``split`` spawns them). Each takes the first unfinished segment nobody fetches, in file
    order; a segment not yet started is first cut to ``piece_size`` when several connections
    run (the rest stays in the table as a segment of its own). The first failure stops the
    others and is raised; cancellation stops all of them before returning."""
    assert rec.segments is not None
    table = rec.segments
    tasks: list[asyncio.Task[None]] = []
    claimed: set[int] = set()  # id() of the segments being fetched

    def claim() -> list[int] | None:
        free = [s for s in table if id(s) not in claimed and s[2] < s[1] - s[0]]
        if not free:
            return None
        seg = free[0]
        if seg[2] == 0 and len(tasks) > 1:
            size = piece_size(sum(s[1] - s[0] - s[2] for s in free), len(tasks))
            if seg[1] - seg[0] >= size + MIN_PIECE:  # no sliver is left behind
                index = next(i for i, s in enumerate(table) if s is seg)
                table.insert(index + 1, [seg[0] + size, seg[1], 0])
                seg[1] = seg[0] + size
        claimed.add(id(seg))
        return seg

    async def connection() -> None:
        while (seg := claim()) is not None:
            try:
                await _fetch(seg, source, validator, fetch)
            finally:
                claimed.discard(id(seg))

    def spawn() -> None:
        tasks.append(asyncio.create_task(connection()))

    if all(s[2] >= s[1] - s[0] for s in table):
        return
    for _ in range(max(1, connections)):
        spawn()
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
    if any(s[2] < s[1] - s[0] for s in table):  # a connection that ended found nothing left
        raise TransientError("A range of the file was left unfetched.", reason="short_body")


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
    rec: DownloadRecord, seg: list[int], cut_at: Callable[[int], int], pos: int, keep: int
) -> list[int] | None:
    """Stop ``seg``'s connection (now at ``pos``) about ``keep`` bytes further on:
    ``cut_at(offset)`` stops it there (or a little later: the offset it returns). What lies
    past the cut becomes one new segment, not started, inserted after it in the table; it is
    returned (None when less than ``MIN_PIECE`` would be left on either side)."""
    assert rec.segments is not None
    old_end = seg[1]
    if keep < MIN_PIECE or old_end - pos - keep < MIN_PIECE:
        return None
    cut = cut_at(pos + keep)
    if cut >= old_end:
        return None
    new = [cut, old_end, 0]
    seg[1] = cut
    index = next(i for i, s in enumerate(rec.segments) if s is seg)
    rec.segments.insert(index + 1, new)
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

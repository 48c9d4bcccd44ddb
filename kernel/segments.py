"""Segmented transfers: one large file over several connections into one ``.part`` file.

The record keeps ``segments`` as ``[start, end, done]`` triples (``end`` exclusive), so pause,
resume and a restart of the server continue every segment where its confirmed bytes end. Each
connection asks for ``Range: bytes=start+done-(end-1)`` with ``If-Range``; an origin that
answers with anything but that exact range, or with another validator, restarts the whole
download from zero (two versions of a file are never spliced). Writes are positional, into a
``.part`` file sized up front (sparse), and ``done`` only grows once bytes are on disk. Each
segment's body goes through the transfer's byte loop (``fetch``: kernel/pump.py), the very
loop a single-stream download uses.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

from kernel.errors import PermanentError, TransientError, ValidatorChanged
from kernel.types import DownloadRecord, Source

__all__ = ["plan_segments", "run_segments"]

Fetch = Callable[[Any, list[int]], Awaitable[None]]  # (body, segment): its bytes to disk


def plan_segments(size: int, connections: int) -> list[list[int]]:
    step = math.ceil(size / connections)
    return [[start, min(size, start + step), 0] for start in range(0, size, step)]


async def run_segments(
    rec: DownloadRecord, source: Source, validator: str | None, *, fetch: Fetch
) -> None:
    """Fetch every unfinished segment concurrently. The first failure stops the others and
    is raised; cancellation stops all of them before returning."""
    assert rec.segments is not None
    tasks = [
        asyncio.create_task(_fetch(seg, source, validator, fetch))
        for seg in rec.segments
        if seg[2] < seg[1] - seg[0]
    ]
    if not tasks:
        return
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def _fetch(seg: list[int], source: Any, validator: str | None, fetch: Fetch) -> None:
    start, end, _ = seg
    offset = start + seg[2]
    body = await source.open(offset, validator, end=end - 1)
    try:
        if body.start != offset or (validator and body.validator and body.validator != validator):
            raise ValidatorChanged("The origin stopped honouring the ranges of this file.")
        await fetch(body, seg)
    finally:
        await body.aclose()
    if seg[2] < end - start:
        raise TransientError(
            f"A connection ended {end - start - seg[2]} bytes short of its range.",
            reason="short_body",
        )


def preallocate(path: str, size: int) -> None:
    """Create the ``.part`` at its final size (sparse), for positional writes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
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

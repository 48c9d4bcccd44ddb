"""The model directory: everything the kernel writes or removes lies inside ``models_dir``.

Each download owns ``models_dir/<model_id>/``. A record whose paths lead elsewhere (a store
from another ``models_dir``, or edited by hand) is never written to; files are removed only
inside the directory and never through a symbolic link; a ``.part`` file no record owns is
reported, never deleted silently. When a new download replaces an ended one, its ``.part``
files are continued when they hold the same file and removed otherwise, so two files are
never spliced.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection
from pathlib import Path

import structlog

from kernel._files import remove
from kernel.errors import PermanentError
from kernel.types import TERMINAL, DownloadRecord, FileRecord

__all__ = ["ModelsDir"]

log = structlog.get_logger()


class ModelsDir:
    def __init__(self, path: Path) -> None:
        self.path = path  # resolved: every check below is lexical

    def audit(self, records: Collection[DownloadRecord]) -> None:
        """At start (blocking: run it in a thread): log the ``.part`` files no record owns
        and the unfinished downloads whose files lie outside; nothing is changed."""
        owned = {path for rec in records for path in rec.part_paths()}
        for part in self.path.glob("*/*.part"):
            if str(part) not in owned:
                log.warning("download.orphan_part", path=str(part), bytes=part.lstat().st_size)
        for rec in records:
            path = self.outside(rec)
            if path is not None and rec.status not in TERMINAL:
                log.warning(
                    "download.outside_models_dir",
                    model_id=rec.model_id,
                    path=path,
                    models_dir=str(self.path),
                )

    def outside(self, rec: DownloadRecord) -> str | None:
        """The first of the record's paths that is not inside ``models_dir/<model_id>/``
        (a record from another models_dir, or a store edited by hand), or None."""
        home = self.path / rec.model_id
        for path in [*rec.final_paths(), *rec.part_paths()]:
            if not _inside(path, home):
                return path
        return None

    def check_inside(self, rec: DownloadRecord) -> None:
        path = self.outside(rec)
        if path is not None:
            raise PermanentError(
                f"The download's file {path} is outside models_dir ({self.path}/"
                f"{rec.model_id}/), perhaps because storage.models_dir changed; nothing was "
                "written. Purge it and create the download again."
            )

    async def remove(self, path: str) -> bool:
        """Remove a file of ours: only inside models_dir, never through a symbolic link."""
        if not _inside(path, self.path):
            log.warning("download.not_removed", path=path, reason="outside models_dir")
            return False
        try:
            return await asyncio.to_thread(remove, path)
        except PermanentError as exc:
            log.warning("download.not_removed", path=path, reason=exc.message)
            return False

    async def adopt_or_drop_parts(self, rec: DownloadRecord, old: DownloadRecord | None) -> None:
        """A ``.part`` left by the ended download ``rec`` replaces is continued when it is the
        same file (same URL and path: its validator guards the resume); any other ``.part`` at
        this path is someone else's bytes and is removed. A set of files follows the same
        rule file by file, and a file of the old set may also be found in place."""
        if rec.files is not None or (old is not None and old.files is not None):
            await self._adopt_or_drop_files(rec, old)
            return
        if old is not None and old.url == rec.url and old.local_path == rec.local_path:
            rec.file_validator = old.file_validator  # what the final file, if any, is
            if old.validator:
                rec.validator = old.validator
                rec.total_bytes = old.total_bytes
                rec.segments = old.segments
                return
        await self._drop_stale(rec.part_path)

    async def _adopt_or_drop_files(self, rec: DownloadRecord, old: DownloadRecord | None) -> None:
        if rec.files is None:
            await self._drop_stale(rec.part_path)
            return
        kept: dict[str, FileRecord] = {}
        if old is not None and old.files is not None:
            kept = {f.local_path: f for f in old.files}
        for f in rec.files:
            before = kept.get(f.local_path)
            if before is not None and before.url == f.url:
                f.file_validator = before.file_validator  # what the final file, if any, is
                if before.validator:
                    f.validator, f.segments = before.validator, before.segments
                    f.size = before.size or f.size
                    continue
            await self._drop_stale(f.part_path)

    async def _drop_stale(self, part_path: str) -> None:
        if await self.remove(part_path):
            log.info("download.stale_part_removed", path=part_path)


def _inside(path: str, directory: Path) -> bool:
    """``path`` is spelt plainly (no ``..``) and lies under ``directory`` (lexically; links
    on the way are refused when the file is opened)."""
    return os.path.normpath(path) == path and Path(path).is_relative_to(directory)

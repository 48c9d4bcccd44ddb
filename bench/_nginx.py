"""The origin that is not ours: Debian's nginx on loopback, serving generated random files.

``ensure_tools`` installs nginx, aria2 and curl with apt-get when a binary is missing (as
root). ``Origin`` writes the files and an ``nginx.conf`` into a temporary directory, starts
nginx in the foreground (``daemon off``) on a free loopback port and stops it again.

Layout of the origin (``root`` is a directory of the bench's temp dir), on two ports: plain
http, and https with a certificate for 127.0.0.1 issued by a CA the bench generates with
openssl (``ca_file``: what curl, aria2c and our server are told to trust):

    /<name>            every generated file, Range supported (nginx does it natively)
    /limited/<name>    the same files, ``limit_rate 50m`` per connection (a CDN-like origin)
    /cdn/<name>        the same files, ``limit_rate 20m`` per connection (the hub's CDN)
    /hub/bench/model/resolve/<revision>/<name>
                       a Hugging Face hub for the files ``add_hub_file`` named: a 302 to
                       ``/cdn/<name>`` with a signed-looking query, and the headers the hub
                       sends (X-Repo-Commit, X-Linked-Size, X-Linked-Etag: the sha256)
"""

# ruff: noqa: S603 - a benchmark script: it runs fixed local commands

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["HUB_REPO", "Origin", "ensure_tools", "free_port", "pdeathsig", "tool_path"]

HUB_REPO = "bench/model"  # the hub's one repository (its files: Origin.add_hub_file)
HUB_COMMIT = "0b5e5c0ffee0b5e5c0ffee0b5e5c0ffee0b5e5c0"
HUB_SIGNED = "X-Amz-Expires=3600&X-Amz-Signature=b3nch"  # the CDN URL's query (nginx ignores it)

TOOLS = {
    "nginx": "nginx",
    "aria2c": "aria2",
    "curl": "curl",
    "openssl": "openssl",
}  # binary -> Debian package
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def tool_path(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_tools(say) -> dict[str, str]:
    """Paths of nginx, aria2c and curl; installs the missing ones with apt-get (root only)."""
    missing = [pkg for binary, pkg in TOOLS.items() if tool_path(binary) is None]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(
                f"bench: missing {', '.join(missing)}; run as root or install them: "
                f"apt-get update && apt-get install -y {' '.join(TOOLS.values())}"
            )
        say(f"installing {' '.join(missing)} with apt-get (once)...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Debian's nginx package starts the system service on port 80 from its postinst;
        # a policy-rc.d that answers 101 keeps it from doing that (removed again after).
        policy = Path("/usr/sbin/policy-rc.d")
        own_policy = not policy.exists()
        if own_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            for argv, limit in (
                (["apt-get", "update"], 300),
                (["apt-get", "install", "-y", "--no-install-recommends", *TOOLS.values()], 600),
            ):
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=limit)
                if done.returncode != 0:
                    raise SystemExit(
                        f"bench: {' '.join(argv)} failed ({done.returncode}):\n"
                        f"{(done.stdout + done.stderr)[-2000:]}"
                    )
        finally:
            if own_policy:
                policy.unlink(missing_ok=True)
        still = [b for b in TOOLS if tool_path(b) is None]
        if still:
            raise SystemExit(f"bench: still missing after apt-get: {', '.join(still)}")
    return {binary: tool_path(binary) for binary in TOOLS}  # type: ignore[misc]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdeathsig() -> None:
    """preexec_fn: the child gets SIGTERM if the bench process dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def write_random_file(path: Path, size: int, block: int = 16 << 20) -> None:
    """``size`` bytes of random data (incompressible, so nothing can cheat on content)."""
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n
    path.chmod(0o644)


def warm(path: Path) -> None:
    """Read a file once so it sits in the page cache (the origin serves from memory)."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


CONF = """\
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    default_type application/octet-stream;
    types {{ application/json json; }}
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    ssl_certificate {tls}/server.pem;
    ssl_certificate_key {tls}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:1m;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        root {root};
        location / {{ }}
        location /limited/ {{
            alias {root}/;
            limit_rate {limit_rate};
        }}
        location /cdn/ {{
            alias {root}/;
            limit_rate {cdn_rate};
        }}
{hub}    }}
}}
"""


HUB_FILE = """\
        location ~ ^/hub/{repo}/resolve/[^/]+/{pattern}$ {{
            add_header X-Repo-Commit {commit} always;
            add_header X-Linked-Size {size} always;
            add_header X-Linked-Etag '"{sha256}"' always;
            return 302 https://127.0.0.1:{tls_port}/cdn/{name}?{signed};
        }}
"""


def make_ca(folder: Path, openssl: str = "openssl") -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (P-256, 30 days),
    in ``folder``: ca.pem, server.pem, server.key. Returns the CA file."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = folder / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
         "-subj", "/CN=modelkernel bench CA"],
        [openssl, "req", *ec, "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.pem", "-days", "30", "-extfile", "server.ext"],
    ]  # fmt: skip
    for argv in steps:
        done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl failed: {' '.join(argv)}\n{done.stderr[-1000:]}")
    for name in ("server.pem", "server.key", "ca.pem"):
        (folder / name).chmod(0o644)  # nginx's worker may run as another user
    return folder / "ca.pem"


class Origin:
    """nginx serving ``root``; ``url(name)`` and ``limited_url(name)`` give the file URLs,
    ``https_url`` and ``https_limited_url`` the same over TLS (trust ``ca_file``)."""

    def __init__(
        self, nginx: str, workdir: Path, *, limit_rate: str = "50m", cdn_rate: str = "20m"
    ) -> None:
        self.nginx = nginx
        self.tmp = workdir / "nginx"
        self.root = workdir / "www"
        self.limit_rate = limit_rate
        self.cdn_rate = cdn_rate
        self.hub_files: dict[str, str] = {}  # name -> sha256, served through the hub
        self.port = 0
        self.tls_port = 0
        self.tls_dir = workdir / "tls"
        self.ca_file = self.tls_dir / "ca.pem"
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.tmp, self.root):
            d.mkdir(parents=True, exist_ok=True)
        # nginx's worker runs as "nobody" when started by root: let it read the files.
        for d in (workdir, self.root):
            d.chmod(0o755)

    def add_random(self, name: str, size: int) -> Path:
        path = self.root / name
        write_random_file(path, size)
        return path

    def add_bytes(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        path.chmod(0o644)
        return path

    def add_hub_file(self, name: str, sha256: str) -> None:
        """Serve the file ``name`` (already in root) as ``hf://bench/model/<name>`` through
        ``hub_endpoint`` (set before ``start``)."""
        self.hub_files[name] = sha256

    @property
    def hub_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}/hub"

    def cdn_url(self, name: str) -> str:
        """Where the hub redirects ``name`` to (what curl and aria2c are given)."""
        return f"https://127.0.0.1:{self.tls_port}/cdn/{name}?{HUB_SIGNED}"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def limited_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/limited/{name}"

    def https_url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.tls_port}/{name}"

    def https_limited_url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.tls_port}/limited/{name}"

    def start(self, timeout: float = 10.0, openssl: str = "openssl") -> None:
        self.port = free_port()
        self.tls_port = free_port()
        if not self.ca_file.exists():
            make_ca(self.tls_dir, openssl)
        self.tls_dir.chmod(0o755)
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            CONF.format(
                tmp=self.tmp,
                root=self.root,
                port=self.port,
                tls_port=self.tls_port,
                tls=self.tls_dir,
                limit_rate=self.limit_rate,
                cdn_rate=self.cdn_rate,
                hub=self._hub_conf(),
                user="user root;" if os.geteuid() == 0 else "",
            )
        )
        argv = [self.nginx, "-p", str(self.tmp), "-c", str(conf)]
        if self._supports_e():
            argv += ["-e", str(self.tmp / "error.log")]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "stderr.log", "wb"),  # noqa: SIM115 - lives with nginx
            start_new_session=True,
            preexec_fn=pdeathsig,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited at start:\n{self._logs()}")
            try:
                for port in (self.port, self.tls_port):
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        pass
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen within {timeout}s:\n{self._logs()}")

    def _hub_conf(self) -> str:
        """The hub's locations: one per file ``add_hub_file`` named."""
        files = []
        for name, sha256 in self.hub_files.items():
            size = (self.root / name).stat().st_size
            files.append(
                HUB_FILE.format(
                    repo=HUB_REPO, pattern=name.replace(".", r"\."), name=name, commit=HUB_COMMIT,
                    size=size, sha256=sha256, tls_port=self.tls_port, signed=HUB_SIGNED,
                )
            )  # fmt: skip
        return "".join(files)

    def _supports_e(self) -> bool:
        done = subprocess.run([self.nginx, "-h"], capture_output=True, text=True, check=False)
        return " -e " in (done.stdout + done.stderr)

    def _logs(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.tmp / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in children.split()]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # fast shutdown
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

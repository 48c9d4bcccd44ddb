"""The four benchmark cases of issue 8. Each returns a ``CaseResult`` of table rows.

Every case starts its own server (fresh state) and is bounded in time: past its deadline it
stops measuring and reports what it has.
"""

# ruff: noqa: S603, S311 - a benchmark script: it runs fixed local commands

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _http import RawConn
from _nginx import HUB_REPO, Origin, pdeathsig, tool_path
from _server import Server, clean_env, proc_cpu, proc_mem, run_tool, runq_wait
from _stats import CaseResult, Row, fmt, lag_metrics, median, pct, ratio

MiB = 1 << 20
GiB = 1 << 30
TERMINAL = {"completed", "failed", "cancelled"}


@dataclass
class Ctx:
    workdir: Path
    origin: Origin
    tools: dict[str, str]
    size: int  # bytes of the case 1 / 2 file
    runs: int
    runs2: int
    quick: bool
    say: Any
    connections_key: bool  # the server knows downloads.connections
    connections: int  # what case 2 sets it to
    c3_records: int = 1000
    c3_transfers: int = 8
    c3_pollers: int = 64
    c3_requests: int = 3000
    c3_interval: float = 0.25
    c4_downloads: int = 500
    c4_rate: int = 64 << 10
    c4_window: float = 10.0
    c4_sample: int = 100
    profile: bool = False
    results_dir: Path | None = None
    files: dict[str, int] = field(default_factory=dict)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


# --- shared pieces ------------------------------------------------------------------------------


def same_bytes(a: Path, b: Path, size: int) -> bool:
    """Size plus three 1 MiB probes (start, middle, end): cheap and catches any mix-up."""
    if a.stat().st_size != size or b.stat().st_size != size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in (0, size // 2, max(0, size - MiB)):
            fa.seek(off)
            fb.seek(off)
            if fa.read(MiB) != fb.read(MiB):
                return False
    return True


@dataclass
class Sample:
    tool: str
    seconds: float
    cpu_s: float
    rss_mib: float


def ours_download(
    server: Server, model_id: str, url: str, size: int, timeout: float, origin_file: Path
) -> Sample:
    """POST, poll until completed; time from POST to the record's end_time; server CPU delta."""
    client = server.client
    assert client is not None
    cpu0 = server.cpu()
    t0 = time.time()
    r = client.post("/v1/downloads", json={"model_id": model_id, "url": url})
    if r.status_code != 202:
        raise RuntimeError(f"create {model_id}: HTTP {r.status_code} {r.text[:300]}")
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = r.json()
    while body.get("status") not in TERMINAL:
        if time.monotonic() > deadline:
            client.delete(f"/v1/downloads/{model_id}")
            raise RuntimeError(
                f"{model_id} not completed within {timeout:.0f}s: {body.get('progress')}"
            )
        time.sleep(0.2)  # timing comes from the record's end_time, so polling can be sparse
        body = client.get(f"/v1/downloads/{model_id}").json()
    seen = time.time()
    cpu1 = server.cpu()
    if body["status"] != "completed":
        raise RuntimeError(f"{model_id} ended {body['status']}: {body.get('error_message')}")
    end = (body.get("timing") or {}).get("end_time")
    seconds = end / 1000 - t0 if end else seen - t0
    if seconds <= 0:
        seconds = seen - t0
    path = Path(body["local_path"])
    if not same_bytes(path, origin_file, size):
        raise RuntimeError(f"{model_id}: the downloaded file differs from the origin's")
    path.unlink(missing_ok=True)  # here, not by the server: keeps the unlink out of its profile
    client.delete(f"/v1/downloads/{model_id}", params={"purge": "true"})
    return Sample("ours", seconds, cpu1 - cpu0, server.mem().hwm_mib)


def tool_download(
    tool: str,
    argv: list[str],
    out: Path,
    size: int,
    timeout: float,
    origin_file: Path,
    fsync: bool = False,
) -> Sample:
    t0 = time.perf_counter()
    run = run_tool(argv, timeout)
    if run.rc != 0:
        raise RuntimeError(f"{tool} exited {run.rc}: {run.stderr}")
    seconds = run.seconds
    if fsync:  # the file durable on disk, as our server leaves it (fsync before rename)
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - t0
    if not same_bytes(out, origin_file, size):
        raise RuntimeError(f"{tool}: the downloaded file differs from the origin's")
    out.unlink()
    for leftover in out.parent.glob(out.name + ".aria2"):
        leftover.unlink()
    return Sample(tool, seconds, run.cpu_s, run.maxrss_mib)


def summarize(samples: list[Sample], size: int) -> dict[str, dict[str, Any]]:
    by: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by[s.tool].append(s)
    out = {}
    for tool, ss in by.items():
        mibs = [size / MiB / s.seconds for s in ss]
        cpu = [s.cpu_s / (size / GiB) for s in ss]
        out[tool] = {
            "runs": len(ss),
            "mib_s": median(mibs),
            "mib_s_all": [round(x, 1) for x in mibs],
            "cpu_s_per_gib": median(cpu),
            "cpu_all": [round(x, 2) for x in cpu],
            "rss_mib": max(s.rss_mib for s in ss),
        }
    return out


class Profiler:
    """py-spy recording the server while a case runs (``--profile``); raw collapsed stacks."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        exe = tool_path("py-spy")
        if exe is None:
            return
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "-p",
                str(pid),
                "-o",
                str(out),
                "--format",
                "raw",
                "--threads",
                "--nonblocking",
                "-r",
                "200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pdeathsig,
        )

    def stop(self) -> list[str]:
        if self.proc is None:
            return ["py-spy is not installed (pip install py-spy): no profile"]
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not self.out.exists():
            return ["py-spy wrote no profile (needs ptrace rights: run as root)"]
        return summarize_profile(self.out)


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """Where the server's samples go: by thread, by leaf function (self), by our functions
    (inclusive)."""
    total = 0
    by_thread: dict[str, int] = defaultdict(int)
    self_time: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        by_thread[thread.split(" (")[0] + (" (main)" if "MainThread" in thread else "")] += n
        calls = [f for f in frames if not f.startswith(("thread", "process"))]
        if calls:
            self_time[calls[-1]] += n
        for f in set(calls):
            if any(m in f for m in _INCLUSIVE) and "kernel/cli.py" not in f:
                incl[f] += n
    if not total:
        return ["the profile holds no samples"]
    lines = [f"{total} samples (200 Hz, all threads, idle excluded)."]
    lines.append(
        "By thread: "
        + "; ".join(
            f"{t} {n / total:.0%}" for t, n in sorted(by_thread.items(), key=lambda kv: -kv[1])[:6]
        )
    )
    lines.append("Top self (leaf) frames ((waiting) = a thread blocked, not using the CPU):")
    for f, n in sorted(self_time.items(), key=lambda kv: -kv[1])[:top]:
        waiting = "  (waiting)" if any(m in f for m in _WAITING) else ""
        lines.append(f"  {n / total:6.1%}  {_short(f)}{waiting}")
    lines.append("Top inclusive frames (ours, httpx/httpcore, litestar, msgspec, ssl, sqlite):")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {n / total:6.1%}  {_short(f)}")
    return lines


_INCLUSIVE = (
    "kernel/",
    "plugins/",
    "_source/",
    "sqlite_store",
    "httpx/",
    "httpcore/",
    "litestar/",
    "msgspec",
    "ssl.py",
    "sqlite3",
    "structlog/",
    "prometheus_client/",
)


_WAITING = (
    "_worker (concurrent/futures/thread.py",
    "select (selectors.py",
    "wait (threading.py",
    "Condition.wait",
    "SimpleQueue.get",
)


def _short(frame: str) -> str:
    for marker in ("/site-packages/", "/main/", "/lib/python3"):
        if marker in frame:
            head, _, tail = frame.partition("(")
            return f"{head.strip()} ({tail.split(marker, 1)[-1]}" if tail else frame
    return frame


# --- case 1 and 2: one file, ours vs curl vs aria2c ----------------------------------------------


def _download_case(
    ctx: Ctx,
    label: str,
    url: str,
    tools: dict[str, tuple[list[str], Path, bool]],
    server: Server,
    runs: int,
    deadline: Deadline,
    per_dl: float,
    origin_file: Path,
    profiler_out: Path | None = None,
    https: bool = False,
) -> tuple[list[Sample], list[str]]:
    samples: list[Sample] = []
    problems: list[str] = []
    names = [*tools, "ours"]
    profiler = None
    # warm-up, untimed: the server's first download pays one-time costs (lazy imports, the
    # first HTTP client), as the tools' first run would pay a cold page cache
    ours_download(
        server,
        f"{label}-warmup",
        ctx.origin.https_url("tiny.bin") if https else ctx.origin.url("tiny.bin"),
        1024,
        60,
        ctx.origin.root / "tiny.bin",
    )
    for r in range(runs):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no tool always first
        for tool in order:
            if deadline.passed():
                problems.append(
                    f"case deadline ({deadline.seconds:.0f}s) reached after {r} full runs"
                )
                return samples, problems
            try:
                if tool == "ours":
                    if profiler_out is not None and profiler is None:
                        profiler = Profiler(server.pid, profiler_out)
                        time.sleep(0.5)
                    s = ours_download(
                        server,
                        f"{label}-r{r}",
                        url,
                        ctx.size,
                        min(per_dl, max(5, deadline.left())),
                        origin_file,
                    )
                else:
                    argv, out, fsync = tools[tool]
                    s = tool_download(
                        tool,
                        argv,
                        out,
                        ctx.size,
                        min(per_dl, max(5, deadline.left())),
                        origin_file,
                        fsync=fsync,
                    )
                samples.append(s)
                ctx.say(
                    f"  {label} run {r + 1}/{runs} {tool:<18} "
                    f"{ctx.size / MiB / s.seconds:8.1f} MiB/s  cpu {s.cpu_s:6.2f}s"
                )
            except Exception as exc:  # noqa: BLE001 - one failed run is reported, not fatal
                problems.append(f"run {r + 1} {tool}: {exc}")
                ctx.say(f"  {label} run {r + 1} {tool}: FAILED {exc}")
    if profiler is not None:
        problems.extend(["PROFILE " + line for line in profiler.stop()])
    return samples, problems


# aria2c options shared by the cases: no preallocation, overwrite, quiet.
ARIA_COMMON = [
    "--file-allocation=none",
    "--allow-overwrite=true",
    "--auto-file-renaming=false",
    "--console-log-level=warn",
    "--summary-interval=0",
    "--download-result=hide",
    "-q",
]


def _trust(ctx: Ctx, https: bool) -> tuple[list[str], list[str], dict[str, str]]:
    """curl options, aria2c options and the server's environment to trust the bench's CA."""
    if not https:
        return [], [], {}
    ca = str(ctx.origin.ca_file)
    return ["--cacert", ca], [f"--ca-certificate={ca}"], {"SSL_CERT_FILE": ca}


def case1(ctx: Ctx, deadline: Deadline) -> CaseResult:
    return _single(ctx, deadline, https=False)


def case5(ctx: Ctx, deadline: Deadline) -> CaseResult:
    return _single(ctx, deadline, https=True)


def case2(ctx: Ctx, deadline: Deadline) -> CaseResult:
    return _limited(ctx, deadline, https=False)


def case6(ctx: Ctx, deadline: Deadline) -> CaseResult:
    return _limited(ctx, deadline, https=True)


def _single(ctx: Ctx, deadline: Deadline, https: bool) -> CaseResult:
    n = "5" if https else "1"
    res = CaseResult(f"{n}. single download" + (" over HTTPS" if https else ""))
    name = "big.bin"
    origin_file = ctx.origin.root / name
    url = ctx.origin.https_url(name) if https else ctx.origin.url(name)
    out_dir = ctx.workdir / f"tools-c{n}"
    out_dir.mkdir(exist_ok=True)
    curl_trust, aria_trust, server_env = _trust(ctx, https)
    aria_common = [*ARIA_COMMON, "--check-integrity=false", *aria_trust]
    tools = {
        "curl": (
            ["curl", "-s", *curl_trust, "-o", str(out_dir / "curl.bin"), url],
            out_dir / "curl.bin",
            False,
        ),
        "curl+fsync": (
            ["curl", "-s", *curl_trust, "-o", str(out_dir / "curlf.bin"), url],
            out_dir / "curlf.bin",
            True,
        ),
        "aria2c -x1": (
            [
                ctx.tools["aria2c"],
                "-x1",
                "-s1",
                *aria_common,
                "-d",
                str(out_dir),
                "-o",
                "aria.bin",
                url,
            ],
            out_dir / "aria.bin",
            False,
        ),
    }
    tools = {
        k: ([ctx.tools.get(v[0][0], v[0][0]), *v[0][1:]], v[1], v[2]) for k, v in tools.items()
    }
    server = Server(ctx.workdir, f"c{n}", env=server_env)  # defaults: no config at all
    server.start()
    try:
        # warm-up: the origin file in the page cache, one untimed fetch through nginx
        run_tool([ctx.tools["curl"], "-s", *curl_trust, "-o", "/dev/null", url], 120)
        per_dl = 60 + ctx.size / (20 * MiB)
        prof = (
            (ctx.results_dir / f"profile-case{n}.txt") if ctx.profile and ctx.results_dir else None
        )
        samples, problems = _download_case(
            ctx, f"c{n}", url, tools, server, ctx.runs, deadline, per_dl, origin_file, prof, https
        )
        mem = server.mem()
    finally:
        server.stop()
    res.notes += [p for p in problems if not p.startswith("PROFILE ")]
    res.raw["profile"] = [p[len("PROFILE ") :] for p in problems if p.startswith("PROFILE ")]
    s = summarize(samples, ctx.size)
    res.raw.update(tools=s, server_rss_peak_mib=mem.hwm_mib, size_mib=ctx.size / MiB)
    o, c, a, cf = (s.get(k, {}) for k in ("ours", "curl", "aria2c -x1", "curl+fsync"))
    size = f"{ctx.size / MiB:.0f} MiB"
    runs = f"median of {o.get('runs', 0)}"
    ok_t = bool(o and c) and o["mib_s"] >= 0.9 * c["mib_s"]
    ok_c = bool(o and c) and o["cpu_s_per_gib"] <= 1.5 * c["cpu_s_per_gib"]
    res.rows += [
        Row(
            n,
            f"throughput{', HTTPS' if https else ''}, {size} ({runs}, defaults), MiB/s",
            fmt(o.get("mib_s")),
            f"curl {fmt(c.get('mib_s'))}",
            ratio(o.get("mib_s"), c.get("mib_s")),
            ">= 0.9x curl",
            ok_t,
        ),
        Row(
            n,
            "throughput vs aria2c -x1",
            fmt(o.get("mib_s")),
            f"aria2c -x1 {fmt(a.get('mib_s'))}",
            ratio(o.get("mib_s"), a.get("mib_s")),
        ),
        Row(
            n,
            "throughput vs curl + fsync (file durable on disk, as ours leaves it)",
            fmt(o.get("mib_s")),
            f"curl+fsync {fmt(cf.get('mib_s'))}",
            ratio(o.get("mib_s"), cf.get("mib_s")),
        ),
        Row(
            n,
            "CPU s per GiB (user+sys, whole process)",
            fmt(o.get("cpu_s_per_gib"), 2),
            f"curl {fmt(c.get('cpu_s_per_gib'), 2)}",
            ratio(o.get("cpu_s_per_gib"), c.get("cpu_s_per_gib")),
            "<= 1.5x curl",
            ok_c,
        ),
        Row(
            n,
            "CPU s per GiB vs aria2c -x1",
            fmt(o.get("cpu_s_per_gib"), 2),
            f"aria2c -x1 {fmt(a.get('cpu_s_per_gib'), 2)}",
            ratio(o.get("cpu_s_per_gib"), a.get("cpu_s_per_gib")),
        ),
        Row(
            n,
            "peak RSS MiB (server VmHWM / tool maxrss)",
            fmt(mem.hwm_mib),
            f"curl {fmt(c.get('rss_mib'))}, aria2c {fmt(a.get('rss_mib'))}",
            ratio(mem.hwm_mib, c.get("rss_mib")),
        ),
    ]
    return res


def _limited(ctx: Ctx, deadline: Deadline, https: bool) -> CaseResult:
    n = "6" if https else "2"
    res = CaseResult(f"{n}. per-connection-limited origin" + (" over HTTPS" if https else ""))
    name = "big.bin"
    origin_file = ctx.origin.root / name
    url = ctx.origin.https_limited_url(name) if https else ctx.origin.limited_url(name)
    out_dir = ctx.workdir / f"tools-c{n}"
    out_dir.mkdir(exist_ok=True)
    curl_trust, aria_trust, server_env = _trust(ctx, https)
    aria_common = [*ARIA_COMMON, *aria_trust]
    tools = {
        "curl": (
            [ctx.tools["curl"], "-s", *curl_trust, "-o", str(out_dir / "curl.bin"), url],
            out_dir / "curl.bin",
            False,
        ),
        "aria2c -x8 -s8": (
            [
                ctx.tools["aria2c"],
                "-x8",
                "-s8",
                "-k1M",
                *aria_common,
                "-d",
                str(out_dir),
                "-o",
                "aria.bin",
                url,
            ],
            out_dir / "aria.bin",
            False,
        ),
    }
    config: dict[str, Any] = {}
    if ctx.connections_key:
        config = {"downloads": {"connections": ctx.connections}}
        res.notes.append(f"server config: downloads.connections = {ctx.connections}")
    else:
        res.notes.append(
            "the server has no downloads.connections setting: one connection per download"
        )
    server = Server(ctx.workdir, f"c{n}", config, env=server_env)
    server.start()
    try:
        per_dl = 60 + ctx.size / (10 * MiB)
        samples, problems = _download_case(
            ctx, f"c{n}", url, tools, server, ctx.runs2, deadline, per_dl, origin_file,
            https=https,
        )
    finally:
        server.stop()
    res.notes += problems
    s = summarize(samples, ctx.size)
    res.raw.update(tools=s, limit_rate=ctx.origin.limit_rate, size_mib=ctx.size / MiB)
    o, c, a = (s.get(k, {}) for k in ("ours", "curl", "aria2c -x8 -s8"))
    runs = f"median of {o.get('runs', 0)}"
    conns = f", connections={ctx.connections}" if ctx.connections_key else ", 1 connection"
    res.rows += _split_rows(
        n,
        f"throughput{', HTTPS' if https else ''}, limit_rate {ctx.origin.limit_rate}/conn "
        f"({runs}{conns}), MiB/s",
        "throughput vs curl (1 connection)",
        "CPU s per GiB",
        o, a, c,
    )  # fmt: skip
    return res


# --- case 7: a hub file (hf://) from a per-connection-limited HTTPS CDN ---------------------------


def case7(ctx: Ctx, deadline: Deadline) -> CaseResult:
    """``hf://bench/model/big.bin`` through the emulated hub (nginx: a 302 to ``/cdn/``, whose
    ``limit_rate`` is per connection, like the hub's CDN), ours segmented
    (``downloads.connections``) and ours on one connection (what every hf:// download got before
    hf_source could fetch ranges), against curl and aria2c on the CDN URL itself."""
    res = CaseResult("7. hf:// from a per-connection-limited HTTPS CDN")
    name = "big.bin"
    origin_file = ctx.origin.root / name
    cdn = ctx.origin.cdn_url(name)
    out_dir = ctx.workdir / "tools-c7"
    out_dir.mkdir(exist_ok=True)
    curl_trust, aria_trust, server_env = _trust(ctx, True)
    tools = {
        "curl (CDN URL)": (
            [ctx.tools["curl"], "-s", *curl_trust, "-o", str(out_dir / "curl.bin"), cdn],
            out_dir / "curl.bin",
            False,
        ),
        "aria2c -x8 -s8 (CDN URL)": (
            [ctx.tools["aria2c"], "-x8", "-s8", "-k1M", *ARIA_COMMON, *aria_trust,
             "-d", str(out_dir), "-o", "aria.bin", cdn],
            out_dir / "aria.bin",
            False,
        ),
    }  # fmt: skip
    ref = f"hf://{HUB_REPO}/{name}"
    hub = {"sources": {"huggingface": {"endpoint": ctx.origin.hub_endpoint}}}
    samples: list[Sample] = []
    per_dl = 60 + ctx.size / (5 * MiB)
    for label, connections, others in (
        ("ours", ctx.connections, tools),
        ("ours, 1 connection", 1, {}),
    ):
        config = {**hub, "downloads": {"connections": connections}}
        server = Server(ctx.workdir, f"c7-{connections}", config, env=server_env)
        server.start()
        try:
            got, problems = _download_case(
                ctx, f"c7-{connections}", ref, others, server, ctx.runs2, deadline, per_dl,
                origin_file, https=True,
            )  # fmt: skip
        finally:
            server.stop()
        samples += [Sample(label, s.seconds, s.cpu_s, s.rss_mib) if s.tool == "ours" else s
                    for s in got]  # fmt: skip
        res.notes += problems
    s = summarize(samples, ctx.size)
    res.raw.update(tools=s, cdn_rate=ctx.origin.cdn_rate, size_mib=ctx.size / MiB)
    o, one = s.get("ours", {}), s.get("ours, 1 connection", {})
    c, a = s.get("curl (CDN URL)", {}), s.get("aria2c -x8 -s8 (CDN URL)", {})
    rate = f"limit_rate {ctx.origin.cdn_rate}/conn"
    res.notes.append(
        f"ours: {ref} with sources.huggingface.endpoint = {ctx.origin.hub_endpoint} (nginx "
        f"answering the hub's HEADs), downloads.connections = {ctx.connections}; then a fresh "
        "server with downloads.connections = 1 (one stream, as before hf_source fetched ranges)"
    )
    res.rows += _split_rows(
        "7",
        f"hf:// throughput, HTTPS CDN {rate} (median of {o.get('runs', 0)}, "
        f"connections={ctx.connections}), MiB/s",
        "hf:// throughput vs curl on the CDN URL (1 connection)",
        "hf:// CPU s per GiB (sha256 check included)",
        o, a, c,
    )  # fmt: skip
    res.rows.append(
        Row(
            "7",
            "hf:// segmented vs one connection (before)",
            fmt(o.get("mib_s")),
            f"1 connection {fmt(one.get('mib_s'))}",
            ratio(o.get("mib_s"), one.get("mib_s")),
        )
    )
    return res


def _split_rows(
    n: str, throughput: str, vs_curl: str, cpu: str, o: dict, a: dict, c: dict
) -> list[Row]:
    """A per-connection-limited case's rows: ours (summary ``o``) against aria2c -x8 (``a``,
    target 0.9x) and curl's one connection (``c``, target 3x), and the CPU per GiB of each."""
    return [
        Row(
            n, throughput, fmt(o.get("mib_s")), f"aria2c -x8 -s8 {fmt(a.get('mib_s'))}",
            ratio(o.get("mib_s"), a.get("mib_s")), ">= 0.9x aria2c -x8",
            bool(o and a) and o["mib_s"] >= 0.9 * a["mib_s"],
        ),
        Row(
            n, vs_curl, fmt(o.get("mib_s")), f"curl {fmt(c.get('mib_s'))}",
            ratio(o.get("mib_s"), c.get("mib_s")), ">= 3x curl",
            bool(o and c) and o["mib_s"] >= 3 * c["mib_s"],
        ),
        Row(
            n, cpu, fmt(o.get("cpu_s_per_gib"), 2),
            f"aria2c -x8 {fmt(a.get('cpu_s_per_gib'), 2)}, curl {fmt(c.get('cpu_s_per_gib'), 2)}",
            ratio(o.get("cpu_s_per_gib"), a.get("cpu_s_per_gib")),
        ),
    ]  # fmt: skip


# --- case 3: the API under load ----------------------------------------------------------------


async def _wait_until(pred, limit_s: float, every: float = 0.2) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if await pred():
            return True
        await asyncio.sleep(every)
    return False


async def _poll_load(
    port: int,
    paths: dict[str, Any],
    pollers: int,
    total: int,
    interval: float,
    lag_every: float = 0.02,
    seed: int = 8,
) -> tuple[dict[str, list[float]], float, int]:
    """``pollers`` clients (one keep-alive connection each), each paced at one request per
    ``interval`` s from a random phase, cycling list-all, detail, list, detail, until ``total``
    requests were sent; plus one prober sending GET /health every ``lag_every`` s. Returns
    latencies (s) by kind, wall time, errors."""
    cycle = ["list_all", "detail", "list", "detail"]
    lat: dict[str, list[float]] = defaultdict(list)
    errors = 0
    sent = 0
    done = asyncio.Event()
    conns = [RawConn(port) for _ in range(pollers + 1)]
    # open the connections first, so connection setup is not in the figures
    await asyncio.gather(*(c.connect() for c in conns))

    async def get(conn: RawConn, kind: str, path: str) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            status, _ = await conn.get(path)
            ok = status == 200
        except (OSError, asyncio.IncompleteReadError, ValueError):
            ok = False
        if ok:
            lat[kind].append(time.perf_counter() - t0)
        else:
            errors += 1

    async def poller(i: int) -> None:
        nonlocal sent
        prng = random.Random(seed * 1000 + i)
        step = prng.randrange(len(cycle))
        await asyncio.sleep(prng.uniform(0, interval))
        nxt = time.perf_counter()
        while sent < total:
            sent += 1
            kind = cycle[step % len(cycle)]
            step += 1
            path = paths[kind]
            if callable(path):
                path = path(prng)
            await get(conns[i], kind, path)
            nxt = max(nxt + interval, time.perf_counter())
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    async def prober() -> None:
        while not done.is_set():
            await get(conns[-1], "health", paths["health"])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), lag_every)

    try:
        t0 = time.perf_counter()
        probe = asyncio.create_task(prober())
        await asyncio.gather(*(poller(i) for i in range(pollers)))
        wall = time.perf_counter() - t0
        done.set()
        await probe
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return lat, wall, errors


async def _case3(ctx: Ctx, server: Server, res: CaseResult, deadline: Deadline) -> None:
    tiny = ctx.origin.url("tiny.bin")
    scale = ctx.origin.url("scale.bin")
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=server.base, timeout=30.0, limits=limits, trust_env=False
    ) as c:
        sem = asyncio.Semaphore(16)

        async def create(body: dict[str, Any]) -> None:
            async with sem:
                r = await c.post("/v1/downloads", json=body)
                if r.status_code != 202:
                    raise RuntimeError(
                        f"create {body['model_id']}: HTTP {r.status_code} {r.text[:200]}"
                    )

        t0, setup_cpu0 = time.perf_counter(), server.cpu()
        await asyncio.gather(
            *(create({"model_id": f"rec-{i:04d}", "url": tiny}) for i in range(ctx.c3_records))
        )
        created_s = time.perf_counter() - t0

        async def none_active() -> bool:
            return (await c.get("/v1/downloads")).json()["summary"]["total_active"] == 0

        if not await _wait_until(none_active, max(10, min(240, deadline.left() - 90))):
            res.notes.append(
                f"the {ctx.c3_records} small downloads had not all ended when the setup "
                "time ran out: the load ran with some still queued"
            )
        all_done_s = time.perf_counter() - t0
        setup_cpu = server.cpu() - setup_cpu0
        everything = (await c.get("/v1/downloads", params={"status": "all"})).json()[
            "active_downloads"
        ]
        completed = sum(1 for d in everything if d["status"] == "completed")
        res.notes.append(
            f"{ctx.c3_records} records: created in {created_s:.1f}s "
            f"({ctx.c3_records / created_s:.0f}/s), all ended after {all_done_s:.1f}s, "
            f"{completed} completed; server CPU {setup_cpu / ctx.c3_records * 1000:.0f} ms "
            "per small download (create + transfer + completion)"
        )
        # 8 transfers kept running by a per-download cap
        rate = 256 << 10
        for i in range(ctx.c3_transfers):
            await create({"model_id": f"run-{i}", "url": scale, "max_bytes_per_second": rate})

        async def running() -> bool:
            body = (await c.get("/v1/downloads")).json()["active_downloads"]
            return (
                sum(
                    1
                    for d in body
                    if d["status"] == "downloading" and d["progress"]["downloaded_bytes"] > 0
                )
                >= ctx.c3_transfers
            )

        if not await _wait_until(running, 30):
            res.notes.append("not every throttled transfer was moving bytes when the load started")
        ids = [f"rec-{i:04d}" for i in range(ctx.c3_records)] + [
            f"run-{i}" for i in range(ctx.c3_transfers)
        ]
        # idle baseline for /health
        idle: list[float] = []
        conn = RawConn(server.port)
        for _ in range(100):
            t = time.perf_counter()
            await conn.get("/health")
            idle.append(time.perf_counter() - t)
        await conn.close()
        # service time: each kind alone, sequential, on an otherwise idle API (8 transfers run)
        service: dict[str, tuple[float, float]] = {}
        conn = RawConn(server.port)
        srng = random.Random(3)
        for kind, path, count in (
            ("list_all", "/v1/downloads?status=all", 40),
            ("list", "/v1/downloads", 200),
            ("detail", None, 200),
            ("health", "/health", 200),
        ):
            times: list[float] = []
            cpu_a = server.cpu()
            for _ in range(count):
                t = time.perf_counter()
                await conn.get(path or f"/v1/downloads/{srng.choice(ids)}")
                times.append(time.perf_counter() - t)
            service[kind] = (pct(times, 50) * 1000, (server.cpu() - cpu_a) / count * 1000)
        await conn.close()
        metrics_before = (await c.get("/metrics")).text
        list_all = await c.get("/v1/downloads", params={"status": "all"})
        list_act = await c.get("/v1/downloads")
        detail = await c.get(f"/v1/downloads/{ids[0]}")
        health = await c.get("/health")

    paths = {
        "list_all": "/v1/downloads?status=all",
        "list": "/v1/downloads",
        "detail": lambda rng: f"/v1/downloads/{rng.choice(ids)}",
        "health": "/health",
    }
    cpu0 = server.cpu()
    on0, wait0 = runq_wait(server.pid)
    lat, wall, errors = await asyncio.wait_for(
        _poll_load(server.port, paths, ctx.c3_pollers, ctx.c3_requests, ctx.c3_interval),
        max(10, deadline.left()),
    )
    cpu1 = server.cpu()
    on1, wait1 = runq_wait(server.pid)
    async with httpx.AsyncClient(base_url=server.base, timeout=30.0, trust_env=False) as c:
        metrics_after = (await c.get("/metrics")).text
    mem = server.mem()

    # the reference: nginx serving the same response bytes as static files, same load
    ctx.origin.add_bytes("c3-list-all.json", list_all.content)
    ctx.origin.add_bytes("c3-list.json", list_act.content)
    ctx.origin.add_bytes("c3-detail.json", detail.content)
    ctx.origin.add_bytes("c3-health.json", health.content)
    ref_paths = {
        "list_all": "/c3-list-all.json",
        "list": "/c3-list.json",
        "detail": lambda rng: "/c3-detail.json",
        "health": "/c3-health.json",
    }
    ref, ref_wall, ref_errors = await asyncio.wait_for(
        _poll_load(ctx.origin.port, ref_paths, ctx.c3_pollers, ctx.c3_requests, ctx.c3_interval),
        max(10, deadline.left() + 30),
    )

    n_all = len(list_all.json()["active_downloads"])
    n_act = len(list_act.json()["active_downloads"])
    ms = 1000.0
    res.raw.update(
        requests=ctx.c3_requests,
        pollers=ctx.c3_pollers,
        interval_s=ctx.c3_interval,
        wall_s=wall,
        errors=errors,
        ref_errors=ref_errors,
        server_cpu_pct=(cpu1 - cpu0) / wall * 100,
        latency_ms={
            k: {"n": len(v), "p50": pct(v, 50) * ms, "p99": pct(v, 99) * ms} for k, v in lat.items()
        },
        ref_latency_ms={
            k: {"p50": pct(v, 50) * ms, "p99": pct(v, 99) * ms} for k, v in ref.items()
        },
        list_all_bytes=len(list_all.content),
        idle_health_p50_ms=pct(idle, 50) * ms,
        server_rss_mib=mem.rss_mib,
    )
    res.notes.append(
        f"load: {ctx.c3_pollers} pollers, each one request per {ctx.c3_interval * 1000:.0f} ms "
        f"(list?status=all, detail, list, detail, ...), {ctx.c3_requests} requests in {wall:.1f}s "
        f"({ctx.c3_requests / wall:.0f} req/s) plus /health every 20 ms; {errors} errors; "
        f"server CPU {(cpu1 - cpu0) / wall * 100:.0f}% of a core; "
        f"reference nginx run {ref_wall:.1f}s, {ref_errors} errors"
    )
    res.notes.append(
        f"the server's event-loop thread during the load: on a CPU {(on1 - on0) / wall:.0%} of the "
        f"time, runnable but waiting for a CPU (taken by other processes on this shared machine) "
        f"{(wait1 - wait0) / wall:.0%}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    res.raw.update(loop_on_cpu=(on1 - on0) / wall, loop_runq_wait=(wait1 - wait0) / wall)
    res.notes.append(
        f"list?status=all body: {len(list_all.content) / 1024:.0f} KiB ({n_all} records); "
        f"idle GET /health p50 {pct(idle, 50) * ms:.2f} ms (no load)"
    )
    res.notes.append(
        "service time, one request at a time before the load (p50 latency / server CPU "
        "per request; 40 lists of all, 200 of the others): "
        + "; ".join(f"{k} {v[0]:.2f} ms / {v[1]:.1f} ms CPU" for k, v in service.items())
    )
    res.raw["service_ms"] = service

    def rows_for(kind: str, label: str, limit_ms: float, target: str) -> list[Row]:
        v, r = lat.get(kind, []), ref.get(kind, [])
        p50, p99 = pct(v, 50) * ms, pct(v, 99) * ms
        r50, r99 = pct(r, 50) * ms, pct(r, 99) * ms
        return [
            Row(
                "3", f"{label} p50 ms", fmt(p50, 2), f"nginx static {fmt(r50, 2)}", ratio(p50, r50)
            ),
            Row(
                "3",
                f"{label} p99 ms ({len(v)} requests)",
                fmt(p99, 2),
                f"nginx static {fmt(r99, 2)}",
                ratio(p99, r99),
                target,
                bool(v) and p99 < limit_ms,
            ),
        ]

    res.rows += rows_for(
        "list_all", f"GET /v1/downloads?status=all ({n_all} records)", 20, "p99 < 20 ms"
    )
    res.rows += rows_for("list", f"GET /v1/downloads (active: {n_act})", 20, "p99 < 20 ms")
    res.rows += rows_for("detail", "GET /v1/downloads/{id}", 20, "p99 < 20 ms")
    h, rh = lat.get("health", []), ref.get("health", [])
    h99, rh99 = pct(h, 99) * ms, pct(rh, 99) * ms
    res.rows.append(
        Row(
            "3",
            f"event-loop lag: GET /health p99 ms under the load ({len(h)} probes)",
            fmt(h99, 2),
            f"nginx static {fmt(rh99, 2)}",
            ratio(h99, rh99),
            "p99 < 10 ms",
            bool(h) and h99 < 10,
        )
    )
    lag = lag_metrics(metrics_before, metrics_after)
    if lag:
        res.notes.append("server's own lag metric: " + "; ".join(lag))
    else:
        res.notes.append(
            "the server exposes no event-loop lag metric in /metrics: lag measured from "
            "outside only (latency of GET /health, which does no work)"
        )


def case3(ctx: Ctx, deadline: Deadline) -> CaseResult:
    res = CaseResult("3. API under load")
    server = Server(ctx.workdir, "c3", {"downloads": {"max_concurrent": ctx.c3_transfers}})
    server.start()
    try:
        asyncio.run(asyncio.wait_for(_case3(ctx, server, res, deadline), max(30, deadline.left())))
    finally:
        server.stop()
    return res


# --- case 4: scale ------------------------------------------------------------------------------


def _part_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


async def _case4(ctx: Ctx, server: Server, res: CaseResult, deadline: Deadline) -> None:
    scale = ctx.origin.url("scale.bin")
    n = ctx.c4_downloads
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=server.base, timeout=60.0, limits=limits, trust_env=False
    ) as c:
        sem = asyncio.Semaphore(32)

        async def create(i: int) -> None:
            async with sem:
                r = await c.post(
                    "/v1/downloads",
                    json={
                        "model_id": f"s{i:03d}",
                        "url": scale,
                        "max_bytes_per_second": ctx.c4_rate,
                    },
                )
                if r.status_code != 202:
                    raise RuntimeError(f"create s{i:03d}: HTTP {r.status_code} {r.text[:200]}")

        t0, cpu_c0 = time.perf_counter(), server.cpu()
        await asyncio.gather(*(create(i) for i in range(n)))
        created_s = time.perf_counter() - t0
        create_cpu = server.cpu() - cpu_c0
        listing: list[dict[str, Any]] = []

        async def all_moving() -> bool:
            nonlocal listing
            listing = (await c.get("/v1/downloads")).json()["active_downloads"]
            return (
                sum(
                    1
                    for d in listing
                    if d["status"] == "downloading" and d["progress"]["downloaded_bytes"] > 0
                )
                >= n
            )

        moving = await _wait_until(all_moving, min(90, max(10, deadline.left() - 60)), every=0.5)
        up_s = time.perf_counter() - t0
        states: dict[str, int] = defaultdict(int)
        for d in listing:
            states[d["status"]] += 1
        if not moving:
            res.notes.append(
                f"not all {n} transfers were moving bytes after {up_s:.0f}s: {dict(states)}"
            )
        res.notes.append(
            f"{n} downloads created in {created_s:.1f}s (server CPU {create_cpu:.1f}s, "
            f"{create_cpu / n * 1000:.0f} ms each), all moving after {up_s:.1f}s; "
            f"each capped at {ctx.c4_rate >> 10} KiB/s "
            f"({n * ctx.c4_rate / MiB:.0f} MiB/s in all)"
        )
        # steady state
        cpu0, w0 = server.cpu(), time.perf_counter()
        rss_max = 0.0
        while time.perf_counter() - w0 < ctx.c4_window:
            rss_max = max(rss_max, server.mem().rss_mib)
            await asyncio.sleep(0.5)
        cpu_pct = (server.cpu() - cpu0) / (time.perf_counter() - w0) * 100
        mem = server.mem()
        rss_max = max(rss_max, mem.rss_mib)
        progressed = (await c.get("/v1/downloads")).json()["active_downloads"]
        got = sum(d["progress"]["downloaded_bytes"] for d in progressed)
        # pause latency on a sample
        rng = random.Random(4)
        by_id = {d["model_id"]: d for d in progressed if d["status"] == "downloading"}
        sample = rng.sample(sorted(by_id), min(ctx.c4_sample, len(by_id)))
        returned: list[float] = []
        settled: list[float] = []
        failures: list[str] = []
        pool: asyncio.Queue[RawConn] = asyncio.Queue()
        for _ in range(10):  # 10 pauses in flight at a time
            conn = RawConn(server.port)
            await conn.connect()
            pool.put_nowait(conn)

        async def pause(mid: str) -> None:
            part = by_id[mid]["local_path"] + ".part"
            conn = await pool.get()
            try:
                t = time.perf_counter()
                status, text = await conn.request("POST", f"/v1/downloads/{mid}/pause")
                back = time.perf_counter() - t
                if status != 200:
                    failures.append(f"{mid}: HTTP {status} {text[:120]!r}")
                    return
                returned.append(back)
                size = _part_size(part)
                if size is None:
                    return
                stamp = time.perf_counter() - t
                stable = 0
                while stable < 2:
                    await asyncio.sleep(0.05)
                    now = _part_size(part)
                    if now != size:
                        size, stamp, stable = now, time.perf_counter() - t, 0
                    else:
                        stable += 1
                settled.append(stamp)
            finally:
                pool.put_nowait(conn)

        await asyncio.gather(*(pause(m) for m in sample))
        while not pool.empty():
            await pool.get_nowait().close()
        t = time.perf_counter()
        r = await c.delete("/v1/downloads")
        cancel_all_s = time.perf_counter() - t
        final = server.mem()
    aria = _aria_scale(ctx, min(ctx.c4_window, 10))
    ms = 1000.0
    res.raw.update(
        downloads=n,
        cpu_pct=cpu_pct,
        rss_max_mib=rss_max,
        hwm_mib=final.hwm_mib,
        threads=mem.threads,
        pause_return_ms=[round(x * ms, 1) for x in sorted(returned)],
        pause_settle_ms=[round(x * ms, 1) for x in sorted(settled)],
        aria2=aria,
        cancel_all_s=cancel_all_s,
        bytes_after_window=got,
    )
    if failures:
        res.notes.append(f"{len(failures)} pauses failed: {failures[:3]}")
    res.notes.append(
        f"steady window {ctx.c4_window:.0f}s: server threads {mem.threads}; "
        f"cancel-all of the rest took {cancel_all_s * 1000:.0f} ms (HTTP {r.status_code})"
    )
    if not settled and returned:
        res.notes.append("no .part file found next to local_path: the bytes-stop check was skipped")
    a_rss, a_cpu = aria.get("rss_mib"), aria.get("cpu_pct")
    if aria.get("error"):
        res.notes.append(f"aria2c reference: {aria['error']}")
    else:
        res.notes.append(
            f"reference: aria2c -j {n} --max-download-limit={ctx.c4_rate >> 10}K, same file, "
            f"measured over {aria['window_s']:.0f}s with {aria.get('connections', '?')} "
            "sockets open"
        )
    r50, r99 = pct(returned, 50) * ms, pct(returned, 99) * ms
    s50, s99 = pct(settled, 50) * ms, pct(settled, 99) * ms
    res.rows += [
        Row(
            "4",
            f"{n} concurrent throttled downloads: peak RSS MiB",
            fmt(max(rss_max, final.hwm_mib)),
            f"aria2c -j {n}: {fmt(a_rss)}",
            ratio(max(rss_max, final.hwm_mib), a_rss),
            "< 300 MiB",
            max(rss_max, final.hwm_mib) < 300,
        ),
        Row(
            "4",
            "CPU % of one core (steady)",
            fmt(cpu_pct),
            f"aria2c -j {n}: {fmt(a_cpu)}",
            ratio(cpu_pct, a_cpu),
        ),
        Row(
            "4",
            f"pause: POST returns, p50 ms ({len(returned)} sampled)",
            fmt(r50),
            "target 250",
            ratio(r50, 250),
        ),
        Row(
            "4",
            "pause: POST returns (transfer stopped), p99 ms",
            fmt(r99),
            "target 250",
            ratio(r99, 250),
            "p99 < 250 ms",
            bool(returned) and r99 < 250,
        ),
        Row(
            "4",
            "pause: .part stops growing, p99 ms (50 ms checks)",
            fmt(s99),
            "target 250",
            ratio(s99, 250),
            "p99 < 250 ms",
            bool(settled) and s99 < 250,
        ),
    ]
    res.raw["pause_settle_p50_ms"] = s50


def _aria_scale(ctx: Ctx, window: float) -> dict[str, Any]:
    """aria2c downloading the same n throttled files at once: its RSS and CPU% over a window."""
    n = ctx.c4_downloads
    d = ctx.workdir / "tools-c4"
    d.mkdir(exist_ok=True)
    listing = d / "input.txt"
    url = ctx.origin.url("scale.bin")
    listing.write_text("".join(f"{url}\n  out=a{i:03d}.bin\n" for i in range(n)))
    argv = [
        ctx.tools["aria2c"],
        "-i",
        str(listing),
        "-d",
        str(d),
        "-j",
        str(n),
        "-x1",
        "-s1",
        f"--max-download-limit={ctx.c4_rate >> 10}K",
        "--file-allocation=none",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "--console-log-level=error",
        "--summary-interval=0",
        "-q",
    ]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
        preexec_fn=pdeathsig,
    )
    try:
        time.sleep(5)  # let it open every connection
        if proc.poll() is not None:
            return {"error": f"aria2c exited {proc.returncode}"}
        cpu0, w0 = proc_cpu(proc.pid), time.perf_counter()
        rss = 0.0
        while time.perf_counter() - w0 < window:
            rss = max(rss, proc_mem(proc.pid).rss_mib)
            time.sleep(0.5)
        cpu_pct = (proc_cpu(proc.pid) - cpu0) / (time.perf_counter() - w0) * 100
        mem = proc_mem(proc.pid)
        conns = _established(proc.pid)
        return {
            "rss_mib": max(rss, mem.hwm_mib),
            "cpu_pct": cpu_pct,
            "window_s": window,
            "connections": conns,
        }
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for f in d.glob("a*.bin*"):
            f.unlink(missing_ok=True)


def _established(pid: int) -> int | None:
    """Sockets a process holds open (its fds that are sockets)."""
    try:
        return sum(
            1 for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:")
        )
    except OSError:
        return None


def case4(ctx: Ctx, deadline: Deadline) -> CaseResult:
    res = CaseResult("4. scale")
    server = Server(ctx.workdir, "c4", {"downloads": {"max_concurrent": max(ctx.c4_downloads, 4)}})
    server.start()
    try:
        asyncio.run(asyncio.wait_for(_case4(ctx, server, res, deadline), max(30, deadline.left())))
    finally:
        server.stop()
    return res


CASES = {1: case1, 2: case2, 3: case3, 4: case4, 5: case5, 6: case6, 7: case7}
__all__ = ["CASES", "Ctx", "Deadline"]

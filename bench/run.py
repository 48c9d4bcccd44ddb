#!/usr/bin/env python3
"""modelkernel's benchmark suite (issue 8): our server against curl, aria2c and nginx.

    python bench/run.py --quick          # ~2-5 min: 256 MiB file, 3 runs
    python bench/run.py                  # ~5-15 min: 1 GiB file, 5 runs
    python bench/run.py --cases 1,3 --size-mib 512 --runs 3 --profile

Installs nginx, aria2 and curl with apt-get when they are missing (as root), serves generated
random files from nginx on loopback, runs our server as a subprocess, prints a markdown table
(every figure next to a tool measured in the same run, with PASS/FAIL against the targets) and
writes it to bench/results/latest.md (+ latest.json with the raw figures). See bench/README.md.
"""

# ruff: noqa: S603, T201 - a benchmark script: it runs fixed local commands and prints its report

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cases import CASES, Ctx, Deadline  # noqa: E402
from _nginx import Origin, ensure_tools, tool_path, warm  # noqa: E402
from _server import REPO, config_fields  # noqa: E402
from _stats import CaseResult, Row, fmt, render_table  # noqa: E402

MiB = 1 << 20


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="256 MiB, 3 runs, shorter load phases")
    p.add_argument(
        "--cases",
        default="1,2,5,6,7,3,4",
        help="comma list of cases to run (default all: 1,2,5,6,7,3,4; 5 and 6 are 1 and 2 over "
        "HTTPS, 7 is 6 for an hf:// file)",
    )
    p.add_argument(
        "--size-mib", type=int, help="file size for cases 1 and 2 (default 1024, quick 256)"
    )
    p.add_argument(
        "--runs",
        type=int,
        help="runs per tool in case 1 (default 5, quick 3); case 2 uses min(runs, 3)",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=8,
        help="downloads.connections for case 2, when the server has that setting (default 8)",
    )
    p.add_argument("--limit-rate", default="50m", help="nginx limit_rate per connection in case 2")
    p.add_argument(
        "--cdn-limit-rate", default="20m", help="nginx limit_rate per connection of case 7's CDN"
    )
    p.add_argument(
        "--requests", type=int, help="case 3: total poller requests (default 3000, quick 1500)"
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.25,
        help="case 3: seconds between one poller's requests (default 0.25)",
    )
    p.add_argument(
        "--scale", type=int, default=500, help="case 4: concurrent downloads (default 500)"
    )
    p.add_argument(
        "--window", type=float, help="case 4: steady-state window in s (default 10, quick 5)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server during case 1's downloads (bench/results/profile-case1.txt)",
    )
    p.add_argument(
        "--tmp-dir", help="where to put the origin files and downloads (default: system temp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server logs) at the end")
    p.add_argument(
        "--out", default=str(HERE / "results" / "latest.md"), help="where to write the table"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any target FAILs")
    args = p.parse_args(argv)
    args.size_mib = args.size_mib or (256 if args.quick else 1024)
    args.runs = args.runs or (3 if args.quick else 5)
    args.requests = args.requests or (1500 if args.quick else 3000)
    args.window = args.window or (5.0 if args.quick else 10.0)
    try:
        args.case_list = list(dict.fromkeys(int(c) for c in args.cases.split(",") if c.strip()))
    except ValueError:
        p.error("--cases takes numbers: 1,2,5,6,7,3,4")
    if not set(args.case_list) <= set(CASES):
        p.error(f"unknown case in {args.cases}: cases are 1-7")
    return args


def budgets(args: argparse.Namespace) -> dict[int, float]:
    """Seconds each case may take; past it a case reports what it has measured."""
    size = args.size_mib
    runs2 = min(args.runs, 3)
    return {
        1: 60 + args.runs * 4 * size / 100,
        2: 60 + runs2 * (2 * size / 45 + size / 150),
        5: 60 + args.runs * 4 * size / 80,
        6: 60 + runs2 * (2 * size / 45 + size / 150),
        7: 90 + runs2 * (2 * size / 18 + 2 * size / 80),
        3: 240 + args.requests / 50,
        4: 200 + 2 * args.window + args.scale / 5,
    }


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (
        (done.stdout + done.stderr).strip().splitlines()[0]
        if (done.stdout + done.stderr).strip()
        else "?"
    )


def header(args: argparse.Namespace, tools: dict[str, str]) -> list[str]:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    load = os.getloadavg()
    return [
        "# modelkernel benchmark",
        "",
        f"- when: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; command: "
        f"`python bench/run.py {' '.join(sys.argv[1:])}`",
        f"- machine: {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.platform()}; "
        f"load average at start {load[0]:.2f} (a shared machine: absolute figures are noisy, "
        "compare the ratios)",
        f"- tools: {_version([tools['nginx'], '-v'])}; {_version([tools['curl'], '--version'])}; "
        f"{_version([tools['aria2c'], '--version'])}; Python {platform.python_version()}",
        f"- cases 1-2 (http) and 5-7 (https, a CA the bench made; our server has only "
        f"SSL_CERT_FILE=<that CA> to trust it): {args.size_mib} MiB random file from nginx "
        "(page cache warm), downloads to "
        f"the same temp filesystem, deleted between runs; case 1 {args.runs} runs per tool, case 2 "
        f"{min(args.runs, 3)}, tool order rotated per run; figures are medians",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    say(
        f"cases {args.case_list}, {args.size_mib} MiB, {args.runs} runs"
        + (" (quick)" if args.quick else "")
    )
    tools = ensure_tools(say)
    fields = config_fields("downloads")
    if args.profile and tool_path("py-spy") is None:
        say("--profile: py-spy not found (pip install py-spy); running without a profile")
    workdir = Path(tempfile.mkdtemp(prefix="mkbench-", dir=args.tmp_dir))
    results_dir = Path(args.out).resolve().parent
    results_dir.mkdir(parents=True, exist_ok=True)
    origin = Origin(
        tools["nginx"], workdir, limit_rate=args.limit_rate, cdn_rate=args.cdn_limit_rate
    )
    results: list[CaseResult] = []
    started = time.monotonic()
    interrupted = False
    try:
        size = args.size_mib * MiB
        need = 2 * size + 128 * MiB + args.scale * (1 * MiB)
        free = shutil.disk_usage(workdir).free
        if free < need:
            raise SystemExit(
                f"bench: {workdir} has {free / MiB:.0f} MiB free, needs ~{need / MiB:.0f}"
            )
        say(f"generating origin files in {workdir} ...")
        origin.add_random("big.bin", size)
        origin.add_random("scale.bin", 64 * MiB)
        origin.add_random("tiny.bin", 1024)
        if 7 in args.case_list:  # the hub sends the file's sha256, which our server checks
            with open(origin.root / "big.bin", "rb") as f:
                origin.add_hub_file("big.bin", hashlib.file_digest(f, "sha256").hexdigest())
        warm(origin.root / "big.bin")
        origin.start(openssl=tools["openssl"])
        say(
            f"nginx on 127.0.0.1:{origin.port}, https on {origin.tls_port} (CA {origin.ca_file}); "
            f"limit_rate {args.limit_rate} under /limited/, {args.cdn_limit_rate} under /cdn/"
        )
        ctx = Ctx(
            workdir=workdir,
            origin=origin,
            tools=tools,
            size=size,
            runs=args.runs,
            runs2=min(args.runs, 3),
            quick=args.quick,
            say=say,
            connections_key="connections" in fields,
            connections=args.connections,
            c3_requests=args.requests,
            c3_interval=args.poll_interval,
            c4_downloads=args.scale,
            c4_window=args.window,
            profile=args.profile,
            results_dir=results_dir,
        )
        limits = budgets(args)
        for n in args.case_list:
            deadline = Deadline(limits[n])
            say(f"case {n} (budget {limits[n]:.0f}s) ...")
            t0 = time.monotonic()
            try:
                res = CASES[n](ctx, deadline)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken case is reported, the rest run
                res = CaseResult(f"{n}. (error)", error=f"{type(exc).__name__}: {exc}")
                res.rows.append(Row(str(n), "case did not complete", "error", passed=False))
                say(f"case {n} failed: {exc}\n{traceback.format_exc()}")
            res.raw["seconds"] = round(time.monotonic() - t0, 1)
            say(f"case {n} done in {res.raw['seconds']:.0f}s")
            results.append(res)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: stopping nginx and the server, reporting what was measured")
    finally:
        origin.stop()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    report = render(args, tools, results, time.monotonic() - started, interrupted)
    print(report)
    out = Path(args.out)
    out.write_text(report + "\n")
    raw = {
        r.name: {
            "raw": r.raw,
            "notes": r.notes,
            "error": r.error,
            "rows": [vars(x) for x in r.rows],
        }
        for r in results
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    say(f"wrote {out} and {out.with_suffix('.json')}")
    if interrupted:
        return 130
    if any(r.error for r in results):
        return 2
    if args.strict and any(row.passed is False for r in results for row in r.rows):
        return 1
    return 0


def render(args, tools, results: list[CaseResult], seconds: float, interrupted: bool) -> str:
    lines = header(args, tools)
    rows = [row for r in results for row in r.rows]
    lines.append(render_table(rows))
    passed = sum(1 for r in rows if r.passed)
    failed = sum(1 for r in rows if r.passed is False)
    lines += [
        "",
        f"Targets: {passed} PASS, {failed} FAIL. Total time {seconds:.0f}s"
        + (" (interrupted)" if interrupted else "")
        + ".",
    ]
    for r in results:
        lines += ["", f"### Case {r.name} ({r.raw.get('seconds', '?')}s)"]
        if r.error:
            lines.append(f"- ERROR: {r.error}")
        tools_raw = r.raw.get("tools")
        if tools_raw:
            lines.append("")
            lines.append(
                "| tool | MiB/s (median) | all runs MiB/s | CPU s/GiB (median) | all runs "
                "| peak RSS MiB |"
            )
            lines.append("|---|---:|---|---:|---|---:|")
            for name, t in tools_raw.items():
                lines.append(
                    f"| {name} | {fmt(t['mib_s'])} | {t['mib_s_all']} "
                    f"| {fmt(t['cpu_s_per_gib'], 2)} | {t['cpu_all']} | {fmt(t['rss_mib'])} |"
                )
            lines.append("")
        for note in r.notes:
            lines.append(f"- {note}")
        if r.raw.get("profile"):
            lines += ["", "Server profile during case 1 (py-spy):", "```", *r.raw["profile"], "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())

"""Small helpers: percentiles, the result rows, the markdown table, Prometheus text."""

from __future__ import annotations

import contextlib
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Row", "fmt", "lag_metrics", "median", "pct", "render_table"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


@dataclass
class Row:
    case: str
    metric: str
    ours: str
    reference: str = "—"
    ratio: str = "—"
    target: str = "—"
    passed: bool | None = None  # None: informational, no target
    note: str = ""

    @property
    def result(self) -> str:
        if self.passed is None:
            return "info"
        return "**PASS**" if self.passed else "**FAIL**"


@dataclass
class CaseResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def ratio(ours: float | None, ref: float | None, digits: int = 2) -> str:
    if ours is None or ref is None or not ref or math.isnan(ours) or math.isnan(ref):
        return "n/a"
    return f"{ours / ref:.{digits}f}x"


def render_table(rows: list[Row]) -> str:
    head = "| Case | Metric | Ours | Reference (same run) | Ratio | Target | Result |"
    sep = "|---|---|---:|---|---:|---|---|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.metric} | {r.ours} | {r.reference} | {r.ratio} "
            f"| {r.target} | {r.result} |"
        )
    return "\n".join(lines)


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prom(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def lag_metrics(before: str, after: str) -> list[str]:
    """Describe every metric whose name mentions "lag" (the server's own event-loop lag, if it
    exposes one): a histogram's p50/p99 over the load window (bucket upper bounds, from the
    difference of the two scrapes), otherwise the gauge/counter values after the load."""
    b, a = parse_prom(before), parse_prom(after)
    names = sorted({k.split("{")[0] for k in a if "lag" in k.split("{")[0].lower()})
    found: list[str] = []
    hist_bases = {n[: -len("_bucket")] for n in names if n.endswith("_bucket")}
    for base in sorted(hist_bases):
        buckets: list[tuple[float, float]] = []
        for key, value in a.items():
            if key.startswith(base + "_bucket{"):
                le = re.search(r'le="([^"]+)"', key)
                if le:
                    bound = math.inf if le.group(1) in ("+Inf", "inf") else float(le.group(1))
                    buckets.append((bound, value - b.get(key, 0.0)))
        buckets.sort()
        total = buckets[-1][1] if buckets else 0
        if total <= 0:
            found.append(f"{base}: no observations during the load")
            continue
        qs = {}
        for q in (0.5, 0.99):
            for bound, count in buckets:
                if count >= q * total:
                    qs[q] = bound
                    break
        finite = [bound for bound, _ in buckets if bound != math.inf]

        def show(bound: float, finite: list[float] = finite) -> str:
            if bound == math.inf:
                return f"> {finite[-1] * 1000:g} ms" if finite else "n/a"
            return f"<= {bound * 1000:g} ms"

        found.append(
            f"{base} (histogram, {int(total)} samples in the window): "
            f"p50 {show(qs[0.5])}, p99 {show(qs[0.99])}"
        )
    for name in names:
        if any(name.startswith(h) for h in hist_bases):
            continue
        vals = {k: v for k, v in a.items() if k.split("{")[0] == name}
        shown = ", ".join(f"{k} = {v:g}" for k, v in list(vals.items())[:6])
        found.append(shown)
    return found

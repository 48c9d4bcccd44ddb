"""Prometheus metrics, built with prometheus-client on a registry of the kernel's own.

Counters and histograms are fed by bus events only (``observe``: the kernel's bus observer),
so nothing that moves bytes knows this module; gauges that describe the current state
(downloads by status, queue length, active transfers, the throttle) are read from the manager
when ``/metrics`` is scraped, so they are never stale.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kernel.types import (
    STATUSES,
    TERMINAL,
    DownloadProgress,
    DownloadRecord,
    DownloadRetry,
    DownloadStatus,
    EngineCreated,
    Event,
)

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.downloads = Gauge(
            "modelkernel_downloads", "Downloads by status.", ["status"], registry=r
        )
        self.bytes_received = Counter(
            "modelkernel_bytes_received",
            "Bytes received from sources and landed in model files (.part included), counted "
            "from the downloads' progress; a download restarted from zero counts its bytes again.",
            registry=r,
        )
        self.active_transfers = Gauge(
            "modelkernel_active_transfers", "Transfers moving bytes now.", registry=r
        )
        self.queue_length = Gauge(
            "modelkernel_queue_length", "Downloads waiting for a slot.", registry=r
        )
        self.throttle = Gauge(
            "modelkernel_throttle_bytes_per_second", "Global bandwidth cap (0 = none).", registry=r
        )
        self.retries = Counter(
            "modelkernel_retries", "Transient faults retried, by reason.", ["reason"], registry=r
        )
        self.download_duration = Histogram(
            "modelkernel_download_duration_seconds",
            "Created to completed.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.engine_duration = Histogram(
            "modelkernel_engine_creation_duration_seconds",
            "Engine creation time.",
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, float("inf")),
            registry=r,
        )
        self.loop_lag = Histogram(
            "modelkernel_event_loop_lag_seconds",
            "How late the event loop runs a timer.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, float("inf")),
            registry=r,
        )
        self.http_latency = Histogram(
            "modelkernel_http_request_duration_seconds",
            "API request latency by route.",
            ["method", "route", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, float("inf")),
            registry=r,
        )
        # Per running download: the downloaded_bytes last seen, to count only what is new.
        # A download is forgotten when it ends, so this holds the running ones at most.
        self._landed: dict[str, int] = {}

    async def watch_loop_lag(self, interval: float = 0.1) -> None:
        """Forever: sleep ``interval`` and record how much later than asked the loop woke."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - asked))

    def observe(self, event: Event) -> None:
        match event:
            case DownloadStatus(record=rec):
                self._count_bytes(rec)
                if rec.status == "completed" and rec.end_time:
                    self.download_duration.observe(max(0, rec.end_time - rec.start_time) / 1000)
            case DownloadProgress(record=rec):
                self._count_bytes(rec)
            case DownloadRetry(reason=reason):
                self.retries.labels(reason=reason).inc()
            case EngineCreated(seconds=seconds):
                self.engine_duration.observe(seconds)
            case _:
                pass

    def _count_bytes(self, rec: DownloadRecord) -> None:
        """Add what ``rec`` gained since it was last seen. The baseline is the larger of that
        and where this run began (``run_start_bytes``: bytes from an earlier run, or a file
        found already in place, were not received now); a count that went down (a restart
        from zero) is the new baseline."""
        seen = max(self._landed.get(rec.model_id, 0), rec.run_start_bytes)
        if rec.downloaded_bytes > seen:
            self.bytes_received.inc(rec.downloaded_bytes - seen)
        if rec.status in TERMINAL:
            self._landed.pop(rec.model_id, None)
        else:
            self._landed[rec.model_id] = rec.downloaded_bytes

    def render(self, records: Iterable[DownloadRecord], running: int, throttle: int) -> bytes:
        """The exposition, with the gauges set from the state now: ``records`` (by status),
        ``running`` transfers and the global ``throttle`` (bytes/s, 0 = none)."""
        counts = dict.fromkeys(STATUSES, 0)
        for rec in records:
            counts[rec.status] += 1
        for status, count in counts.items():
            self.downloads.labels(status=status).set(count)
        self.active_transfers.set(running)
        self.queue_length.set(counts["queued"])
        self.throttle.set(throttle)
        return generate_latest(self.registry)

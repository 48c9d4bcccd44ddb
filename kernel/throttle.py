"""Token buckets for bandwidth caps, read afresh on every call so a cap changes at run time.

A transfer calls ``consume(n)`` after receiving ``n`` bytes; when the bucket is in debt it
sleeps until the debt is repaid, in slices of at most ``SLICE_S`` so a raised (or removed) cap
takes effect at once. The bucket holds at most ``BURST_S`` seconds of tokens, so the rate is
smooth at the granularity of a progress update. Several transfers sharing one bucket (the
global cap) each pay for what they took, which shares the cap between them.

Worker threads (the byte loop in kernel/pump.py) use ``consume_blocking``, which waits on a
``threading.Event`` so a pause interrupts the wait; the bucket's state is under a lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]

BURST_S = 0.25
SLICE_S = 0.1


class TokenBucket:
    def __init__(self, rate: Callable[[], int]) -> None:
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    @property
    def rate(self) -> int:
        """The cap now (bytes/s, 0 = none): what the callable given at creation returns."""
        return self._rate()

    def _refill(self, rate: int) -> None:
        now = time.monotonic()
        self._tokens = min(rate * BURST_S, self._tokens + (now - self._stamp) * rate)
        self._stamp = now

    def _reserve(self, n: int) -> tuple[float, int]:
        """Take ``n`` tokens; (seconds this consumer waits, the rate it was computed at).
        The wait covers the debt of everyone who took before it, so consumers sharing the
        bucket are served in turn, none starved."""
        with self._lock:
            rate = self._rate()
            if rate <= 0:
                self._tokens, self._stamp = 0.0, time.monotonic()
                return 0.0, 0
            self._refill(rate)
            self._tokens -= n
            return (-self._tokens / rate if self._tokens < 0 else 0.0), rate

    def _rescale(self, left: float, rate: int) -> tuple[float, int]:
        """The wait still ahead after a slice: shorter or longer if the cap changed."""
        new = self._rate()
        if new <= 0:
            with self._lock:
                self._tokens = 0.0
            return 0.0, 0
        return (left * rate / new if new != rate else left), new

    async def consume(self, n: int) -> None:
        wait, rate = self._reserve(n)
        while wait > 0:
            step = min(SLICE_S, wait)
            await asyncio.sleep(step)
            wait, rate = self._rescale(wait - step, rate)

    def consume_blocking(self, n: int, stop: threading.Event) -> None:
        """``consume`` for a worker thread; returns early once ``stop`` is set."""
        wait, rate = self._reserve(n)
        while wait > 0:
            step = min(SLICE_S, wait)
            if stop.wait(step):
                return
            wait, rate = self._rescale(wait - step, rate)

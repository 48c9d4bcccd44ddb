"""Token buckets for bandwidth caps, read afresh on every call so a cap changes at run time.

A transfer calls ``consume(n)`` after receiving ``n`` bytes; when the bucket is in debt it
sleeps until the debt is repaid, in slices of at most ``SLICE_S`` so a raised (or removed) cap
takes effect at once. The bucket holds at most ``BURST_S`` seconds of tokens, so the rate is
smooth at the granularity of a progress update. Several transfers sharing one bucket (the
global cap) each pay for what they took, which shares the cap between them.
"""

from __future__ import annotations

import asyncio
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

    def _refill(self, rate: int) -> None:
        now = time.monotonic()
        self._tokens = min(rate * BURST_S, self._tokens + (now - self._stamp) * rate)
        self._stamp = now

    async def consume(self, n: int) -> None:
        rate = self._rate()
        if rate <= 0:
            self._tokens, self._stamp = 0.0, time.monotonic()
            return
        self._refill(rate)
        self._tokens -= n
        while self._tokens < 0:
            await asyncio.sleep(min(SLICE_S, -self._tokens / rate))
            rate = self._rate()
            if rate <= 0:
                self._tokens = 0.0
                return
            self._refill(rate)

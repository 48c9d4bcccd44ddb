"""EventBus: asyncio fan-out of kernel events to subscribers, with a replay ring.

Publishing never blocks: each subscriber has a bounded queue, and a subscriber that falls
behind is marked ``overflowed`` (its queue is cleared) so it can resynchronise from a fresh
list instead of growing memory without bound. Every event gets an increasing id; the ring
keeps the last ``ring_size`` so a reconnecting SSE client can ask for what it missed.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import msgspec

from kernel.types import Event

__all__ = ["EventBus", "Subscription"]


class Envelope(msgspec.Struct, frozen=True):
    id: int
    event: Event


class Subscription:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self.queue: asyncio.Queue[Envelope] = asyncio.Queue(maxsize)
        self.overflowed = False

    def _offer(self, envelope: Envelope) -> None:
        try:
            self.queue.put_nowait(envelope)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()

    async def get(self) -> Envelope:
        return await self.queue.get()

    def close(self) -> None:
        self._bus._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self, ring_size: int = 1024, observer: Callable[[Event], None] | None = None):
        self._ring: collections.deque[Envelope] = collections.deque(maxlen=ring_size)
        self._subscribers: set[Subscription] = set()
        # Ids start from the clock (ms x 1000), so they keep growing across restarts and a
        # client's Last-Event-ID from an earlier run never aliases an event of this one.
        self._next_id = time.time_ns() // 1_000_000 * 1000
        self.first_id = self._next_id
        self._observer = observer

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def publish(self, event: Event) -> Envelope:
        envelope = Envelope(self._next_id, event)
        self._next_id += 1
        self._ring.append(envelope)
        for sub in tuple(self._subscribers):
            sub._offer(envelope)
        if self._observer is not None:
            self._observer(event)
        return envelope

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subscribers.add(sub)
        return sub

    def since(self, last_id: int) -> list[Envelope]:
        """Buffered envelopes with an id greater than ``last_id``."""
        return [e for e in self._ring if e.id > last_id]

"""The scheduler: the queue's order, the download slots, and the task each download runs.

A download runs at most one :class:`Job` at a time, of a kind declared when it starts:

- ``transfer`` moves the bytes and holds one of the ``max_concurrent`` slots until its task
  ends. Once the file is complete it is *finalizing* (verifying and renaming the ``.part``
  into place): from then on it is never cancelled, only awaited, so a pause or cancel that
  arrives then waits for it to finish, and it keeps its slot meanwhile.
- ``engine`` builds the engine from a finished file (the record is ``creating_engine``); it
  holds no slot, so a slow engine never keeps a download waiting.

Which phase a download is in follows from its record's status and its job's ``finalizing``
flag; there is no second state to keep in step. Queued downloads start in order of priority
(higher first), then creation (FIFO). The scheduler only keeps the books and says what is
due; the manager starts and stops the work, under its per-download locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from kernel.types import DownloadRecord

__all__ = ["Job", "JobKind", "Scheduler"]

JobKind: TypeAlias = Literal["transfer", "engine"]


@dataclass
class Job:
    """The task running for one download."""

    kind: JobKind
    task: asyncio.Task[None]
    finalizing: bool = False  # a transfer verifying and renaming its file: let it finish

    @property
    def holds_slot(self) -> bool:
        return self.kind == "transfer"

    @property
    def preemptible(self) -> bool:
        """Cancelling it loses nothing: its ``.part`` and counters allow a resume."""
        return self.kind == "transfer" and not self.finalizing


def _order(rec: DownloadRecord) -> tuple[int, int]:
    return -rec.priority, rec.seq


class Scheduler:
    """Slots and tasks for the ``records`` of one manager (a live view, never copied)."""

    def __init__(
        self,
        records: Mapping[str, DownloadRecord],
        max_concurrent: Callable[[], int],
        on_free: Callable[[str], None],
    ) -> None:
        self._records = records
        self._max_concurrent = max_concurrent  # read at each decision: settings change
        self._on_free = on_free  # a job's task ended (however): its model id
        self._jobs: dict[str, Job] = {}
        self._held = 0  # > 0 while a bulk cancel runs: nothing new starts
        self._stopping = False

    def queue(self) -> list[DownloadRecord]:
        """Queued downloads in the order they will start: priority, then FIFO."""
        return sorted((r for r in self._records.values() if r.status == "queued"), key=_order)

    def running(self) -> int:
        """Transfers holding a download slot now (finalizing ones included)."""
        return sum(1 for job in self._jobs.values() if job.holds_slot)

    def due(self) -> list[DownloadRecord]:
        """The queued downloads to start now: as many as there are free slots."""
        if self._stopping or self._held:
            return []
        return self.queue()[: max(self._max_concurrent() - self.running(), 0)]

    def excess(self) -> list[DownloadRecord]:
        """Transfers to send back to the queue after ``max_concurrent`` went down: the
        preemptible ones beyond the limit, lowest priority and newest first."""
        over = self.running() - self._max_concurrent()
        if over <= 0:
            return []
        preemptible = [self._records[m] for m, job in self._jobs.items() if job.preemptible]
        return sorted(preemptible, key=_order, reverse=True)[:over]

    def start(self, rec: DownloadRecord, kind: JobKind, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as the job of ``rec``, replacing the one it has (a transfer hands
        over to its engine job from inside its own task)."""
        model_id = rec.model_id
        job = Job(kind, asyncio.create_task(work, name=f"{kind}:{model_id}"))
        self._jobs[model_id] = job
        job.task.add_done_callback(lambda _task: self._ended(model_id, job))

    def _ended(self, model_id: str, job: Job) -> None:
        """A job's task is done (even one cancelled before it ran): its slot is free, unless
        the job was replaced, and then only the replacement holds one."""
        if self._jobs.get(model_id) is job:
            del self._jobs[model_id]
        self._on_free(model_id)

    def job(self, model_id: str) -> Job | None:
        return self._jobs.get(model_id)

    def finalizing(self, model_id: str) -> None:
        """The transfer of ``model_id`` has its whole file: it is let finish from now on."""
        job = self._jobs.get(model_id)
        if job is not None:
            job.finalizing = True

    async def stop(self, model_id: str) -> None:
        """Stop the job of ``model_id`` and wait for its task: cancelled, unless it is
        finalizing, which is awaited instead (it may hand over to an engine job, which
        keeps running: ask again to stop that)."""
        job = self._jobs.get(model_id)
        if job is None:
            return
        if not job.finalizing:
            job.task.cancel()
        await asyncio.wait({job.task})

    async def stop_all(self) -> None:
        """Shutdown: cancel every job, finalizing ones too (the next start checks their
        file again), and wait for them; nothing starts from now on."""
        self._stopping = True
        tasks = [job.task for job in self._jobs.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Nothing starts inside: a slot freed by one of many cancellations never starts a
        download that is about to be cancelled too."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

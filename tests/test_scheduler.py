"""The scheduler's books (queue order, slots, holds) and, over a real kernel, the rule that a
finalizing transfer (verifying and renaming its file) is never cancelled and keeps its slot."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kernel import hookimpl
from kernel.config import Settings
from kernel.core import Kernel
from kernel.errors import InvalidState
from kernel.scheduler import Scheduler
from kernel.types import DownloadRecord, EngineSpec
from tests.conftest import make_settings
from tests.helpers.fakes import EchoEngine
from tests.helpers.origin import Origin

# --- the books, on plain records ---------------------------------------------------------------


def _records(*rows: tuple[str, int]) -> dict[str, DownloadRecord]:
    """Queued records in creation order: (model id, priority)."""
    return {
        model_id: DownloadRecord(
            model_id=model_id, url="mem://x", local_path=f"/m/{model_id}", priority=priority,
            seq=seq,
        )  # fmt: skip
        for seq, (model_id, priority) in enumerate(rows, start=1)
    }


async def test_due_fills_the_free_slots_in_priority_then_fifo_order() -> None:
    records = _records(("a", 0), ("b", 5), ("c", 0), ("d", 5))
    limit, freed = [2], []  # type: ignore[var-annotated]
    scheduler = Scheduler(records, lambda: limit[0], freed.append)
    assert [r.model_id for r in scheduler.queue()] == ["b", "d", "a", "c"]
    assert [r.model_id for r in scheduler.due()] == ["b", "d"]

    gate = asyncio.Event()
    for rec in scheduler.due():
        rec.status = "downloading"
        scheduler.start(rec, "transfer", gate.wait())
    assert scheduler.running() == 2
    assert scheduler.due() == []  # every slot is taken
    records["a"].status = "creating_engine"
    scheduler.start(records["a"], "engine", gate.wait())
    assert scheduler.running() == 2  # building an engine holds no slot

    limit[0] = 1
    assert [r.model_id for r in scheduler.excess()] == ["d"]  # the newer of equal priority
    scheduler.finalizing("d")
    assert [r.model_id for r in scheduler.excess()] == ["b"]  # a finalizing one is let finish

    limit[0] = 4
    with scheduler.held():
        assert scheduler.due() == []  # a bulk cancel holds the queue
    assert [r.model_id for r in scheduler.due()] == ["c"]
    await scheduler.stop("b")
    assert (scheduler.running(), freed) == (1, ["b"])
    gate.set()
    await scheduler.stop("d")
    await scheduler.stop("a")
    assert (scheduler.running(), sorted(freed)) == (0, ["a", "b", "d"])


async def test_stop_cancels_a_transfer_but_waits_for_a_finalizing_one() -> None:
    records = _records(("moving", 0), ("renaming", 0))
    scheduler = Scheduler(records, lambda: 2, lambda _m: None)
    release = asyncio.Event()
    ended: dict[str, str] = {}

    async def work(model_id: str) -> None:
        try:
            await release.wait()
            ended[model_id] = "finished"
        except asyncio.CancelledError:
            ended[model_id] = "cancelled"
            raise

    for rec in records.values():
        scheduler.start(rec, "transfer", work(rec.model_id))
    await asyncio.sleep(0)  # both tasks are running
    scheduler.finalizing("renaming")
    await scheduler.stop("moving")
    assert ended == {"moving": "cancelled"}
    stopping = asyncio.create_task(scheduler.stop("renaming"))
    done, _ = await asyncio.wait({stopping}, timeout=0.2)
    assert not done  # it waits for the rename instead of cancelling it
    assert scheduler.running() == 1  # and the slot stays taken meanwhile
    release.set()
    await stopping
    assert ended == {"moving": "cancelled", "renaming": "finished"}
    assert scheduler.running() == 0


async def test_a_job_cancelled_before_it_ran_frees_its_slot() -> None:
    records = _records(("early", 0))
    freed: list[str] = []
    scheduler = Scheduler(records, lambda: 1, freed.append)
    scheduler.start(records["early"], "transfer", asyncio.Event().wait())
    await scheduler.stop("early")  # cancelled before its first step: its body never ran
    assert scheduler.running() == 0
    assert freed == ["early"]


# --- over a real kernel: a gated engine backend holds a transfer in its finalizing phase ------


class GatedBackend:
    """Checks files (so the kernel calls it while the transfer is finalizing) only once the
    test opens ``verified``; builds engines only once it sets ``built``."""

    name = "gated"
    aliases: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.verifying = threading.Event()
        self.verified = threading.Event()
        self.built = asyncio.Event()

    def verify_file(self, path: str, name: str) -> None:
        self.verifying.set()
        assert self.verified.wait(30)

    def verify_set(self, paths: list[str]) -> None:
        pass

    async def create(
        self, model_id: str, path: str, model_type: str, spec: EngineSpec
    ) -> EchoEngine:
        await self.built.wait()
        return EchoEngine(model_id, model_type)


class GatedPlugin:
    def __init__(self, backend: GatedBackend) -> None:
        self.backend = backend

    @hookimpl
    def register_engine_backends(self, settings: Settings) -> list[GatedBackend]:
        return [self.backend]


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[Kernel, GatedBackend]]:
    backend = GatedBackend()
    kernel = Kernel(
        make_settings(tmp_path, max_concurrent=1),
        load_entrypoints=False,
        extra_plugins=[GatedPlugin(backend)],
    )
    await kernel.start()
    try:
        yield kernel, backend
    finally:
        backend.verified.set()
        backend.built.set()
        await kernel.stop()


async def _finalizing(backend: GatedBackend) -> None:
    assert await asyncio.to_thread(backend.verifying.wait, 30), "never reached verification"


async def _until(kernel: Kernel, model_id: str, status: str) -> None:
    async with asyncio.timeout(30):
        while kernel.downloads.get(model_id).status != status:  # noqa: ASYNC110 - a poll with a deadline
            await asyncio.sleep(0.01)


async def test_pause_waits_for_a_finalizing_transfer_which_keeps_its_slot(
    gated: tuple[Kernel, GatedBackend], origin: Origin
) -> None:
    kernel, backend = gated
    data = b"f" * 200_000
    engine = EngineSpec(inference_engine="gated")
    first = await kernel.downloads.create(
        model_id="first", url=origin.add_file("first.bin", data), engine=engine
    )
    await kernel.downloads.create(model_id="next", url=origin.add_file("next.bin", b"n" * 1000))
    await _finalizing(backend)
    assert kernel.downloads.running() == 1  # the finalizing transfer still holds the slot
    assert kernel.downloads.get("next").status == "queued"

    pausing = asyncio.create_task(kernel.downloads.pause("first"))
    done, _ = await asyncio.wait({pausing}, timeout=0.3)
    assert not done  # the pause waits: verify + rename are never cancelled
    backend.verified.set()
    with pytest.raises(InvalidState):  # it finished meanwhile: nothing left to pause
        await pausing
    assert first.status == "creating_engine"
    assert Path(first.local_path).read_bytes() == data  # renamed into place, whole
    await _until(kernel, "next", "completed")  # the slot was freed, the queue moved on
    backend.built.set()
    await _until(kernel, "first", "completed")


async def test_cancel_lets_the_file_finish_then_stops_the_engine_it_handed_over_to(
    gated: tuple[Kernel, GatedBackend], origin: Origin
) -> None:
    kernel, backend = gated
    engine = EngineSpec(inference_engine="gated")
    url = origin.add_file("doomed.bin", b"d" * 100_000)
    rec = await kernel.downloads.create(model_id="doomed", url=url, engine=engine)
    await _finalizing(backend)
    cancelling = asyncio.create_task(kernel.downloads.cancel("doomed"))
    done, _ = await asyncio.wait({cancelling}, timeout=0.3)
    assert not done
    backend.verified.set()  # the transfer finishes and hands over to its engine job ...
    cancelled, previous = await cancelling
    assert (cancelled.status, previous) == ("cancelled", "downloading")  # ... which is stopped
    assert kernel.downloads.scheduler.job("doomed") is None  # no engine job left running
    assert kernel.downloads.running() == 0
    assert Path(rec.local_path).exists()  # the finished file is kept, as after any cancel

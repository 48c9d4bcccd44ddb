"""Leases with fencing on a real PostgreSQL: one winner per file, monotonic tokens, stale
holders fenced off (including a real process frozen with SIGSTOP past its lease), release and
completion, LISTEN/NOTIFY wake-ups with the polling fallback, and who still wants a file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

pytest.importorskip("psycopg", reason="psycopg is not installed (the [fleet] extra)")

from kernel.errors import LeaseLost  # noqa: E402
from kernel.types import Lease, LeaseBoard  # noqa: E402
from plugins.pg_store.leases import LeaseManager  # noqa: E402
from tests.helpers.fleet import until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def nodes(pg_dsn: str) -> AsyncIterator[Callable[..., LeaseManager]]:
    made: list[LeaseManager] = []

    async def make(node_id: str, **options: float | bool) -> LeaseManager:
        manager = LeaseManager(pg_dsn, node_id, **options)  # type: ignore[arg-type]
        await manager.start()
        made.append(manager)
        return manager

    yield make  # type: ignore[misc]
    for manager in made:
        await manager.close()



async def test_the_manager_is_the_declared_lease_board(nodes: Callable[..., object]) -> None:
    """What s3_cache relies on is kernel.types' LeaseBoard and Lease, nothing of this plugin."""
    manager = await nodes("n")  # type: ignore[misc]
    assert isinstance(manager, LeaseBoard)
    lease = await manager.claim("k")
    assert isinstance(lease, Lease)
    await lease.release()


async def test_exactly_one_of_many_claimers_wins(nodes: Callable[..., object]) -> None:
    managers = [await nodes(f"n{i}") for i in range(5)]  # type: ignore[misc]
    leases = await asyncio.gather(*(m.claim("k", size=10) for m in managers))
    won = [lease for lease in leases if lease is not None]
    assert len(won) == 1
    assert won[0].token == 1
    state = await managers[0].read("k")
    assert state is not None
    assert (state.holder, state.token, state.live, state.size) == (
        won[0].manager.node_id,
        1,
        True,
        10,
    )


async def test_a_stale_holder_is_fenced_off_after_a_takeover(
    nodes: Callable[..., object],
) -> None:
    a = await nodes("a", lease_s=0.3)  # type: ignore[misc]
    b = await nodes("b", lease_s=30)  # type: ignore[misc]
    old = await a.claim("k", info={"upload_id": "U1"})
    assert old is not None
    await old.write(done=100)
    assert await b.claim("k") is None  # still live
    await until(lambda: not old.valid)  # a stops renewing, as if frozen
    new = await b.claim("k", info={"by": "b"})
    assert new is not None
    assert (new.token, new.done, new.info) == (2, 100, {"upload_id": "U1", "by": "b"})
    await new.write(done=200)
    with pytest.raises(LeaseLost):
        await old.write(done=999)  # the stale write changes nothing
    assert old.lost.is_set()
    state = await b.read("k")
    assert state is not None
    assert (state.holder, state.token, state.done) == ("b", 2, 200)


async def test_a_heartbeat_keeps_the_lease_and_reports_progress(
    nodes: Callable[..., object],
) -> None:
    a = await nodes("a", lease_s=0.6, heartbeat_s=0.1)  # type: ignore[misc]
    b = await nodes("b")  # type: ignore[misc]
    lease = await a.claim("k")
    assert lease is not None
    done = [0]
    lease.start_heartbeat(lambda: done[0])
    try:
        for step in range(1, 8):  # well past the lease time
            done[0] = step * 10
            await asyncio.sleep(0.15)
            assert await b.claim("k") is None
        await until(lambda: lease.done == 70)
        state = await b.read("k")
        assert state is not None
        assert (state.holder, state.done, state.live) == ("a", 70, True)
    finally:
        await lease.stop_heartbeat()


async def test_a_fenced_heartbeat_tells_the_holder_to_stop(nodes: Callable[..., object]) -> None:
    a = await nodes("a", lease_s=5, heartbeat_s=0.05)  # type: ignore[misc]
    b = await nodes("b")  # type: ignore[misc]
    lease = await a.claim("k")
    assert lease is not None
    stopped = asyncio.Event()
    lease.on_lost = stopped.set
    lease.start_heartbeat()
    # b takes over as after a's lease ran out (one statement, so a's heartbeat cannot slip in)
    await b._execute(
        "UPDATE mk_leases SET holder = 'b', token = token + 1,"
        " lease_until = now() + interval '30 seconds'"
    )
    async with asyncio.timeout(20):
        await stopped.wait()
    assert not lease.valid


async def test_release_frees_the_lease_and_completion_ends_it(
    nodes: Callable[..., object],
) -> None:
    a = await nodes("a", lease_s=30)  # type: ignore[misc]
    b = await nodes("b", lease_s=30)  # type: ignore[misc]
    lease = await a.claim("k")
    assert lease is not None
    await lease.write(done=5)
    await lease.release()
    taken = await b.claim("k")  # at once, no waiting for the lease to run out
    assert taken is not None
    assert (taken.token, taken.done) == (2, 5)
    await taken.complete(size=9, info={"etag": "x"})
    assert await a.claim("k") is None
    assert await b.claim("k") is None  # not even the last holder fetches a complete file
    state = await a.read("k")
    assert state is not None
    assert (state.state, state.done, state.size, state.info["etag"]) == ("complete", 9, 9, "x")


async def test_a_restarted_node_reclaims_its_own_lease_and_fences_its_old_self(
    nodes: Callable[..., object],
) -> None:
    before = await nodes("a", lease_s=30)  # type: ignore[misc]
    after = await nodes("a", lease_s=30)  # type: ignore[misc]
    old = await before.claim("k")
    new = await after.claim("k")
    assert old is not None
    assert new is not None
    assert new.token == old.token + 1
    with pytest.raises(LeaseLost):
        await old.write(done=1)


@pytest.mark.parametrize("listen", [True, False], ids=["notify", "poll"])
async def test_waiters_learn_of_changes(nodes: Callable[..., object], listen: bool) -> None:
    holder = await nodes("a")  # type: ignore[misc]
    waiter = await nodes("b", listen=listen, poll_s=0.2)  # type: ignore[misc]
    lease = await holder.claim("k")
    assert lease is not None
    assert waiter.listening.is_set() is listen
    waiting = asyncio.create_task(waiter.wait_change("k", 30 if listen else None))
    await asyncio.sleep(0.05)
    await lease.write(done=42)
    notified = await waiting
    assert notified is listen  # polling: it returned after poll_s, without a notification
    state = await waiter.read("k")
    assert state is not None
    assert state.done == 42


async def test_the_last_node_to_stop_wanting_a_file_is_told(nodes: Callable[..., object]) -> None:
    a = await nodes("a")  # type: ignore[misc]
    b = await nodes("b")  # type: ignore[misc]
    await a.want("k", "m1")
    await b.want("k", "m2")
    await b.want("k", "m2")  # idempotent
    assert await a.unwant("k", "m1") == 1
    assert await b.unwant("k", "m2") == 0


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    import structlog
    from kernel.errors import LeaseLost
    from plugins.pg_store.leases import LeaseManager

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    async def main():
        manager = LeaseManager(sys.argv[1], "frozen", lease_s=1.0, heartbeat_s=0.1)
        await manager.start()
        lease = await manager.claim("k")
        print("CLAIMED", lease.token, flush=True)
        done = 0
        while True:
            done += 1
            try:
                await lease.write(done=done)  # every write is fenced by the token
            except LeaseLost:
                print("LOST", done, flush=True)
                return
            await asyncio.sleep(0.05)

    asyncio.run(main())
    """
)


async def test_a_holder_frozen_with_sigstop_past_its_lease_is_fenced(
    nodes: Callable[..., object], pg_dsn: str
) -> None:
    other = await nodes("other", lease_s=30)  # type: ignore[misc]
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, read in threads)
        [sys.executable, "-c", HOLDER, pg_dsn],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.split() == ["CLAIMED", "1"]
        await until_async(other, lambda s: s.done >= 3)
        proc.send_signal(signal.SIGSTOP)
        await until_async(other, lambda s: not s.live)  # the frozen holder's lease runs out
        frozen_at = (await other.read("k")).done  # type: ignore[union-attr]
        lease = await other.claim("k")
        assert lease is not None
        assert lease.token == 2
        proc.send_signal(signal.SIGCONT)
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.split()[0] == "LOST"
        state = await other.read("k")
        assert state is not None
        assert (state.holder, state.token, state.done) == ("other", 2, frozen_at)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 30) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def until_async(manager: LeaseManager, check: Callable[..., bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        state = await manager.read("k")
        if state is not None and check(state):
            return
        assert loop.time() < deadline, f"lease never reached the state: {state}"
        await asyncio.sleep(0.05)

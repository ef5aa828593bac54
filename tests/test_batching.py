"""The cross-session micro-batcher's logic, with injected batch functions (deterministic: batches
are held on events, never timed). Real-model batching is tested with each engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from services.batching import Deliver, MicroBatcher, Priority
from services.errors import InvalidArgument, ResourceExhausted, Unavailable
from tests.conftest import until

#: Long enough never to end a batch window in these tests: batches form when full or on release.
NEVER = 60.0


class Gate:
    """A batch function that records its batches and holds each one until released."""

    def __init__(self, hold: bool = True) -> None:
        self.batches: list[list[Any]] = []
        self.started = threading.Semaphore(0)
        self._release = threading.Semaphore(0)
        self.hold = hold

    def __call__(self, items: list[Any], deliver: Deliver) -> Sequence[Any]:
        self.batches.append(list(items))
        self.started.release()
        if self.hold:
            assert self._release.acquire(timeout=30), "batch never released"
        return [f"done:{x}" for x in items]

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._release.release()

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, True, 30), "no batch started"


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def batcher(gate: Gate) -> Iterator[MicroBatcher[Any, Any]]:
    b: MicroBatcher[Any, Any] = MicroBatcher(gate, max_batch=3, max_wait_s=NEVER, max_queued=8)
    yield b
    gate.hold = False
    gate.release(10)
    b.close(wait=True)


async def start_blocker(batcher: MicroBatcher[Any, Any], gate: Gate) -> asyncio.Task[Any]:
    """Fill the worker with one held batch of ``max_batch`` items (so later items queue)."""
    tasks = [asyncio.create_task(batcher.submit(f"block{i}")) for i in range(batcher.max_batch)]
    await gate.wait_started()
    return asyncio.ensure_future(asyncio.gather(*tasks))


async def test_batch_forms_when_full_and_results_go_to_their_callers(
        batcher: MicroBatcher[Any, Any], gate: Gate) -> None:
    gate.hold = False
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
    assert results == ["done:0", "done:1", "done:2"]
    assert gate.batches == [[0, 1, 2]]  # waited for the batch to fill, then ran it once
    assert batcher.stats.batches == 1 and batcher.stats.sizes[3] == 1
    assert batcher.pending == 0


async def test_items_arriving_while_busy_go_together(batcher: MicroBatcher[Any, Any], gate: Gate) -> None:
    blocker = await start_blocker(batcher, gate)
    waiting = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await until(within_s=30, check=lambda: batcher.queued == 3)
    gate.release(2)
    assert await asyncio.gather(*waiting) == ["done:0", "done:1", "done:2"]
    await blocker
    assert gate.batches[1] == [0, 1, 2]


async def test_max_wait_ends_a_batch_window() -> None:
    gate = Gate(hold=False)
    b: MicroBatcher[int, Any] = MicroBatcher(gate, max_batch=8, max_wait_s=0.0)
    try:
        assert await b.submit(7) == "done:7"  # no companions and no wait: a batch of one
        assert gate.batches == [[7]]
    finally:
        b.close(wait=True)


async def test_priorities_order_work_across_sessions(batcher: MicroBatcher[Any, Any], gate: Gate) -> None:
    """Queued while the worker is busy, in the worst arrival order: the next batches take the
    final first, then barge-in, then speculative work, then partials; FIFO within one level."""
    blocker = await start_blocker(batcher, gate)
    order = [("partial-a", Priority.PARTIAL), ("spec-a", Priority.SPECULATIVE),
             ("partial-b", Priority.PARTIAL), ("barge", Priority.BARGE_IN),
             ("spec-b", Priority.SPECULATIVE), ("final", Priority.FINAL)]
    tasks = [asyncio.create_task(batcher.submit(item, prio)) for item, prio in order]
    await until(within_s=30, check=lambda: batcher.queued == len(order))
    gate.release(3)
    await asyncio.gather(blocker, *tasks)
    assert gate.batches[1:] == [["final", "barge", "spec-a"], ["spec-b", "partial-a", "partial-b"]]


async def test_a_final_waits_less_than_partials_under_load(batcher: MicroBatcher[Any, Any], gate: Gate) -> None:
    """Partials of other sessions fill the queue first; a final arriving last still runs in the
    very next batch, and completes before every partial queued ahead of it."""
    blocker = await start_blocker(batcher, gate)
    done: list[str] = []

    async def ask(item: str, prio: Priority) -> None:
        await batcher.submit(item, prio)
        done.append(item)

    partials = [asyncio.create_task(ask(f"p{i}", Priority.PARTIAL)) for i in range(7)]
    await until(within_s=30, check=lambda: batcher.queued == 7)
    final = asyncio.create_task(ask("final", Priority.FINAL))
    await until(within_s=30, check=lambda: batcher.queued == 8)
    for _ in range(4):
        gate.release()
        await asyncio.sleep(0)
    await asyncio.gather(blocker, final, *partials)
    assert gate.batches[1][0] == "final"
    assert done.index("final") < min(done.index(f"p{i}") for i in range(2, 7))


async def test_cancelling_a_queued_request_removes_it(batcher: MicroBatcher[Any, Any], gate: Gate) -> None:
    blocker = await start_blocker(batcher, gate)
    keep = asyncio.create_task(batcher.submit("keep"))
    drop = asyncio.create_task(batcher.submit("drop"))
    await until(within_s=30, check=lambda: batcher.queued == 2)
    drop.cancel()  # e.g. the user barged in: the speculative transcript is not needed
    with pytest.raises(asyncio.CancelledError):
        await drop
    assert batcher.queued == 1 and batcher.stats.cancelled_in_queue == 1
    gate.release(2)
    assert await keep == "done:keep"
    await blocker
    assert all("drop" not in b for b in gate.batches)
    assert batcher.pending == 0


async def test_best_effort_only_with_a_free_seat(gate: Gate) -> None:
    b: MicroBatcher[Any, Any] = MicroBatcher(gate, max_batch=2, max_wait_s=NEVER)
    try:
        blocker = await start_blocker(b, gate)
        assert await b.try_submit("partial") is None  # the worker is busy: refused at once
        assert b.stats.refused_best_effort == 1 and b.queued == 0
        gate.release()
        await blocker
        await until(within_s=30, check=lambda: b.idle)  # the worker is free again
        gate.hold = False
        # idle: accepted, and it shares the next batch with a final (finals first)
        assert await asyncio.gather(b.try_submit("partial"), b.submit("final")) == [
            "done:partial", "done:final"]
        assert gate.batches[-1] == ["final", "partial"]
    finally:
        gate.hold = False
        gate.release(5)
        b.close(wait=True)


async def test_queue_bound(gate: Gate) -> None:
    b: MicroBatcher[Any, Any] = MicroBatcher(gate, max_batch=1, max_wait_s=NEVER, max_queued=2)
    try:
        blocker = await start_blocker(b, gate)
        queued = [asyncio.create_task(b.submit(i)) for i in range(2)]
        await until(within_s=30, check=lambda: b.queued == 2)
        with pytest.raises(ResourceExhausted, match="saturated"):
            await b.submit("one too many")
        gate.release(3)
        await asyncio.gather(blocker, *queued)
    finally:
        gate.hold = False
        gate.release(5)
        b.close(wait=True)


async def test_shutdown_fails_queued_work_and_lets_running_work_finish(gate: Gate) -> None:
    b: MicroBatcher[Any, Any] = MicroBatcher(gate, max_batch=2, max_wait_s=NEVER)
    blocker = await start_blocker(b, gate)
    queued = asyncio.create_task(b.submit("queued"))
    await until(within_s=30, check=lambda: b.queued == 1)
    b.close()
    with pytest.raises(Unavailable, match="closed"):
        await queued
    with pytest.raises(Unavailable, match="closed"):
        await b.submit("late")
    with pytest.raises(Unavailable):
        b.run_sync("late")
    gate.release()
    assert await blocker == ["done:block0", "done:block1"]  # the running batch completed
    b.close(wait=True)
    assert not any(t.is_alive() for t in b._threads)


async def test_errors_reach_every_caller_and_the_worker_survives() -> None:
    calls = []

    def fn(items: list[int], deliver: Deliver) -> list[int]:
        calls.append(items)
        if 0 in items:
            raise ValueError("boom")
        return [x * 10 for x in items]

    b: MicroBatcher[int, int] = MicroBatcher(fn, max_batch=2, max_wait_s=NEVER)
    try:
        results = await asyncio.gather(b.submit(0), b.submit(1), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert await asyncio.gather(b.submit(2), b.submit(3)) == [20, 30]
    finally:
        b.close(wait=True)


async def test_early_delivery() -> None:
    """A batch function can hand one item its result before the rest of the batch is done (a
    short utterance whose decoding ended)."""
    later = threading.Event()

    def fn(items: list[str], deliver: Deliver) -> list[str]:
        deliver(0, "early")
        assert later.wait(30)
        return ["ignored", "late"]

    b: MicroBatcher[str, str] = MicroBatcher(fn, max_batch=2, max_wait_s=NEVER)
    try:
        first = asyncio.create_task(b.submit("a"))
        second = asyncio.create_task(b.submit("b"))
        assert await first == "early"
        assert not second.done()
        later.set()
        assert await second == "late"
    finally:
        later.set()
        b.close(wait=True)


def test_callers_from_threads_and_other_event_loops() -> None:
    """Not tied to one event loop: blocking callers in threads and a fresh loop share it."""
    gate = Gate(hold=False)
    b: MicroBatcher[int, Any] = MicroBatcher(gate, max_batch=4, max_wait_s=0.0)
    try:
        out: list[Any] = []
        threads = [threading.Thread(target=lambda i=i: out.append(b.run_sync(i))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(out) == ["done:0", "done:1", "done:2"]
        assert asyncio.run(b.submit(5)) == "done:5"
    finally:
        b.close(wait=True)


def test_priority_parse() -> None:
    assert Priority.parse(None) is Priority.FINAL
    assert Priority.parse("speculative") is Priority.SPECULATIVE
    assert Priority.parse("barge-in") is Priority.BARGE_IN
    assert Priority.parse(3) is Priority.PARTIAL
    assert Priority.parse(Priority.FINAL) is Priority.FINAL
    assert Priority.FINAL < Priority.BARGE_IN < Priority.SPECULATIVE < Priority.PARTIAL
    with pytest.raises(InvalidArgument, match="final, barge_in, speculative, partial"):
        Priority.parse("urgent")
    with pytest.raises(InvalidArgument):
        Priority.parse(9)
    with pytest.raises(InvalidArgument):
        MicroBatcher(lambda items, d: items, max_batch=0)

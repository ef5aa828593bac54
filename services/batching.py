"""Cross-session micro-batching for the listening engines (ASR, VAD, end of turn).

Sessions ask an engine for one thing at a time (one utterance, one 32 ms window); a model run
costs much less per item when items of many sessions share it. ``MicroBatcher`` collects what
arrives within a short wait (a few ms) into one call of a batch function, up to ``max_batch``
items, and hands each caller its own result.

Work is ordered by ``Priority``: a final transcript that someone is waiting for goes before
speculative work and partials of other sessions, whatever the arrival order. Lower priorities can
wait behind a steady stream of finals; callers bound them with their own deadlines.

The scheduler is a small thread pool, not an asyncio task: the batch function (CPU work) never
runs on an event loop, one batcher serves callers from any thread or event loop (a Ray replica's,
a test's, a script's blocking call), and nothing is tied to the loop that happened to start it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

from services.errors import InvalidArgument, ResourceExhausted, Unavailable

T = TypeVar("T")
R = TypeVar("R")


class Priority(IntEnum):
    """Order of work in an engine's queue: lower values go first; FIFO within one value."""

    FINAL = 0
    """A finished utterance whose transcript a turn waits for (the default)."""
    BARGE_IN = 1
    """Speech over the assistant's answer: decides whether to stop talking."""
    SPECULATIVE = 2
    """Work that may be thrown away: the transcript of a pause that may not end the turn."""
    PARTIAL = 3
    """Live partial text of a growing utterance: pure best effort."""

    @classmethod
    def parse(cls, value: Priority | int | str | None) -> Priority:
        """A priority from its value or name ('final', 'barge_in', 'speculative', 'partial');
        None = FINAL. Raises InvalidArgument for anything else."""
        if value is None:
            return cls.FINAL
        if isinstance(value, str):
            try:
                return cls[value.strip().upper().replace("-", "_")]
            except KeyError:
                pass
        elif isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                pass
        names = ", ".join(p.name.lower() for p in cls)
        raise InvalidArgument(f"unknown priority {value!r}; use one of: {names}")


#: What a batch function gets besides its items: call it to hand item ``i`` its result before the
#: whole batch is done (e.g. a short utterance whose decoding ended early).
Deliver = Callable[[int, Any], None]
#: ``fn(items, deliver) -> results``: one result per item, in order (items already delivered may
#: hold anything). An exception fails every item not yet delivered.
BatchFn = Callable[[list[T], Deliver], Sequence[R]]


@dataclass(order=True)
class _Entry:
    priority: int
    seq: int
    item: Any = field(compare=False)
    future: Future[Any] = field(compare=False)
    enqueued: float = field(compare=False)
    queued: bool = field(default=True, compare=False)


@dataclass
class BatchStats:
    """What a batcher has done since it started (for benchmarks, metrics and tests)."""

    batches: int = 0
    items: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    """How many batches had each size."""
    refused_best_effort: int = 0
    cancelled_in_queue: int = 0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """Gathers items of many callers into batches for ``fn``, run in ``workers`` threads.

    An idle worker woken by new work waits up to ``max_wait_s`` (counted from the oldest queued
    item) for the batch to fill to ``max_batch``, then takes the most urgent items. Items that
    arrive while every worker is busy gather in the queue and go together in the next batch,
    without further wait.
    A caller that is cancelled while its item waits removes it from the queue; an item already
    in a running batch runs to the end (its result is dropped).
    """

    def __init__(self, fn: BatchFn[T, R], *, max_batch: int = 8, max_wait_s: float = 0.005,
                 max_queued: int = 64, workers: int = 1, name: str = "batch") -> None:
        if max_batch < 1 or workers < 1 or max_queued < 0 or max_wait_s < 0:
            raise InvalidArgument("a batcher needs max_batch >= 1, workers >= 1, max_queued >= 0 "
                                  "and max_wait_s >= 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.workers = workers
        self.name = name
        self.stats = BatchStats()
        self._heap: list[_Entry] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._running = 0  # items in running batches
        self._busy = 0  # workers running a batch
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- state -----------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return len(self._heap)

    @property
    def pending(self) -> int:
        """Items waiting or running."""
        with self._cond:
            return len(self._heap) + self._running

    @property
    def idle(self) -> bool:
        """Nothing queued and no worker busy."""
        with self._cond:
            return not self._heap and not self._busy

    @property
    def closed(self) -> bool:
        return self._closed

    # --- submitting ------------------------------------------------------------------------------

    def submit_nowait(self, item: T, priority: Priority | int = Priority.FINAL,
                      best_effort: bool = False) -> Future[R] | None:
        """Queue ``item``; its future completes with the result.

        ``best_effort``: None at once, instead of queueing, unless a worker is free and the next
        batch has a seat (so it never makes anything else wait longer than one batch). Raises
        ResourceExhausted when ``max_queued`` items already wait, Unavailable once closed.
        """
        fut: Future[R] = Future()
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name} is closed")
            if best_effort and (self._busy >= self.workers or len(self._heap) >= self.max_batch):
                self.stats.refused_best_effort += 1
                return None
            if len(self._heap) >= self.max_queued:
                raise ResourceExhausted(
                    f"{self.name} is saturated ({len(self._heap)} queued, {self._running} running); "
                    "retry shortly")
            entry = _Entry(int(priority), next(self._seq), item, fut, time.monotonic())
            heapq.heappush(self._heap, entry)
            self._cond.notify()
        fut.add_done_callback(lambda f, e=entry: self._forget_if_cancelled(f, e))  # type: ignore[misc]
        return fut

    async def submit(self, item: T, priority: Priority | int = Priority.FINAL) -> R:
        """Queue ``item`` and wait for its result (cancelling the caller dequeues it)."""
        fut = self.submit_nowait(item, priority)
        assert fut is not None
        return await asyncio.wrap_future(fut)

    async def try_submit(self, item: T, priority: Priority | int = Priority.PARTIAL) -> R | None:
        """Best effort: the result, or None at once when the engine has no spare seat."""
        fut = self.submit_nowait(item, priority, best_effort=True)
        if fut is None:
            return None
        return await asyncio.wrap_future(fut)

    def run_sync(self, item: T, priority: Priority | int = Priority.FINAL) -> R:
        """Queue ``item`` and block this thread until its result (not from a worker thread)."""
        fut = self.submit_nowait(item, priority)
        assert fut is not None
        return fut.result()

    def _forget_if_cancelled(self, fut: Future[Any], entry: _Entry) -> None:
        if not fut.cancelled():
            return
        with self._cond:
            if entry.queued:  # still waiting: take it out now so it holds no queue seat
                entry.queued = False
                self._heap.remove(entry)
                heapq.heapify(self._heap)
                self.stats.cancelled_in_queue += 1

    # --- workers ---------------------------------------------------------------------------------

    def _take_batch(self) -> list[_Entry] | None:
        """Wait for work and the batch window; the most urgent entries (None once closed)."""
        with self._cond:
            while True:
                idle = not self._heap
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                # only a worker that sat idle waits for companions: work that queued while it
                # was busy has waited long enough
                deadline = min(e.enqueued for e in self._heap) + self.max_wait_s if idle else 0.0
                while self._heap and len(self._heap) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return None
                batch: list[_Entry] = []
                while self._heap and len(batch) < self.max_batch:
                    entry = heapq.heappop(self._heap)
                    entry.queued = False
                    # False: the caller cancelled it after the last look (never runs)
                    if entry.future.set_running_or_notify_cancel():
                        batch.append(entry)
                if batch:
                    self._busy += 1
                    self._running += len(batch)
                    self.stats.batches += 1
                    self.stats.items += len(batch)
                    self.stats.sizes[len(batch)] += 1
                    return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            delivered = [False] * len(batch)
            left = [len(batch)]

            def finish(i: int, result: Any = None, error: BaseException | None = None,
                       batch: list[_Entry] = batch, delivered: list[bool] = delivered,
                       left: list[int] = left) -> None:
                if delivered[i]:
                    return
                delivered[i] = True
                with self._cond:  # counted out before its caller hears back
                    self._running -= 1
                    left[0] -= 1
                    if not left[0]:  # the last one: the worker is free for whatever it asks next
                        self._busy -= 1
                        self._cond.notify_all()
                if error is None:
                    batch[i].future.set_result(result)
                else:
                    batch[i].future.set_exception(error)

            try:
                results = self.fn([e.item for e in batch], finish)
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: batch function returned {len(results)} "
                                       f"results for {len(batch)} items")
                for i, r in enumerate(results):
                    finish(i, r)
            except BaseException as exc:  # every caller gets the error, the worker lives on
                for i in range(len(batch)):
                    finish(i, error=exc)

    # --- shutdown --------------------------------------------------------------------------------

    def close(self, wait: bool = False, timeout: float | None = 10.0) -> None:
        """Refuse new items, fail the queued ones with Unavailable; running batches finish.
        ``wait``: also wait (up to ``timeout``) for the workers to stop."""
        with self._cond:
            self._closed = True
            dropped, self._heap = self._heap, []
            for e in dropped:
                e.queued = False
            self._cond.notify_all()
        for e in dropped:  # outside the lock: done-callbacks take it
            if e.future.set_running_or_notify_cancel():
                e.future.set_exception(Unavailable(f"{self.name} closed before this item ran"))
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(timeout)

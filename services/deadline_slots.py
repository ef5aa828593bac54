"""Slots for work that runs in threads, handed out earliest deadline first (or in arrival order).

A voice answer's audio must reach the caller before the caller's playout buffer runs dry. When
more syntheses wait than the CPU can run at once, the one whose caller runs dry soonest should
go next, not the one that asked first: a caller with seconds of audio in hand can wait, a
speculative answer (not yet confirmed) can wait longer. ``DeadlineSlots`` is a counting
semaphore whose waiters are ordered by a deadline (a ``time.monotonic()`` value) instead of by
arrival; ``order="fifo"`` keeps arrival order, for comparison.

Threads acquire and release (the ONNX runs of ``services.tts`` run in threads); a waiter polls a
stop flag so a cancelled synthesis never takes a slot.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from typing import Literal

#: Deadline of work nobody waits for: after any work with a finite deadline.
NO_DEADLINE = math.inf


class DeadlineSlots:
    """``slots`` concurrent holders; a free slot goes to the waiter with the earliest deadline."""

    def __init__(self, slots: int, order: Literal["deadline", "fifo"] = "deadline") -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.order = order
        self._free = slots
        self._cond = threading.Condition()
        self._waiting: list[tuple[float, int]] = []  # heap of (key, ticket)
        self._tickets = itertools.count()
        self.granted = 0  # slots handed out so far (tests and stats)

    @property
    def waiting(self) -> int:
        """Threads waiting for a slot now."""
        with self._cond:
            return len(self._waiting)

    def acquire(self, deadline: float = NO_DEADLINE, stop: threading.Event | None = None,
                poll_s: float = 0.05) -> bool:
        """Wait for a slot; False (no slot taken) once ``stop`` is set. Ties and the fifo order
        go by arrival."""
        ticket = next(self._tickets)
        key = float(ticket) if self.order == "fifo" else deadline
        entry = (key, ticket)
        with self._cond:
            heapq.heappush(self._waiting, entry)
            try:
                while not (self._free > 0 and self._waiting[0] == entry):
                    if stop is not None and stop.is_set():
                        return False
                    self._cond.wait(poll_s)
                heapq.heappop(self._waiting)
                self._free -= 1
                self.granted += 1
                return True
            finally:
                if entry in self._waiting:  # stopped while waiting: leave the queue
                    self._waiting.remove(entry)
                    heapq.heapify(self._waiting)
                # the next waiter may now be first in line (or a slot may still be free)
                self._cond.notify_all()

    def wake(self) -> None:
        """Make waiters look at their stop flags now (call after setting one)."""
        with self._cond:
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if self._free >= self.slots:
                raise ValueError("DeadlineSlots released more often than acquired")
            self._free += 1
            self._cond.notify_all()


def deadline_in(slack_s: float | None, now: float | None = None) -> float:
    """The monotonic deadline ``slack_s`` seconds from now (None or inf: no deadline). A caller
    sends slack, not a deadline: clocks of two processes, or two hosts, are not comparable."""
    if slack_s is None or not math.isfinite(slack_s):
        return NO_DEADLINE
    return (time.monotonic() if now is None else now) + float(slack_s)

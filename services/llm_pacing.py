"""Which answer may run ahead: one with seconds of speech in hand yields the CPU to one behind.

An answer is spoken far slower than a CPU LLM writes it (~15 characters a second against 20-45
tokens a second), so the tail of a long answer is written seconds before anyone hears it. Under
load those seconds are taken from other sessions: their first words, or the next clause of an
answer that is about to run dry. The pacer measures each generation's *lead*: the speech its
delivered text holds, minus the time since its first text (playback cannot start sooner, so the
lead is never overstated). A generation whose lead is over ``yield_lead_s`` waits between
tokens while another one's lead is under ``urgent_lead_s`` (a generation with no text yet is the
most urgent of all: its caller waits for a first word). A waiting generation still has over
``yield_lead_s`` of speech in hand, so it never runs dry for having waited; it goes on as soon as
its lead falls to the mark, nobody is behind any more, or it is stopped.

The engine calls ``wait`` from the thread that runs a generation, between two tokens; pausing
holds that generation's worker, so nobody waits while another request is queued for a worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: How often a waiting generation looks again (and at its stop flag).
POLL_S = 0.02


@dataclass
class Lead:
    """How far one generation's text is ahead of its playback."""

    started: float | None = None  # monotonic time of its first delivered text
    chars: int = 0  # characters delivered so far
    yielded_s: float = 0.0  # time it waited for others

    def seconds(self, now: float, chars_per_s: float) -> float:
        """Speech seconds delivered but not yet heard (0 before the first text)."""
        if self.started is None:
            return 0.0
        return self.chars / chars_per_s - (now - self.started)


class Pacer:
    """Leads of the generations in flight, and the rule that makes one wait for another."""

    def __init__(self, yield_lead_s: float, urgent_lead_s: float, chars_per_s: float, workers: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.yield_lead_s = yield_lead_s  # 0 turns pacing off
        self.urgent_lead_s = urgent_lead_s
        self.chars_per_s = chars_per_s
        self.workers = workers
        self._clock = clock
        self._leads: dict[str, Lead] = {}
        self._lock = threading.Lock()
        self.yields = 0  # generations that waited at least once (operators: stats())
        self.yielded_s = 0.0  # their waiting, summed

    def add(self, request_id: str) -> Lead:
        with self._lock:
            lead = self._leads[request_id] = Lead()
        return lead

    def remove(self, request_id: str) -> None:
        with self._lock:
            lead = self._leads.pop(request_id, None)
            if lead is not None and lead.yielded_s > 0:
                self.yields += 1
                self.yielded_s += lead.yielded_s

    def delivered(self, request_id: str, chars: int) -> None:
        """The generation's text so far is ``chars`` long (called as its deltas go out)."""
        lead = self._leads.get(request_id)
        if lead is not None and chars > 0:
            if lead.started is None:
                lead.started = self._clock()
            lead.chars = chars

    def should_wait(self, request_id: str) -> bool:
        """Whether this generation is far ahead while another is behind and none is queued."""
        if self.yield_lead_s <= 0:
            return False
        now = self._clock()
        with self._lock:
            if len(self._leads) > self.workers:  # a request waits for a worker: a pause would hold one
                return False
            mine = self._leads.get(request_id)
            if mine is None or mine.seconds(now, self.chars_per_s) <= self.yield_lead_s:
                return False
            return any(rid != request_id and lead.seconds(now, self.chars_per_s) < self.urgent_lead_s
                       for rid, lead in self._leads.items())

    def wait(self, request_id: str, stop: threading.Event) -> None:
        """Block the calling generation thread while it should wait; returns at once on ``stop``."""
        t0: float | None = None
        while not stop.is_set() and self.should_wait(request_id):
            t0 = self._clock() if t0 is None else t0
            stop.wait(POLL_S)
        if t0 is not None:
            lead = self._leads.get(request_id)
            if lead is not None:
                lead.yielded_s += self._clock() - t0

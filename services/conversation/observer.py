"""Where a conversation reports what no client event shows (metrics)."""

from __future__ import annotations

from typing import Protocol

from services.conversation import events as ev


class Observer(Protocol):
    """Where a conversation reports what no client event shows (metrics)."""

    def speculation(self, outcome: str) -> None:
        """started | used | discarded"""

    def interruption(self, outcome: str) -> None:
        """paused | interrupted | resumed_noise | resumed_backchannel"""

    def turn_ended(self, state: str, reason: str) -> None:
        """committed | interrupted | discarded, and why"""

    def answered(self, latency: ev.TurnLatency) -> None:
        """An answer was sent whole (its latency breakdown is final)."""

    def played(self, underruns: int, underrun_ms: float) -> None:
        """An answer with audio ended (played out, interrupted or closed): the stalls inside it, the
        larger of the server's estimate and the client's reports."""

    def tool_call(self, outcome: str, seconds: float | None = None) -> None:
        """made | result (``seconds`` from the call) | result_after_cancel | cancelled | timed_out |
        filler | invalid | result_to_audio (``seconds`` from the last result to the answer's audio)"""


class NullObserver:
    def speculation(self, outcome: str) -> None:
        pass

    def interruption(self, outcome: str) -> None:
        pass

    def turn_ended(self, state: str, reason: str) -> None:
        pass

    def answered(self, latency: ev.TurnLatency) -> None:
        pass

    def played(self, underruns: int, underrun_ms: float) -> None:
        pass

    def tool_call(self, outcome: str, seconds: float | None = None) -> None:
        pass

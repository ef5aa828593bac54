"""How far behind real time a client's audio reaches the conversation.

A live microphone sends audio as fast as it is spoken. When its messages arrive slower than that
(a busy proxy relaying each one, a congested network, a gateway behind on its own work), a
backlog builds before the conversation hears anything, and every answer comes that much later:
the server's own stage timings cannot show it, since they start when the audio arrives.

The backlog is a queue: each message adds the time since the one before it and takes away the
audio it carries (``lag = max(0, lag + gap - audio)``). Messages that arrive as fast as the audio
plays keep it near zero; a catching-up burst drains it. A gap longer than ``pause_s`` is the
client not sending (push-to-talk, typed turns, a mute), not a backlog: it starts again from zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class InputLag:
    """Backlog (seconds) of one real-time audio input; ``push`` each message's audio as it arrives."""

    def __init__(self, *, pause_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause_s = pause_s
        self.clock = clock
        self.lag_s = 0.0
        self._last: float | None = None

    def push(self, audio_s: float) -> None:
        now = self.clock()
        if self._last is not None:
            gap = now - self._last
            # a pause: the client was not sending, and whatever queued before it has drained
            self.lag_s = max(0.0, self.lag_s + gap - audio_s) if gap <= self.pause_s else 0.0
        self._last = now

    def current(self) -> float:
        """The backlog now: none once the client has paused (a muted caller's last value is stale)."""
        if self._last is not None and self.clock() - self._last > self.pause_s:
            return 0.0
        return self.lag_s

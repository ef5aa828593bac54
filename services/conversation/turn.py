"""One response from its start to exactly one end, and the only writer of the chat history.

A ``Turn`` owns one answer: the producer task that runs the pipeline (ASR -> LLM -> TTS), the
held queue that output waits in while the answer is speculative or paused, the forwarder task
that moves it to the conversation's outbox, the playback clock that says what the user heard, and
the history entry. Its states and the only transitions allowed between them:

    PENDING  --release-->  ACTIVE  --all sent-->  SENT  --played-->  COMMITTED
       |                    |  ^                   |  ^
       |                  pause resume           pause resume
       |                    v  |                   v  |
       |                   PAUSED (output held, generation goes on)
       +--discard--> DISCARDED   (any live state) --interrupt--> INTERRUPTED | DISCARDED

End states and what they write: COMMITTED = user words + the whole answer; INTERRUPTED = user
words + the words the user heard; DISCARDED = nothing (a speculation, noise, or an answer of
which nothing was heard: its user words are handed back so the next turn carries them).
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.conversation import events as ev
from services.conversation.aio import cancel_and_wait
from services.conversation.history import ChatHistory, ToolCallRecord
from services.conversation.outbox import Outbox
from services.errors import FailedPrecondition

#: The user's words in the history when speech was answered but its transcript failed (speech-native).
UNTRANSCRIBED = "(speech that could not be transcribed)"


class TurnState(enum.Enum):
    PENDING = "pending"  # speculative: running, output held
    ACTIVE = "active"  # output flows to the client
    PAUSED = "paused"  # user speech over the answer: output held, generation goes on
    SENT = "sent"  # everything sent; the client may still be playing it
    COMMITTED = "committed"
    INTERRUPTED = "interrupted"
    DISCARDED = "discarded"


ENDS = frozenset({TurnState.COMMITTED, TurnState.INTERRUPTED, TurnState.DISCARDED})
TRANSITIONS: dict[TurnState, frozenset[TurnState]] = {
    TurnState.PENDING: frozenset({TurnState.ACTIVE, TurnState.DISCARDED}),
    TurnState.ACTIVE: frozenset({TurnState.PAUSED, TurnState.SENT, TurnState.INTERRUPTED, TurnState.DISCARDED}),
    TurnState.PAUSED: frozenset({TurnState.ACTIVE, TurnState.SENT, TurnState.INTERRUPTED, TurnState.DISCARDED}),
    TurnState.SENT: frozenset({TurnState.PAUSED, TurnState.COMMITTED, TurnState.INTERRUPTED,
                               TurnState.DISCARDED}),
    TurnState.COMMITTED: frozenset(),
    TurnState.INTERRUPTED: frozenset(),
    TurnState.DISCARDED: frozenset(),
}


@dataclass
class UserInput:
    """What the user said for one turn: an utterance (16 kHz) and/or text (typed, or transcribed)."""

    input_id: int
    audio: np.ndarray | None
    text: str | None
    t_end: float  # wall time the turn was declared over (or the text arrived)
    t_user_stop: float  # wall time the user's last speech sample arrived
    carried: str = ""  # words of earlier turns nothing was answered to, said before these
    after_tools: bool = False  # no new words: the model goes on after its tools' results came

    @property
    def utterance_ms(self) -> int:
        return 0 if self.audio is None else int(1000 * self.audio.size / 16000)

    def full_text(self) -> str:
        return " ".join(t for t in (self.carried, self.text or "") if t.strip()).strip()


class PlaybackClock:
    """What the user has heard of one answer, and how much is still in the caller's playout buffer.

    Playback starts at the first chunk sent and runs in real time, minus the time it was paused
    and the time the buffer was dry: when a chunk is sent after everything earlier has been
    played, the caller heard a gap (an underrun) and playback resumes from there. A client report
    (``PlaybackPosition``, ``conversation.item.truncate``) re-anchors the estimate. In
    ``reported`` mode only reports count as heard; the buffer is estimated either way.
    """

    def __init__(self, mode: Literal["estimate", "reported", "none"],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.clock = clock
        self.sent_ms = 0.0
        self.first_wall: float | None = None
        self.underruns = 0  # chunks sent after the buffer had run dry
        self.underrun_ms = 0.0  # total estimated silence inside the answer
        self.min_buffer_ms: float | None = None  # least audio in hand when a later chunk was sent
        self._chunks = 0  # text chunks whose audio started going out
        self.heard_underruns = 0  # stalls the client's player reported (PlaybackPosition)
        self.heard_underrun_ms = 0.0  # silence the client's player reported
        self._pauses: list[list[float]] = []  # [start, end]; end is inf while paused
        self._report: tuple[float, float] | None = None  # (played ms, wall time of the report)
        self._anchor: tuple[float, float] | None = None  # (position ms, wall) playback runs from
        self._anchor_stall_ms = 0.0  # dry time since the anchor

    def on_sent(self, ms: float, chunk_start: bool = True) -> None:
        """``ms`` of audio went out; ``chunk_start``: it begins a text chunk's audio. The least
        buffer counts from the second chunk on: the first chunk's pieces go out back to back, and
        the second of them always finds one piece in hand."""
        now = self.clock()
        self._chunks += chunk_start
        if self.first_wall is None:
            self.first_wall = now
            self._anchor = (0.0, now)
            self._anchor_stall_ms = 0.0
        elif not self.paused and self.mode != "none":  # a client that plays nothing never runs dry
            ahead = self.sent_ms - self._position(now)
            if ahead < 0:  # the buffer ran dry before this chunk: an audible gap
                self._anchor_stall_ms += -ahead
                self.underrun_ms += -ahead
                self.underruns += 1
            ahead = max(0.0, ahead)
            if self._chunks >= 2:
                self.min_buffer_ms = ahead if self.min_buffer_ms is None else min(self.min_buffer_ms, ahead)
        self.sent_ms += ms

    def report(self, played_ms: float, underruns: int = 0, underrun_ms: float = 0.0) -> None:
        """The client played ``played_ms`` so far; ``underruns``/``underrun_ms``: the stalls its
        player heard (0 when it does not say). Audio late in transit stalls the caller while the
        server's estimate, which re-anchors on each report, never sees the buffer dry."""
        now = self.clock()
        self._report = (float(played_ms), now)
        self._anchor = (min(float(played_ms), self.sent_ms), now)
        self._anchor_stall_ms = 0.0
        if self.first_wall is None:
            return  # nothing was sent: nothing could stall
        # no more silence than time since the first audio (a client's word counts, within reason)
        heard = min(float(underrun_ms), 1000 * (now - self.first_wall))
        self.heard_underruns = max(self.heard_underruns, max(1, int(underruns)) if heard > 0 else 0)
        self.heard_underrun_ms = max(self.heard_underrun_ms, heard)

    def stalls(self) -> tuple[int, float]:
        """(stalls, ms of silence) inside the answer: the larger of the server's estimate and the
        client's reports."""
        return max(self.underruns, self.heard_underruns), max(self.underrun_ms, self.heard_underrun_ms)

    @property
    def paused(self) -> bool:
        return bool(self._pauses) and self._pauses[-1][1] == math.inf

    def pause(self) -> None:
        if not self.paused:
            self._pauses.append([self.clock(), math.inf])

    def resume(self) -> None:
        if self.paused:
            self._pauses[-1][1] = self.clock()

    def _playing_s(self, since: float, now: float) -> float:
        """Seconds between ``since`` and ``now`` during which playback was not paused."""
        paused = sum(max(0.0, min(end, now) - max(start, since)) for start, end in self._pauses)
        return max(0.0, now - since - paused)

    def _position(self, now: float) -> float:
        """Estimated playback position (ms), not capped by what was sent."""
        if self._anchor is None:
            return 0.0
        at_ms, at = self._anchor
        return at_ms + 1000 * self._playing_s(at, now) - self._anchor_stall_ms

    def played_ms(self) -> float:
        if self.mode == "none":
            return self.sent_ms
        if self.mode == "reported":
            return 0.0 if self._report is None else min(self._report[0], self.sent_ms)
        return min(self.sent_ms, self._position(self.clock()))

    def buffer_ms(self) -> float:
        """Audio sent but not yet played (estimated): what the caller has in hand."""
        return max(0.0, 1000 * self.slack_s(self.sent_ms))

    def slack_s(self, produced_ms: float) -> float:
        """Seconds until the caller runs out of audio, counting ``produced_ms`` of this answer
        made so far (sent or on its way); negative once the buffer has run dry (the caller has
        heard silence that long). While paused the position stands still: the buffer left."""
        return (produced_ms - self._position(self.clock())) / 1000


def heard_text(segments: list[tuple[str, float, float]], played_ms: float) -> str:
    """Words of the answer the user heard, if audio was played up to ``played_ms``.

    A segment heard in part contributes the share of its words played so far (speech rate is
    near constant within a clause: the best estimate without word timestamps).
    """
    words: list[str] = []
    for text, start, end in segments:
        seg_words = text.split()
        if played_ms >= end:
            words += seg_words
        elif played_ms > start and end > start:
            words += seg_words[: math.floor(len(seg_words) * (played_ms - start) / (end - start))]
            break
        else:
            break
    return " ".join(words)


@dataclass
class TurnEnd:
    """How a turn ended: what the conversation needs to know next."""

    state: TurnState
    carry: UserInput | None = None  # discarded with user words: the next turn says them first


class Turn:
    """One response: see the module docstring for states, transitions and history rules."""

    def __init__(self, response_id: int, user: UserInput, *, speculative: bool, history: ChatHistory,
                 outbox: Outbox, stamp: Callable[[ev.Event], ev.Event], playback: PlaybackClock,
                 held_limit: int, on_sent: Callable[[Turn], None] | None = None,
                 on_call: Callable[[Turn, ToolCallRecord], None] | None = None, filler: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.response_id = response_id
        self.user = user
        self.speculative = speculative
        self.state = TurnState.PENDING if speculative else TurnState.ACTIVE
        self.history = history
        self.playback = playback
        self.latency = ev.TurnLatency(speculative=speculative)
        self.generated = ""
        self.audio_ms = 0.0  # answer audio produced so far
        self.segments: list[tuple[str, float, float]] = []  # text, start ms, end ms of the audio
        self.transcript: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.interrupt_reason = ""
        self.filler = filler  # a fixed phrase said while a tool runs (not an answer of the model), or ''
        self.calls: list[ToolCallRecord] = []  # tool calls sent to the client (made)
        self.tool_outputs: dict[str, str] = {}  # their results known before this turn ended
        self._on_call = on_call
        self._outbox = outbox
        self._stamp = stamp  # sets the event's timestamps before it is queued
        self._clock = clock
        self._held: deque[ev.Event] = deque()
        self._held_limit = held_limit
        self._changed = asyncio.Event()  # set() wakes every waiter; see _wait_for
        self._on_sent = on_sent
        self._resume_to = TurnState.ACTIVE
        if not speculative:
            self._measure_end_of_turn()
        self._producer: asyncio.Task[None] | None = None
        self._forwarder: asyncio.Task[None] | None = None
        self._produced_all = False
        self._announced = False

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, producer: asyncio.Task[None]) -> None:
        self._producer = producer
        producer.add_done_callback(self._producer_done)
        self._forwarder = asyncio.get_running_loop().create_task(
            self._forward(), name=f"turn-{self.response_id}-forward")

    @property
    def ended(self) -> bool:
        return self.state in ENDS

    @property
    def live(self) -> bool:
        """Output owned by this turn may still reach or be playing at the client."""
        return self.state in (TurnState.ACTIVE, TurnState.PAUSED, TurnState.SENT)

    def _to(self, new: TurnState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise FailedPrecondition(f"turn {self.response_id}: no transition {self.state.value} -> {new.value}")
        self.state = new

    def release(self) -> None:
        """PENDING -> ACTIVE: the turn was confirmed; held output starts flowing."""
        self._to(TurnState.ACTIVE)
        self.user.t_end = self._clock()
        for event in self._held:  # made before the turn had its input id
            if isinstance(event, ev.FinalTranscript | ev.ResponseStarted):
                event.input_id = self.user.input_id
        self._measure_end_of_turn()
        self._notify()

    def _measure_end_of_turn(self) -> None:
        if self.user.audio is not None:
            self.latency.vad_end_delay_ms = max(0.0, 1000 * (self.user.t_end - self.user.t_user_stop))

    def pause(self) -> float:
        """Hold output (user speech over the answer); returns what was played so far, in ms."""
        self._resume_to = self.state
        self._to(TurnState.PAUSED)
        self.playback.pause()
        self._notify()
        return self.playback.played_ms()

    def resume(self) -> None:
        self.playback.resume()
        self._to(self._resume_to)
        if self.state is TurnState.SENT and not self._announced:
            self._announce_sent()
        self._notify()

    def _notify(self) -> None:
        # set() resolves every current waiter; clearing at once re-arms the event for the next wait
        self._changed.set()
        self._changed.clear()

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def audio_slack_s(self, turn_end_s: float) -> float:
        """Seconds until the caller runs out of this answer's audio: the deadline its next TTS
        chunk is scheduled by. Negative before the first audio (the caller has waited that long
        since the turn ended); for a speculation, the time until the turn can end at the
        earliest (``turn_end_s`` after the user's speech stopped; never negative: nobody waits
        yet); while paused, the audio left at the pause plus ``turn_end_s`` (it plays again
        once the speech over it is judged; finite, so its queued chunks are not last forever)."""
        if self.state is TurnState.PENDING:
            return max(0.0, self.user.t_user_stop + turn_end_s - self._clock())
        if self.state is TurnState.PAUSED:
            return self.playback.slack_s(self.audio_ms) + turn_end_s
        if self.playback.first_wall is None:
            return -(self._clock() - self.user.t_end)
        return self.playback.slack_s(self.audio_ms)

    def playback_done(self) -> bool:
        """Everything was sent and (by report or estimate) played."""
        return self.state is TurnState.SENT and self.playback.played_ms() >= self.playback.sent_ms - 1

    # --- producer side -------------------------------------------------------------------------

    async def put(self, event: ev.Event) -> None:
        """Queue output of this turn (waits while the held queue is full)."""
        await self._wait_for(lambda: len(self._held) < self._held_limit or self.ended)
        if self.ended:
            raise asyncio.CancelledError
        self._held.append(event)
        self._notify()

    def _producer_done(self, task: asyncio.Task[None]) -> None:
        self._produced_all = True
        self._notify()

    # --- forwarder -----------------------------------------------------------------------------

    def _flowing(self) -> bool:
        return self.state in (TurnState.ACTIVE, TurnState.SENT)

    async def _forward(self) -> None:
        while True:
            await self._wait_for(
                lambda: (self._flowing() and bool(self._held)) or (self._produced_all and not self._held))
            if not self._held:
                break
            event = self._held.popleft()
            self._notify()
            if isinstance(event, ev.AudioOut):
                self._on_audio_sent(event)
            elif isinstance(event, ev.ToolCallDone) and not event.error:
                record = ToolCallRecord(event.call_id, event.name, event.arguments)
                self.calls.append(record)  # made: the client may run it from now on
                if self._on_call is not None:
                    self._on_call(self, record)
            elif isinstance(event, ev.ResponseDone):
                self.latency.total_ms = 1000 * (self._clock() - self.user.t_end)
                pb = self.playback  # every audio piece was sent before this event: final figures
                self.latency.underruns, self.latency.underrun_ms = pb.stalls()
                # one chunk only (or a client that plays nothing): all of it was in hand
                self.latency.min_buffer_ms = pb.sent_ms if pb.min_buffer_ms is None else pb.min_buffer_ms
                if self.latency.underruns:
                    self.latency.min_buffer_ms = 0.0  # the client ran dry, whatever the estimate says
            await self._outbox.put(self._stamp(event))
        if self._producer is not None and not self._producer.cancelled() and self._producer.exception() is None:
            if self.state is TurnState.ACTIVE:
                self._to(TurnState.SENT)
                self._announce_sent()
            elif self.state is TurnState.PAUSED:
                self._resume_to = TurnState.SENT  # paused after the last event went out

    def _announce_sent(self) -> None:
        self._announced = True
        if self._on_sent is not None:
            self._on_sent(self)

    def _on_audio_sent(self, event: ev.AudioOut) -> None:
        if self.playback.first_wall is None:
            now = self._clock()
            self.latency.first_audio_ms = 1000 * (now - self.user.t_end)
            if self.user.audio is not None:
                self.latency.voice_to_voice_ms = 1000 * (now - self.user.t_user_stop)
        # the first piece of each text chunk carries its text
        self.playback.on_sent(1000.0 * (len(event.pcm16) // 2) / event.sample_rate, chunk_start=bool(event.text))

    # --- the end ---------------------------------------------------------------------------------

    async def end(self, state: TurnState, reason: str = "", *, carry: bool = True) -> TurnEnd:
        """Stop everything this turn runs and write the history: exactly once.

        ``state`` is what the caller asks for; an INTERRUPTED turn of which nothing was heard
        becomes DISCARDED (with its user words carried to the next turn).
        """
        if self.ended:
            return TurnEnd(self.state)
        heard_ms = self.playback.played_ms()
        heard = heard_text(self.segments, heard_ms)
        if state is TurnState.COMMITTED and self.state is not TurnState.SENT:
            state = TurnState.INTERRUPTED  # not everything was sent: it can only be cut off
        if state is TurnState.INTERRUPTED and not heard and not self.calls:
            state = TurnState.DISCARDED  # (calls the client was sent were made: they stay)
        was_released = self.state is not TurnState.PENDING
        self._to(state)
        self.interrupt_reason = reason
        self._notify()
        await cancel_and_wait(self._producer, self._forwarder)
        self.transcript.cancel()  # waiters on an unfinished transcript stop waiting
        await self._outbox.purge(self.response_id)
        self._held.clear()
        user_text = self.user.full_text() or (UNTRANSCRIBED if self.user.audio is not None else "")
        if self.filler:
            pass  # a filler said while a tool ran is not the model's: the history (its prompt) leaves it out
        elif state is TurnState.COMMITTED:
            if user_text:
                self.history.add_user(user_text)
            self.history.add_assistant(self.generated, tool_calls=self.calls)
            self._write_tool_outputs()
            return TurnEnd(state)
        elif state is TurnState.INTERRUPTED:
            if user_text:
                self.history.add_user(user_text)
            self.history.add_assistant(heard, interrupted=True, tool_calls=self.calls)
            self._write_tool_outputs()
        if was_released and state is not TurnState.COMMITTED:
            await self._outbox.put(self._stamp(ev.ResponseInterrupted(
                response_id=self.response_id, heard_text=heard, heard_ms=int(heard_ms),
                generated_text=self.generated, reason=reason or "barge_in")))
        if state is TurnState.DISCARDED and carry and (self.user.full_text() or self.user.audio is not None):
            return TurnEnd(state, carry=self.user)
        return TurnEnd(state)

    def _write_tool_outputs(self) -> None:
        for call in self.calls:  # results that came while this turn was still playing
            if call.call_id in self.tool_outputs:
                self.history.add_tool_result(call.call_id, self.tool_outputs[call.call_id])

    def history_entries(self) -> list[dict[str, object]]:
        """The messages this turn will write if it is committed (for an answer made before that)."""
        out: list[dict[str, object]] = []
        if self.filler:
            return out
        if self.user.full_text():
            out.append({"role": "user", "content": self.user.full_text()})
        if self.generated.strip() or self.calls:
            entry: dict[str, object] = {"role": "assistant", "content": self.generated.strip()}
            if self.calls:
                entry["tool_calls"] = [c.message() for c in self.calls]
            out.append(entry)
        out += [{"role": "tool", "content": self.tool_outputs[c.call_id], "tool_call_id": c.call_id}
                for c in self.calls if c.call_id in self.tool_outputs]
        return out

    def truncate(self, audio_end_ms: float) -> str:
        """The client says the user heard only ``audio_end_ms`` of this ended turn: if it is the
        newest answer in the history, its entry becomes what was heard (more exact than ours)."""
        heard = heard_text(self.segments, audio_end_ms)
        if self.state in (TurnState.COMMITTED, TurnState.INTERRUPTED) and \
                self.history.truncate_last_assistant(heard):
            self.state = TurnState.INTERRUPTED
        return heard

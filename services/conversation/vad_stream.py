"""The VAD stream the conversation drives: per-window speech probabilities -> utterances.

``VADSegmenter`` is pure logic turning probabilities (and the matching audio) into speech
start/end events; ``VADStream`` pairs it with any scorer (the Silero model in-process, the
cross-session ``VADBatcher``, or the remote VAD stage) for one 16 kHz stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from services.audio import MODEL_RATE
from services.errors import InvalidArgument
from services.vad import WINDOW, VADConfig, VADState, as_mono_f32

# --- segmentation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechStart:
    """Speech was confirmed (it lasted ``min_speech_ms``); it began at ``start_ms``."""

    start_ms: int


@dataclass(frozen=True)
class SpeechEnd:
    """An utterance ended; ``audio`` runs from pre-roll before ``start_ms`` to post-roll after
    ``end_ms`` (times in ms of input audio since stream start)."""

    start_ms: int
    end_ms: int
    audio: np.ndarray = field(repr=False)
    reason: Literal["silence", "max_length", "flush"] = "silence"


VADEvent = SpeechStart | SpeechEnd
SpeechState = Literal["silence", "pending", "speech"]


class VADSegmenter:
    """Turns per-window speech probabilities (+ the matching audio) into utterances.

    States: ``silence`` -> ``pending`` (prob >= threshold; not announced yet) -> ``speech``
    (announced with SpeechStart once the burst has lasted ``min_speech_ms``). A run of windows
    below ``neg_threshold`` lasting ``min_silence_ms`` ends it; probabilities back above
    ``threshold`` cancel a pending end (hysteresis). A pending burst that ends before
    ``min_speech_ms`` is dropped without any event. Memory: audio is kept only for the open
    utterance (at most ``max_utterance_s``) plus the pre-roll.
    """

    def __init__(self, config: VADConfig | None = None, window: int = WINDOW,
                 sample_rate: int = MODEL_RATE) -> None:
        self.cfg = config or VADConfig()
        self.window = window
        self.rate = sample_rate
        self._neg = self.cfg.effective_neg_threshold()
        ms = sample_rate // 1000
        self._pre = self.cfg.pre_roll_ms * ms
        self._post = min(self.cfg.post_roll_ms, self.cfg.min_silence_ms) * ms
        self._min_silence = self.cfg.min_silence_ms * ms
        self._min_speech = self.cfg.min_speech_ms * ms
        self._max_len = int(self.cfg.max_utterance_s * sample_rate)
        self._chunks: list[np.ndarray] = []
        self._buf_start = 0  # stream sample index of the first buffered sample
        self._pos = 0  # samples consumed so far
        self._state: SpeechState = "silence"
        self._start = 0  # sample index where the open burst began
        self._silence_from: int | None = None  # first sample of the current silence run

    # -- public state --
    @property
    def state(self) -> SpeechState:
        return self._state

    @property
    def in_speech(self) -> bool:
        """True between SpeechStart and SpeechEnd."""
        return self._state == "speech"

    @property
    def position_ms(self) -> int:
        return self._ms(self._pos)

    def current_audio(self) -> np.ndarray | None:
        """Audio of the open (announced) utterance so far, pre-roll included; for partials."""
        if self._state != "speech":
            return None
        return self._slice(self._start - self._pre, self._pos)

    @property
    def speech_start_ms(self) -> int | None:
        """Where the open (announced) utterance began, in ms of input; None outside speech."""
        return self._ms(self._start) if self._state == "speech" else None

    @property
    def silence_ms(self) -> int:
        """How long the open utterance has been silent (0 while speaking or outside speech)."""
        if self._state != "speech" or self._silence_from is None:
            return 0
        return self._ms(self._pos - self._silence_from)

    @property
    def silence_start_ms(self) -> int | None:
        """Where the open utterance's current silence began (None while speaking or outside speech)."""
        if self._state != "speech" or self._silence_from is None:
            return None
        return self._ms(self._silence_from)

    @property
    def speech_ms(self) -> int:
        """Length of the open utterance up to its current silence (0 outside speech)."""
        if self._state != "speech":
            return 0
        end = self._silence_from if self._silence_from is not None else self._pos
        return self._ms(end - self._start)

    def utterance_so_far(self) -> np.ndarray | None:
        """What ``end_now()`` would return as audio now (post-roll included), without ending."""
        if self._state != "speech":
            return None
        end = self._silence_from if self._silence_from is not None else self._pos
        return self._slice(self._start - self._pre, min(end + self._post, self._pos))

    def end_now(self, reason: Literal["silence", "max_length", "flush"] = "silence") -> SpeechEnd | None:
        """End the open utterance at its current silence (an end-of-turn decided above the VAD)."""
        if self._state != "speech":
            return None
        end = self._silence_from if self._silence_from is not None else self._pos
        event = self._end(end, reason)
        self._state = "silence"
        return event

    def drop(self) -> None:
        """Forget the open or pending burst without an event (it was noise, not a turn)."""
        if self._state == "silence":
            return
        self._state, self._silence_from = "silence", None
        self._trim(self._pos - self._pre)

    # -- feeding --
    def feed(self, probs: np.ndarray, audio: np.ndarray) -> list[VADEvent]:
        p = np.asarray(probs, dtype=np.float32).reshape(-1)
        a = as_mono_f32(audio)
        if a.size != p.size * self.window:
            raise InvalidArgument(
                f"VAD segmenter needs {self.window} samples per probability; "
                f"got {a.size} samples for {p.size} probabilities"
            )
        if a.size:
            self._chunks.append(a)
        events: list[VADEvent] = []
        for prob in p:
            self._step(float(prob), events)
        if self._state == "silence":
            self._trim(self._pos - self._pre)
        return events

    def flush(self) -> list[VADEvent]:
        """End of input: close an announced utterance; a pending burst too short is dropped."""
        events: list[VADEvent] = []
        if self._state == "speech":
            end = self._silence_from if self._silence_from is not None else self._pos
            events.append(self._end(end, "flush"))
        self._state, self._silence_from = "silence", None
        self._trim(self._pos - self._pre)
        return events

    # -- internals --
    def _step(self, prob: float, events: list[VADEvent]) -> None:
        w_start, self._pos = self._pos, self._pos + self.window
        if self._state == "silence":
            if prob >= self.cfg.threshold:
                self._state, self._start, self._silence_from = "pending", w_start, None
                self._confirm(events)
            return
        # pending or speech
        if prob >= self.cfg.threshold:
            self._silence_from = None
        elif prob < self._neg and self._silence_from is None:
            self._silence_from = w_start
        if self._silence_from is not None and self._pos - self._silence_from >= self._min_silence:
            if self._state == "speech":
                events.append(self._end(self._silence_from, "silence"))
            self._state, self._silence_from = "silence", None
        elif self._state == "pending":
            if self._silence_from is None:
                self._confirm(events)
        elif self._pos + self.window - self._utterance_from() > self._max_len:
            # end before the next window would make the audio (pre-roll included) too long
            events.append(self._end(self._pos, "max_length"))
            self._state = "silence"

    def _confirm(self, events: list[VADEvent]) -> None:
        if self._pos - self._start >= max(self._min_speech, 1):
            self._state = "speech"
            events.append(SpeechStart(self._ms(self._start)))

    def _utterance_from(self) -> int:
        return max(self._start - self._pre, self._buf_start)

    def _end(self, end: int, reason: Literal["silence", "max_length", "flush"]) -> SpeechEnd:
        audio = self._slice(self._start - self._pre, min(end + self._post, self._pos))
        ev = SpeechEnd(self._ms(self._start), self._ms(end), audio, reason)
        # the closed utterance's audio must not become the next one's pre-roll
        self._trim(end if reason != "max_length" else self._pos)
        self._silence_from = None
        return ev

    def _slice(self, a: int, b: int) -> np.ndarray:
        a = max(a, self._buf_start)
        if not self._chunks or b <= a:
            return np.zeros(0, np.float32)
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0][a - self._buf_start : b - self._buf_start].copy()

    def _trim(self, keep_from: int) -> None:
        drop = keep_from - self._buf_start
        if drop <= 0 or not self._chunks:
            return
        buf = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [buf[drop:]] if drop < buf.size else []
        self._buf_start += min(drop, buf.size)

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.rate


# --- one stream ---------------------------------------------------------------------------------


class VADScorer(Protocol):
    """Anything that scores windows for one stream: the model in-process, a batcher, a stage."""

    async def __call__(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]: ...


class VADStream:
    """Scorer + segmenter for one 16 kHz stream, async: push chunks of any size, get events.

    The scorer carries no per-stream state (it travels in ``VADState``), so one model, one
    cross-session batcher or one remote deployment serves every stream.
    """

    def __init__(self, score: VADScorer, config: VADConfig | None = None) -> None:
        self.score = score
        self.segmenter = VADSegmenter(config or VADConfig())
        self.state = VADState()
        self.last_prob = 0.0

    async def push(self, audio16k: np.ndarray) -> list[VADEvent]:
        x = as_mono_f32(audio16k)
        lead = self.state.leftover
        probs, self.state = await self.score(x, self.state)
        return self._feed(lead, x, probs)

    def _feed(self, lead: np.ndarray, x: np.ndarray, probs: np.ndarray) -> list[VADEvent]:
        """Segment the windows just scored: ``lead`` (last call's leftover) + ``x``."""
        if not probs.size:
            return []
        self.last_prob = float(probs[-1])
        scored = np.concatenate([lead, x]) if lead.size else x
        return self.segmenter.feed(probs, scored[: probs.size * WINDOW])

    async def flush(self) -> list[VADEvent]:
        """End of input: score the last partial window (zero-padded) and close any utterance."""
        events: list[VADEvent] = []
        if self.state.leftover.size:
            events += await self.push(np.zeros(WINDOW - self.state.leftover.size, np.float32))
        return events + self.segmenter.flush()

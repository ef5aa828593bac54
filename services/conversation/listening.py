"""The listening side of a conversation: client audio -> 16 kHz -> VAD -> utterances.

``Listener`` owns everything about the user's audio and nothing about answers: the resampler,
the VAD stream (or the push-to-talk buffer), the input clock (how much audio arrived, and when),
partial transcripts, and the end-of-turn helpers (the model's score and the transcript that
``policies.EndOfTurn`` decides on). The conversation feeds it audio and acts on the events it
returns: speech started or ended, a pause long enough to speculate, a turn over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from services.audio import MODEL_RATE, StreamResampler
from services.batching import Priority
from services.conversation import events as ev
from services.conversation.aio import TaskGroup
from services.conversation.policies import EndOfTurn
from services.conversation.settings import SessionSettings
from services.conversation.stages import Stages, within
from services.conversation.vad_stream import SpeechEnd, VADEvent, VADSegmenter, VADStream
from services.errors import OutOfRange, VoxError

log = logging.getLogger(__name__)

#: Longest audio the end-of-turn model looks at (Smart Turn's window).
END_OF_TURN_WINDOW_S = 8.0


class Listener:
    """One conversation's input audio, from the client's rate to utterances (see the module doc)."""

    def __init__(self, stages: Stages, settings: SessionSettings, tasks: TaskGroup,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stages = stages
        self.settings = settings
        self._tasks = tasks
        self._clock = clock
        self.in_ms = 0.0  # input audio received so far, at the client's rate, in ms
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=4096)  # (input ms, wall time)
        self._manual: list[np.ndarray] = []
        self._manual_samples = 0
        self.vad_origin_ms = 0.0  # where the current VAD's clock starts, in ms of input
        self._partial_task: asyncio.Task[None] | None = None
        self._last_partial = 0.0
        self.end_of_turn = EndOfTurn(settings.turn)
        self.configure(settings, None)

    # --- set-up --------------------------------------------------------------------------------

    def configure(self, settings: SessionSettings, previous: SessionSettings | None) -> bool:
        """(Re)build what listening needs from ``settings``; True if an open utterance was dropped."""
        self.settings = s = settings
        if previous is None or previous.input_sample_rate != s.input_sample_rate:
            self._resampler = StreamResampler(s.input_sample_rate, MODEL_RATE)
        if previous is not None and (previous.vad, previous.turn) == (s.vad, s.turn):
            return False
        # The VAD ends an utterance by itself only at the fallback silence; EndOfTurn ends it earlier.
        fallback = s.turn.max_silence_ms if s.turn.mode == "semantic" else s.turn.min_silence_ms
        vad_cfg = s.vad.model_copy(update={"min_silence_ms": fallback})
        self._vad = VADStream(self.stages.vad_probs, vad_cfg)
        self.vad_origin_ms = self.in_ms  # a new VAD counts from 0: event times are offset by this
        self.end_of_turn = EndOfTurn(s.turn)
        if previous is not None:
            self.clear_manual()
        return True

    @property
    def manual(self) -> bool:
        """Push-to-talk: no VAD, the client commits each turn."""
        return self.settings.turn.mode == "manual"

    @property
    def segmenter(self) -> VADSegmenter:
        return self._vad.segmenter

    # --- audio in ------------------------------------------------------------------------------

    async def push(self, samples: np.ndarray) -> list[VADEvent] | None:
        """Client audio (float32 at the input rate): the VAD events it completes, or None when no
        audio reached the VAD (push-to-talk buffers it; a resampler may hold a tiny chunk back)."""
        x = self._resampler.push(samples)
        self.in_ms += 1000.0 * samples.size / self.settings.input_sample_rate
        self._arrivals.append((self.in_ms, self._clock()))
        if x.size == 0:
            return None
        if self.manual:
            self._buffer_manual(x)
            return None
        return await self._vad.push(x)

    async def flush(self) -> list[VADEvent]:
        """End of input: close an open utterance (VAD modes)."""
        return [] if self.manual else await self._vad.flush()

    def _buffer_manual(self, x: np.ndarray) -> None:
        limit = int(self.settings.vad.max_utterance_s * MODEL_RATE)
        if self._manual_samples + x.size > limit:
            raise OutOfRange(f"uncommitted audio exceeds {self.settings.vad.max_utterance_s:g} s; "
                             "commit the turn (or clear it) before sending more")
        self._manual.append(x)
        self._manual_samples += x.size

    @property
    def has_manual_audio(self) -> bool:
        return bool(self._manual)

    def take_manual(self) -> SpeechEnd | None:
        """The push-to-talk audio so far as one utterance ending now (None if there is none)."""
        if not self._manual:
            return None
        audio = np.concatenate(self._manual)
        self.clear_manual()
        end_ms = int(self.in_ms)
        return SpeechEnd(max(0, end_ms - int(1000 * audio.size / MODEL_RATE)), end_ms, audio, "flush")

    def clear_manual(self) -> None:
        self._manual, self._manual_samples = [], 0

    def wall_at(self, audio_ms: float) -> float:
        """Wall time at which input audio up to ``audio_ms`` had arrived."""
        for pos, wall in self._arrivals:
            if pos >= audio_ms:
                return wall
        return self._clock()

    # --- end of turn ---------------------------------------------------------------------------

    def score_end_of_turn(self, eot: EndOfTurn, audio: np.ndarray) -> None:
        """Ask the end-of-turn model about ``audio`` (the utterance with its silence so far)."""
        self._tasks.spawn(self._score_end_of_turn(eot, audio), name="end-of-turn")

    async def _score_end_of_turn(self, eot: EndOfTurn, audio: np.ndarray) -> None:
        window = audio[-int(END_OF_TURN_WINDOW_S * MODEL_RATE):]
        try:
            score = await within(self.stages.end_of_turn(window), self.settings.timeouts.turn_detector_s,
                                 "the end-of-turn model")
        except VoxError as exc:
            log.warning("end-of-turn model failed (%s); deciding on the transcript", exc.message)
            score = None
        eot.set_score(score)

    def follow_transcript(self, eot: EndOfTurn, transcript: asyncio.Future[str]) -> None:
        """The end of turn decides on a speculative turn's transcript when it comes."""
        self._tasks.spawn(self._follow_transcript(eot, transcript), name="spec-transcript")

    async def _follow_transcript(self, eot: EndOfTurn, transcript: asyncio.Future[str]) -> None:
        try:
            text = await transcript
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if transcript.cancelled() and task is not None and not task.cancelling():
                return  # the speculation was discarded: its pause is over anyway
            raise
        eot.set_transcript(text)

    def transcribe_for(self, eot: EndOfTurn, audio: np.ndarray) -> None:
        """A transcript for the end of turn alone (no speculative answer is running)."""
        self._tasks.spawn(self._transcribe_for(eot, audio), name="eot-transcript")

    async def _transcribe_for(self, eot: EndOfTurn, audio: np.ndarray) -> None:
        try:
            result = await within(self.stages.transcribe(audio, self.settings.language, Priority.SPECULATIVE),
                                  self.settings.timeouts.asr_s, "speech recognition")
            eot.set_transcript(result.text.strip())
        except VoxError as exc:
            log.warning("end-of-turn transcript failed: %s", exc.message)
            eot.set_transcript("x")  # unknown words: let the model score and the silence decide

    async def transcribe_burst(self, audio: np.ndarray | None) -> str:
        """What speech over an answer said (barge-in check), ahead of other sessions' finals."""
        if audio is None or audio.size == 0:
            return ""
        result = await within(self.stages.transcribe(audio, self.settings.language, Priority.BARGE_IN),
                              self.settings.timeouts.asr_s, "speech recognition")
        return str(result.text).strip()

    # --- partial transcripts -------------------------------------------------------------------

    def maybe_partial(self, emit: Callable[[ev.Event], Awaitable[None]]) -> None:
        """While the user speaks: a partial transcript every ``partial_interval_ms``, one at a time."""
        if not self.settings.partial_transcripts:
            return
        now = self._clock()
        busy = self._partial_task is not None and not self._partial_task.done()
        if busy or (now - self._last_partial) * 1000 < self.settings.partial_interval_ms:
            return
        audio = self.segmenter.current_audio()
        if audio is None or audio.size < MODEL_RATE // 4:
            return
        self._last_partial = now
        self._partial_task = self._tasks.spawn(self._partial(audio, emit), name="partial")

    async def _partial(self, audio: np.ndarray, emit: Callable[[ev.Event], Awaitable[None]]) -> None:
        try:
            text = await within(self.stages.partial_transcribe(audio, self.settings.language),
                                self.settings.timeouts.asr_s, "speech recognition")
        except VoxError:
            return
        if text and text.strip() and self.segmenter.in_speech:
            await emit(ev.PartialTranscript(text=text.strip()))

    def cancel_partial(self) -> None:
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()
        self._partial_task = None

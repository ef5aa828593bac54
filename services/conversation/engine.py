"""One voice conversation, transport-agnostic: input side, turns, output side.

The adapter (gRPC ``Converse``, the realtime WebSocket, a test) feeds input from one task
(``push_audio``, ``push_text``, ``playback``, ``commit_audio``, ``create_response``,
``cancel_response``, ``truncate``, ``end_input``) and drains ``events()`` from another, so a reply
never blocks listening. Everything else happens here:

- listening: resample -> ``VADStream`` -> end of turn (``policies.EndOfTurn``: silence, the
  end-of-turn model and the transcript), with speculation: when the silence begins, a ``Turn``
  starts in PENDING (ASR, LLM, first TTS chunk), its output held; it is released when the turn
  ends, and discarded (vLLM request aborted, nothing sent, nothing in the history) if the user
  speaks on, the words then being the same turn;
- interruptions: user speech over an answer pauses it, then ``policies.classify_barge_in``
  decides: a real turn interrupts it (history = what was heard), noise or a backchannel resumes it;
- turns: each response is one ``Turn`` that ends exactly once and is the only writer of the
  history; at most one turn owns the output at a time, later user turns wait in a bounded queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.audio import MODEL_RATE, StreamResampler
from services.batching import Priority
from services.conversation import events as ev
from services.conversation.aio import TaskGroup, cancel_and_wait
from services.conversation.history import ChatHistory
from services.conversation.outbox import Outbox
from services.conversation.policies import EndOfTurn, classify_barge_in
from services.conversation.settings import SPEECH_NATIVE, SessionSettings
from services.conversation.stages import Stages, deadline_stream, within
from services.conversation.turn import PlaybackClock, Turn, TurnState, UserInput
from services.errors import FailedPrecondition, OutOfRange, VoxError, to_vox_error
from services.tts import SynthesizedAudio, TTSStream
from services.vad import SpeechEnd, SpeechStart, VADEvent, VADState, VADStream

log = logging.getLogger(__name__)

#: Longest audio the end-of-turn model looks at (Smart Turn's window).
END_OF_TURN_WINDOW_S = 8.0
#: Ended turns kept for late PlaybackPosition / truncate messages.
RECENT_TURNS = 8


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


class NullObserver:
    def speculation(self, outcome: str) -> None:
        pass

    def interruption(self, outcome: str) -> None:
        pass

    def turn_ended(self, state: str, reason: str) -> None:
        pass

    def answered(self, latency: ev.TurnLatency) -> None:
        pass


class NothingToSay(Exception):
    """The utterance had no words (noise, breath): the turn ends without an answer."""


@dataclass
class _BargeIn:
    """Speech over an answer whose fate is not decided yet."""

    response: Turn
    check: asyncio.Task[str] | None = None


class Conversation:
    """The state of one voice conversation (see the module docstring)."""

    def __init__(self, stages: Stages, settings: SessionSettings, *, history: ChatHistory | None = None,
                 session_id: str | None = None, info: dict[str, str] | None = None,
                 observer: Observer | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stages = stages
        self.settings = settings
        self.history = history or ChatHistory(settings.system_prompt)
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.observer: Observer = observer or NullObserver()
        self._info = info or {}
        self._clock = clock
        self._t0 = clock()
        self._out = Outbox(settings.send_queue)
        self._lock = asyncio.Lock()  # input handling and turn ownership change one at a time
        self._tasks = TaskGroup()
        self._changed = asyncio.Event()
        self._closed = False
        self._next_response = 1
        self._next_input = 1
        self._response: Turn | None = None  # the turn that owns the output (live, or the last one)
        self._spec: Turn | None = None  # a speculative turn (PENDING)
        self._spec_key: tuple[int, int] | None = None  # (speech start, silence start) it was made for
        self._queue: deque[UserInput] = deque()  # user turns waiting for the current answer
        self._unanswered: list[UserInput] = []  # committed without auto-respond
        self._carry: UserInput | None = None  # words of a discarded turn, said before the next ones
        self._recent: OrderedDict[int, Turn] = OrderedDict()
        self._barge: _BargeIn | None = None
        self._eot = EndOfTurn(settings.turn)
        self._paused_key: tuple[int, int] | None = None  # the pause speculation/EOT signals belong to
        self._partial_task: asyncio.Task[None] | None = None
        self._last_partial = 0.0
        self._in_ms = 0.0
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=4096)  # (input ms, wall time)
        self._manual: list[np.ndarray] = []
        self._manual_samples = 0
        self._vad_origin_ms = 0.0
        self._setup_listening()

    # --- set-up ------------------------------------------------------------------------------------

    def _setup_listening(self, previous: SessionSettings | None = None) -> bool:
        """(Re)build what listening needs from the settings; True if an open utterance was dropped."""
        s = self.settings
        if previous is None or previous.input_sample_rate != s.input_sample_rate:
            self._resampler = StreamResampler(s.input_sample_rate, MODEL_RATE)
        if previous is not None and (previous.vad, previous.turn) == (s.vad, s.turn):
            return False
        # The VAD ends an utterance by itself only at the fallback silence; EndOfTurn ends it earlier.
        fallback = s.turn.max_silence_ms if s.turn.mode == "semantic" else s.turn.min_silence_ms
        vad_cfg = s.vad.model_copy(update={"min_silence_ms": fallback})
        self._vad = VADStream(self._score_vad, vad_cfg)
        self._vad_origin_ms = self._in_ms  # a new VAD counts from 0: event times are offset by this
        self._eot = EndOfTurn(s.turn)
        return True

    async def _score_vad(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        return await self.stages.vad_probs(audio16k, state)

    # --- output side ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int((self._clock() - self._t0) * 1000)

    def _stamp(self, event: ev.Event, audio_ms: float | None = None) -> ev.Event:
        event.server_time_ms = self.now_ms()
        event.audio_time_ms = int(self._in_ms if audio_ms is None else audio_ms)
        return event

    async def emit(self, event: ev.Event, audio_ms: float | None = None) -> None:
        await self._out.put(self._stamp(event, audio_ms))

    async def events(self) -> AsyncIterator[ev.Event]:
        """Events for the client, until the conversation is closed."""
        while (item := await self._out.get()) is not None:
            yield item

    async def start(self) -> None:
        await self.emit(ev.SessionStarted(
            session_id=self.session_id, output_sample_rate=self.settings.output_sample_rate,
            mode=self.settings.mode, llm_model=self._info.get("llm_model", ""),
            asr_model=self._info.get("asr_model", "")))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def response_in_progress(self) -> bool:
        """An answer is being generated or sent (a new one would have to wait)."""
        r = self._response
        return r is not None and r.state in (TurnState.ACTIVE, TurnState.PAUSED)

    def _notify(self) -> None:
        self._changed.set()
        self._changed.clear()

    # --- input side: audio ---------------------------------------------------------------------

    async def push_audio(self, samples: np.ndarray) -> None:
        """Client audio (float32 at the session's input rate), any chunk size."""
        async with self._lock:
            self._check_open()
            x = self._resampler.push(samples)
            self._in_ms += 1000.0 * samples.size / self.settings.input_sample_rate
            self._arrivals.append((self._in_ms, self._clock()))
            if x.size == 0:
                return
            if self.settings.turn.mode == "manual":
                self._buffer_manual(x)
                return
            for event in await self._vad.push(x):
                await self._on_vad(event)
            await self._after_audio()

    def _buffer_manual(self, x: np.ndarray) -> None:
        limit = int(self.settings.vad.max_utterance_s * MODEL_RATE)
        if self._manual_samples + x.size > limit:
            raise OutOfRange(f"uncommitted audio exceeds {self.settings.vad.max_utterance_s:g} s; "
                             "commit the turn (or clear it) before sending more")
        self._manual.append(x)
        self._manual_samples += x.size

    def _wall_at(self, audio_ms: float) -> float:
        """Wall time at which input audio up to ``audio_ms`` had arrived."""
        for pos, wall in self._arrivals:
            if pos >= audio_ms:
                return wall
        return self._clock()

    async def _on_vad(self, event: VADEvent) -> None:
        if isinstance(event, SpeechStart):
            await self.emit(ev.SpeechStarted(), audio_ms=self._vad_origin_ms + event.start_ms)
            self._paused_key = None
            await self._speech_over_answer()
        elif isinstance(event, SpeechEnd):
            # the VAD's own end (fallback silence, max length, flush)
            if self._barge is not None and not await self._decide_barge_in(
                    event.audio, event.end_ms - event.start_ms):
                return  # the burst was noise or a backchannel: dropped, the answer resumes
            await self._turn_over(event)

    async def _speech_over_answer(self) -> None:
        """The user started speaking: what it does to an answer that is out or still playing."""
        r = self._response
        if r is None or not r.live:
            return
        if r.state is TurnState.SENT and r.playback_done():
            await self._end_turn(r, TurnState.COMMITTED)
            return
        mode = self.settings.interruptions.mode
        if mode == "cancel":
            await self._end_turn(r, TurnState.INTERRUPTED, "barge_in")
            self.observer.interruption("interrupted")
        elif mode == "pause" and self._barge is None and r.state is not TurnState.PAUSED:
            played = r.pause()
            self._barge = _BargeIn(r)
            self.observer.interruption("paused")
            await self.emit(ev.ResponsePaused(response_id=r.response_id, played_ms=int(played)))

    async def _after_audio(self) -> None:
        seg = self._vad.segmenter
        if self._barge is not None:
            await self._progress_barge_in()
            return
        if not seg.in_speech:
            return
        silence = seg.silence_ms
        if silence == 0:
            if self._paused_key is not None:  # the user speaks on: same turn
                self._paused_key = None
                await self._discard_speculation()
            self._maybe_partial()
            return
        key = (seg.speech_start_ms or 0, seg.silence_start_ms or 0)
        if self._paused_key != key and silence >= self.settings.turn.speculate_after_ms:
            self._paused_key = key
            await self._on_pause(seg.utterance_so_far())
        if self._paused_key == key and self._eot.wants_score(silence):
            self._eot.start_score(silence)
            audio = seg.current_audio()  # with the silence so far: the model hears the pause too
            if audio is not None:
                self._tasks.spawn(self._score_end_of_turn(self._eot, audio), name="end-of-turn")
        if self._paused_key == key and self._eot.decide(silence):
            event = seg.end_now()
            if event is not None:
                await self._turn_over(event)

    # --- end of turn and speculation -----------------------------------------------------------

    async def _on_pause(self, audio: np.ndarray | None) -> None:
        """The silence after speech reached ``speculate_after_ms``: start the transcript the end of
        turn needs and, if the output is free, a speculative answer (which makes that transcript)."""
        if audio is None or audio.size == 0:
            return
        self._eot.reset()
        eot = self._eot
        semantic = self.settings.turn.mode == "semantic"
        await self._discard_speculation()
        r = self._response
        output_free = r is None or r.ended or r.state is TurnState.SENT
        if self.settings.turn.speculate and self.settings.auto_respond and output_free:
            user = UserInput(0, audio, None, self._clock(), self._clock())
            self._spec = self._new_turn(user, speculative=True)
            self._spec_key = self._paused_key
            self.observer.speculation("started")
            if semantic:
                self._tasks.spawn(self._follow_transcript(eot, self._spec.transcript), name="spec-transcript")
        elif semantic:
            self._tasks.spawn(self._transcribe_for(eot, audio), name="eot-transcript")

    async def _score_end_of_turn(self, eot: EndOfTurn, audio: np.ndarray) -> None:
        window = audio[-int(END_OF_TURN_WINDOW_S * MODEL_RATE):]
        try:
            score = await within(self.stages.end_of_turn(window), self.settings.timeouts.turn_detector_s,
                                 "the end-of-turn model")
        except VoxError as exc:
            log.warning("end-of-turn model failed (%s); deciding on the transcript", exc.message)
            score = None
        eot.set_score(score)

    async def _follow_transcript(self, eot: EndOfTurn, transcript: asyncio.Future[str]) -> None:
        try:
            text = await transcript
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if transcript.cancelled() and task is not None and not task.cancelling():
                return  # the speculation was discarded: its pause is over anyway
            raise
        eot.set_transcript(text)

    async def _transcribe_for(self, eot: EndOfTurn, audio: np.ndarray) -> None:
        try:
            result = await within(self.stages.transcribe(audio, self.settings.language, Priority.SPECULATIVE),
                                  self.settings.timeouts.asr_s, "speech recognition")
            eot.set_transcript(result.text.strip())
        except VoxError as exc:
            log.warning("end-of-turn transcript failed: %s", exc.message)
            eot.set_transcript("x")  # unknown words: let the model score and the silence decide

    async def _discard_speculation(self) -> None:
        spec, self._spec, self._spec_key = self._spec, None, None
        if spec is not None:
            await spec.end(TurnState.DISCARDED, "speech_resumed", carry=False)
            self.observer.speculation("discarded")

    async def _turn_over(self, event: SpeechEnd) -> None:
        """The user's turn ended (``event`` holds its audio): release the speculation or answer it."""
        self._paused_key = None
        self._cancel_partial()
        audio = event.audio
        end_ms = self._vad_origin_ms + event.end_ms
        await self.emit(ev.SpeechStopped(utterance_ms=int(1000 * audio.size / MODEL_RATE)), audio_ms=end_ms)
        user_stop = self._wall_at(end_ms)
        spec, key = self._spec, self._spec_key
        self._spec, self._spec_key = None, None
        input_id = self._take_input_id()
        await self.emit(ev.InputCommitted(input_id=input_id, utterance_ms=int(1000 * audio.size / MODEL_RATE)))
        if spec is not None and key == (event.start_ms, event.end_ms) and not spec.ended:
            spec.user.input_id = input_id
            spec.user.t_user_stop = user_stop
            self._apply_carry(spec.user)
            await self._make_room()
            spec.release()
            self._own(spec)
            self.observer.speculation("used")
            return
        if spec is not None:
            await spec.end(TurnState.DISCARDED, "stale", carry=False)
            self.observer.speculation("discarded")
        user = UserInput(input_id, audio, None, self._clock(), user_stop)
        if not self.settings.auto_respond:
            self._unanswered.append(user)
            return
        await self._answer(user)

    def _take_input_id(self) -> int:
        rid, self._next_input = self._next_input, self._next_input + 1
        return rid

    def _apply_carry(self, user: UserInput) -> None:
        """Words of a discarded turn go in front of ``user``'s (text, and audio for an audio LLM)."""
        carry, self._carry = self._carry, None
        if carry is None:
            return
        user.carried = carry.full_text()
        if carry.audio is not None and user.audio is not None and self.settings.mode == SPEECH_NATIVE:
            user.audio = np.concatenate([carry.audio, user.audio])

    # --- interruptions -------------------------------------------------------------------------

    async def _progress_barge_in(self) -> None:
        barge = self._barge
        assert barge is not None
        seg = self._vad.segmenter
        cfg = self.settings.interruptions
        if not barge.response.live or barge.response.state is not TurnState.PAUSED:
            self._barge = None  # the answer ended meanwhile (cancelled by the client, error)
            return
        if seg.in_speech and seg.silence_ms < cfg.resume_silence_ms:
            if seg.speech_ms >= cfg.min_duration_ms and barge.check is None:
                barge.check = self._tasks.spawn(self._transcribe_burst(seg.utterance_so_far()), name="barge-check")
            if barge.check is not None and barge.check.done() and not barge.check.cancelled() \
                    and barge.check.exception() is None \
                    and classify_barge_in(barge.check.result(), cfg) == "turn":
                await self._interrupt_for_barge_in()
            return
        await self._decide_barge_in(seg.utterance_so_far(), seg.speech_ms)

    async def _decide_barge_in(self, audio: np.ndarray | None, speech_ms: int) -> bool:
        """The burst of speech over the answer is over: interrupt (True) or resume (False)."""
        cfg = self.settings.interruptions
        if speech_ms < cfg.min_duration_ms:
            await self._resume_after_barge_in("noise")
            return False
        try:
            text = await self._transcribe_burst(audio)
        except VoxError:
            text = "?"  # unknown words: a long burst is taken as a turn
        verdict = classify_barge_in(text, cfg)
        if verdict == "turn":
            await self._interrupt_for_barge_in()
            return True
        await self._resume_after_barge_in(verdict)
        return False

    async def _transcribe_burst(self, audio: np.ndarray | None) -> str:
        if audio is None or audio.size == 0:
            return ""
        result = await within(self.stages.transcribe(audio, self.settings.language, Priority.BARGE_IN),
                              self.settings.timeouts.asr_s, "speech recognition")
        return str(result.text).strip()

    async def _interrupt_for_barge_in(self) -> None:
        barge, self._barge = self._barge, None
        if barge is None:
            return
        await cancel_and_wait(barge.check)
        await self._end_turn(barge.response, TurnState.INTERRUPTED, "barge_in")
        self.observer.interruption("interrupted")

    async def _resume_after_barge_in(self, reason: str) -> None:
        barge, self._barge = self._barge, None
        if barge is None:
            return
        await cancel_and_wait(barge.check)
        self._vad.segmenter.drop()  # it was not a turn: nothing of it is answered or kept
        self._paused_key = None
        if barge.response.state is TurnState.PAUSED:
            barge.response.resume()
            self.observer.interruption(f"resumed_{reason}")
            await self.emit(ev.ResponseResumed(response_id=barge.response.response_id, reason=reason))

    # --- input side: text and explicit control ---------------------------------------------------

    async def push_text(self, text: str, *, interrupt: bool = False, respond: bool = True) -> None:
        """A typed user turn. It waits for the answer in progress unless ``interrupt``; with
        ``respond`` False it only joins the conversation (answered by ``create_response``)."""
        async with self._lock:
            self._check_open()
            if not any(ch.isalnum() for ch in text):
                await self.emit(ev.ErrorEvent(code="INVALID_ARGUMENT", message=(
                    "text turn has nothing to answer (no letters or digits, e.g. only emojis); ignored")))
                return
            now = self._clock()
            if interrupt:
                await self._cancel_current("text_turn")
            user = UserInput(self._take_input_id(), None, text, now, now)
            await self.emit(ev.InputCommitted(input_id=user.input_id, text=text))
            if not respond:
                self._unanswered.append(user)
                return
            await self._answer(user)

    def playback(self, response_id: int, played_ms: int) -> None:
        """The client says how much of a response's audio the user has heard."""
        turn = self._turn_by_id(response_id)
        if turn is not None and not turn.ended:
            turn.playback.report(played_ms)

    async def commit_audio(self) -> None:
        """End the user's turn now (push-to-talk): the audio so far is the utterance."""
        async with self._lock:
            self._check_open()
            if self.settings.turn.mode == "manual":
                await self._commit_manual()
                return
            event = self._vad.segmenter.end_now("flush")
            if event is None:
                raise FailedPrecondition("no speech to commit: the voice activity detector heard none")
            if self._barge is not None:
                await self._interrupt_for_barge_in()
            await self._turn_over(event)

    async def _commit_manual(self) -> None:
        if not self._manual:
            raise FailedPrecondition("no audio to commit: send audio first")
        audio = np.concatenate(self._manual)
        self._manual, self._manual_samples = [], 0
        end_ms = int(self._in_ms)
        await self._turn_over(SpeechEnd(max(0, end_ms - int(1000 * audio.size / MODEL_RATE)), end_ms, audio, "flush"))

    async def clear_audio(self) -> None:
        """Drop the user's uncommitted audio."""
        async with self._lock:
            self._check_open()
            self._manual, self._manual_samples = [], 0
            self._vad.segmenter.drop()
            self._paused_key = None
            await self._discard_speculation()
            await self.emit(ev.InputCleared())

    async def create_response(self) -> None:
        """Answer now: the inputs committed without auto-respond (or continue the conversation)."""
        async with self._lock:
            self._check_open()
            if self.response_in_progress:
                raise FailedPrecondition("a response is already in progress; cancel it first")
            pending, self._unanswered = self._unanswered, []
            audio = [u.audio for u in pending if u.audio is not None]
            text = " ".join(u.text for u in pending if u.text) or None
            now = self._clock()
            user = UserInput(pending[-1].input_id if pending else 0,
                             np.concatenate(audio) if audio else None, text, now,
                             pending[-1].t_user_stop if pending else now)
            if user.audio is None and user.text is None and not len(self.history):
                raise FailedPrecondition("nothing to respond to: send audio or a text item first")
            await self._answer(user)

    async def cancel_response(self) -> None:
        """Stop the answer in progress (history keeps what was heard)."""
        async with self._lock:
            await self._discard_speculation()
            await self._cancel_current("cancelled")

    async def truncate(self, response_id: int, audio_end_ms: int) -> None:
        """The client stopped playing ``response_id`` at ``audio_end_ms``: that is all the user heard."""
        async with self._lock:
            turn = self._turn_by_id(response_id)
            if turn is None:
                raise FailedPrecondition(f"no response {response_id} in this conversation")
            if audio_end_ms > turn.playback.sent_ms + 1:
                raise OutOfRange(f"audio_end_ms {audio_end_ms} is past the {int(turn.playback.sent_ms)} ms "
                                 f"of audio sent for response {response_id}")
            turn.playback.report(audio_end_ms)
            if turn.live:
                if self._barge is not None and self._barge.response is turn:
                    barge, self._barge = self._barge, None
                    await cancel_and_wait(barge.check)
                await self._end_turn(turn, TurnState.INTERRUPTED, "truncated")
            heard = turn.truncate(audio_end_ms)
            await self.emit(ev.Truncated(response_id=response_id, audio_end_ms=audio_end_ms, heard_text=heard))

    async def update_settings(self, settings: SessionSettings) -> None:
        """Apply a new session configuration. A change of the listening settings (VAD, turn
        detection) drops the open utterance and any speculation; other changes keep them."""
        async with self._lock:
            previous, self.settings = self.settings, settings
            if settings.system_prompt:
                self.history.system_prompt = settings.system_prompt
            if self._setup_listening(previous):
                await self._discard_speculation()
                self._manual, self._manual_samples = [], 0
                self._paused_key = None

    # --- answering -----------------------------------------------------------------------------

    async def _answer(self, user: UserInput) -> None:
        """Start a turn for ``user`` now, or queue it behind the answer in progress."""
        r = self._response
        if r is not None and r.state in (TurnState.ACTIVE, TurnState.PAUSED):
            if len(self._queue) >= self.settings.max_queued_inputs:
                await self.emit(ev.ErrorEvent(code="RESOURCE_EXHAUSTED", message=(
                    f"{len(self._queue)} user turns are already waiting for the answer in progress; "
                    "this one was dropped")))
                return
            self._queue.append(user)
            return
        self._apply_carry(user)
        await self._make_room()
        self._own(self._new_turn(user, speculative=False))

    async def _make_room(self) -> None:
        """A new answer takes the output: the previous one, all sent, will be played to the end."""
        r = self._response
        if r is not None and r.state is TurnState.SENT:
            await self._end_turn(r, TurnState.COMMITTED)

    def _own(self, turn: Turn) -> None:
        self._response = turn
        self._recent[turn.response_id] = turn
        while len(self._recent) > RECENT_TURNS:
            self._recent.popitem(last=False)
        self._notify()

    def _turn_by_id(self, response_id: int) -> Turn | None:
        r = self._response
        if r is not None and r.response_id == response_id:
            return r
        return self._recent.get(response_id)

    def _new_turn(self, user: UserInput, *, speculative: bool) -> Turn:
        self._check_open()  # aclose may have run while the caller awaited
        rid, self._next_response = self._next_response, self._next_response + 1
        s = self.settings
        turn = Turn(rid, user, speculative=speculative, history=self.history, outbox=self._out,
                    stamp=self._stamp, playback=PlaybackClock(s.playback, self._clock),
                    held_limit=s.held_events, on_sent=self._on_sent, clock=self._clock)
        producer = asyncio.get_running_loop().create_task(self._produce(turn), name=f"turn-{rid}")
        turn.start(producer)
        producer.add_done_callback(lambda task: self._tasks.spawn(self._after_producer(turn, task)))
        return turn

    def _on_sent(self, turn: Turn) -> None:
        self.observer.answered(turn.latency)
        self._notify()
        if self._queue and turn is self._response:
            self._tasks.spawn(self._next_queued(), name="next-turn")

    async def _next_queued(self) -> None:
        async with self._lock:
            r = self._response
            if self._closed or not self._queue or (r is not None and r.state in (TurnState.ACTIVE, TurnState.PAUSED)):
                return
            await self._answer(self._queue.popleft())

    async def _after_producer(self, turn: Turn, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        async with self._lock:
            if turn.ended:
                return
            if turn is self._spec:  # a speculation that failed is simply not used
                self._spec, self._spec_key = None, None
                await turn.end(TurnState.DISCARDED, "error", carry=False)
                self.observer.speculation("discarded")
                return
            if isinstance(exc, NothingToSay):
                await self._end_turn(turn, TurnState.DISCARDED, "no_speech", carry=False)
                return
            err = to_vox_error(exc)
            await self.emit(ev.ErrorEvent(code=err.code, message=err.message, response_id=turn.response_id))
            await self._end_turn(turn, TurnState.INTERRUPTED, "error")
            if self._queue and not self.response_in_progress:
                await self._answer(self._queue.popleft())

    async def _end_turn(self, turn: Turn, state: TurnState, reason: str = "", *, carry: bool = True) -> None:
        end = await turn.end(state, reason, carry=carry)
        if end.carry is not None:
            if self._carry is not None:  # two discarded in a row: keep both, oldest first
                end.carry.carried = self._carry.full_text()
            self._carry = end.carry if end.carry.full_text() else None
        self.observer.turn_ended(turn.state.value, reason)
        self._notify()

    async def _cancel_current(self, reason: str) -> None:
        r = self._response
        if r is not None and r.live:
            if self._barge is not None:
                barge, self._barge = self._barge, None
                await cancel_and_wait(barge.check)
            await self._end_turn(r, TurnState.INTERRUPTED, reason)

    # --- one answer: ASR -> LLM -> TTS ----------------------------------------------------------

    def _messages(self, turn: Turn) -> list[dict[str, str]]:
        s = self.settings
        messages = self.history.messages(2 * s.history_turns)
        r = self._response
        if r is not None and r is not turn and r.state is TurnState.SENT:
            # not committed yet, but it will be played in full before this answer
            if r.user.full_text():
                messages.append({"role": "user", "content": r.user.full_text()})
            if r.generated.strip():
                messages.append({"role": "assistant", "content": r.generated.strip()})
        content = turn.user.full_text()
        if not content and turn.user.audio is None:
            return messages  # create_response with nothing new: the model continues
        if messages and messages[-1]["role"] == "user":  # the user spoke twice: one message
            messages[-1] = {"role": "user", "content": f"{messages[-1]['content']} {content}".strip()}
        else:
            messages.append({"role": "user", "content": content})
        return messages

    async def _produce(self, turn: Turn) -> None:
        s, lat, user, t = self.settings, turn.latency, turn.user, self._timeouts
        side_asr: asyncio.Task[None] | None = None
        audio_in: np.ndarray | None = None
        if user.audio is not None and user.text is None:
            if s.mode == SPEECH_NATIVE:
                audio_in = user.audio
                side_asr = asyncio.get_running_loop().create_task(self._side_transcript(turn))
            else:
                t0 = self._clock()
                # a speculation may be thrown away: other sessions' finished turns go first
                priority = Priority.SPECULATIVE if turn.speculative else Priority.FINAL
                result = await within(self.stages.transcribe(user.audio, s.language, priority), t.asr_s,
                                      "speech recognition")
                lat.asr_ms = 1000 * (self._clock() - t0)
                user.text = str(result.text).strip()
                if not turn.transcript.done():
                    turn.transcript.set_result(user.text)
                await turn.put(ev.FinalTranscript(text=user.text, language=result.language or "",
                                                  utterance_ms=user.utterance_ms, input_id=user.input_id))
                if not user.text:
                    raise NothingToSay
        elif not turn.transcript.done():
            turn.transcript.set_result(user.text or "")
        try:
            await turn.put(ev.ResponseStarted(response_id=turn.response_id, input_id=user.input_id))
            await self._generate_and_speak(turn, audio_in)
            if side_asr is not None:
                await side_asr
        finally:
            await cancel_and_wait(side_asr)
        await turn.put(ev.ResponseDone(response_id=turn.response_id, text=turn.generated.strip(),
                                       audio_ms=int(turn.audio_ms), latency=lat))

    @property
    def _timeouts(self) -> Any:
        return self.settings.timeouts

    async def _side_transcript(self, turn: Turn) -> None:
        """Speech-native: the transcript for the client and the history, off the latency path. A
        failure here does not fail the answer the user already hears."""
        user = turn.user
        assert user.audio is not None
        try:
            result = await within(self.stages.transcribe(user.audio, self.settings.language, Priority.SPECULATIVE),
                                  self._timeouts.asr_s, "speech recognition")
        except VoxError as exc:
            if not turn.transcript.done():
                turn.transcript.set_result("")
            await turn.put(ev.ErrorEvent(code=exc.code, response_id=turn.response_id,
                                         message=f"no transcript of the user's speech: {exc.message}"))
            return
        user.text = str(result.text).strip()
        if not turn.transcript.done():
            turn.transcript.set_result(user.text)
        await turn.put(ev.FinalTranscript(text=user.text, language=result.language or "",
                                          utterance_ms=user.utterance_ms, input_id=user.input_id))

    async def _generate_and_speak(self, turn: Turn, audio: np.ndarray | None) -> None:
        s, lat, t = self.settings, turn.latency, self._timeouts
        messages = self._messages(turn)
        tts = TTSStream(self._synthesizer(turn), sample_rate=s.output_sample_rate, chunker=s.chunker)
        async with tts:
            speaker = asyncio.get_running_loop().create_task(self._speak(turn, tts), name="speak")
            try:
                t_llm = self._clock()
                tokens = 0
                stream = self.stages.generate(messages, max_tokens=s.max_response_tokens, audio=audio)
                async for delta in deadline_stream(stream, t.llm_first_token_s, t.llm_stall_s, "the LLM"):
                    if tokens == 0:
                        lat.llm_first_token_ms = 1000 * (self._clock() - t_llm)
                    tokens += 1
                    turn.generated += delta
                    await turn.put(ev.TextDelta(response_id=turn.response_id, text=delta))
                    if speaker.done():  # TTS failed: end the turn now, not when the LLM is done
                        speaker.result()
                    tts.push_text(delta)
                gen_s = self._clock() - t_llm
                lat.llm_tokens = tokens
                lat.llm_tokens_per_s = tokens / gen_s if gen_s > 0 else 0.0
                tts.end_input()
                await speaker
            finally:
                await cancel_and_wait(speaker)

    def _synthesizer(self, turn: Turn) -> Callable[[str], AsyncIterator[bytes]]:
        s, t, lat = self.settings, self._timeouts, turn.latency

        async def synthesize(text: str) -> AsyncIterator[bytes]:
            t0 = self._clock()
            stream = self.stages.synthesize(text, voice=s.voice, sample_rate=s.output_sample_rate)
            async for pcm in deadline_stream(stream, t.tts_first_audio_s, t.tts_stall_s, "speech synthesis"):
                if lat.tts_first_audio_ms == 0.0:
                    lat.tts_first_audio_ms = 1000 * (self._clock() - t0)
                yield pcm

        return synthesize

    async def _speak(self, turn: Turn, tts: TTSStream) -> None:
        """TTS audio -> the turn's output in ``output_chunk_ms`` pieces, keeping each text chunk's
        span of the answer audio (what ``heard_text`` reads)."""
        s = self.settings
        rate = s.output_sample_rate
        piece_bytes = 2 * max(1, rate * s.output_chunk_ms // 1000)
        pending = b""
        chunk_index = -1
        label = ""
        async for piece in tts:
            assert isinstance(piece, SynthesizedAudio)
            if piece.chunk_index != chunk_index:
                if pending:
                    await self._send_piece(turn, pending, label)
                    pending, label = b"", ""
                chunk_index = piece.chunk_index
                turn.segments.append((piece.text, turn.audio_ms, turn.audio_ms))
                label = piece.text
            pending += piece.pcm if isinstance(piece.pcm, bytes) else bytes(piece.pcm)
            while len(pending) >= piece_bytes:
                out, pending = pending[:piece_bytes], pending[piece_bytes:]
                await self._send_piece(turn, out, label)
                label = ""
            if piece.is_last_in_chunk and pending:
                await self._send_piece(turn, pending, label)
                pending, label = b"", ""
        if pending:
            await self._send_piece(turn, pending, label)

    async def _send_piece(self, turn: Turn, pcm: bytes, text: str) -> None:
        rate = self.settings.output_sample_rate
        event = ev.AudioOut(response_id=turn.response_id, pcm16=pcm, sample_rate=rate,
                            offset_ms=int(turn.audio_ms), text=text)
        turn.audio_ms += 1000.0 * (len(pcm) // 2) / rate
        seg_text, seg_start, _ = turn.segments[-1]
        turn.segments[-1] = (seg_text, seg_start, turn.audio_ms)
        await turn.put(event)

    # --- partial transcripts ---------------------------------------------------------------------

    def _maybe_partial(self) -> None:
        if not self.settings.partial_transcripts:
            return
        now = self._clock()
        busy = self._partial_task is not None and not self._partial_task.done()
        if busy or (now - self._last_partial) * 1000 < self.settings.partial_interval_ms:
            return
        audio = self._vad.segmenter.current_audio()
        if audio is None or audio.size < MODEL_RATE // 4:
            return
        self._last_partial = now
        self._partial_task = self._tasks.spawn(self._partial(audio), name="partial")

    async def _partial(self, audio: np.ndarray) -> None:
        try:
            text = await within(self.stages.partial_transcribe(audio, self.settings.language),
                                self._timeouts.asr_s, "speech recognition")
        except VoxError:
            return
        if text and text.strip() and self._vad.segmenter.in_speech:
            await self.emit(ev.PartialTranscript(text=text.strip()))

    def _cancel_partial(self) -> None:
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()
        self._partial_task = None

    # --- closing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the conversation is closed")

    async def end_input(self) -> None:
        """No more input: end an open utterance, let every answer finish, then close."""
        async with self._lock:
            if not self._closed and self.settings.turn.mode != "manual":
                for event in await self._vad.flush():
                    await self._on_vad(event)
            if self._manual and not self._closed:
                await self._commit_manual()
        while not self._closed:
            r = self._response
            if not self._queue and (r is None or r.ended or r.state is TurnState.SENT):
                break
            await self._changed.wait()
        await self.aclose(drain=True)

    async def aclose(self, *, drain: bool = False) -> None:
        """Stop everything this conversation started (disconnect, cancel, error, or the end).

        With ``drain`` the events already queued are still delivered; otherwise they are dropped,
        so that closing never waits for a client that stopped reading.
        """
        if self._closed:
            return
        self._closed = True
        await self._out.close(drop_pending=not drain)
        self._queue.clear()
        spec, self._spec = self._spec, None
        if spec is not None:
            await spec.end(TurnState.DISCARDED, "closed", carry=False)
        r = self._response
        if r is not None and not r.ended:
            done = r.state is TurnState.SENT and (drain or r.playback_done())
            await r.end(TurnState.COMMITTED if done else TurnState.INTERRUPTED, "closed")
            self.observer.turn_ended(r.state.value, "closed")
        await self._tasks.aclose()
        self._notify()

    # --- operator view ---------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """The history as recorded (with interruption flags), for operators and tests."""
        return self.history.records()

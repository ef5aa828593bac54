"""One voice conversation, transport-agnostic: the control API and who owns the output.

The adapter (gRPC ``Converse``, the realtime WebSocket, a test) feeds input from one task
(``push_audio``, ``push_text``, ``playback``, ``commit_audio``, ``create_response``,
``cancel_response``, ``truncate``, ``end_input``) and drains ``events()`` from another, so a reply
never blocks listening. The two sides live apart: ``listening.Listener`` turns audio into
utterances, ``answering.AnswerProducer`` turns one user input into one spoken answer. What joins
them happens here:

- end of turn (``policies.EndOfTurn``: silence, the end-of-turn model and the transcript), with
  speculation: when the silence begins, a ``Turn``
  starts in PENDING (ASR, LLM, first TTS chunk), its output held; it is released when the turn
  ends, and discarded (the LLM request aborted, nothing sent, nothing in the history) if the user
  speaks on, the words then being the same turn;
- interruptions: user speech over an answer pauses it, then ``policies.classify_barge_in``
  decides: a real turn interrupts it (history = what was heard), noise or a backchannel resumes it;
- turns: each response is one ``Turn`` that ends exactly once and is the only writer of the
  history; at most one turn owns the output at a time, later user turns wait in a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.audio import MODEL_RATE
from services.conversation import events as ev
from services.conversation.aio import TaskGroup, cancel_and_wait
from services.conversation.answering import AnswerProducer, NothingToSay
from services.conversation.history import ChatHistory
from services.conversation.input_lag import InputLag
from services.conversation.listening import Listener
from services.conversation.observer import NullObserver, Observer
from services.conversation.outbox import Outbox
from services.conversation.policies import classify_barge_in
from services.conversation.settings import SPEECH_NATIVE, SessionSettings
from services.conversation.snapshot import capture
from services.conversation.stages import Stages
from services.conversation.tool_calls import ToolCalls
from services.conversation.turn import PlaybackClock, Turn, TurnState, UserInput
from services.conversation.vad_stream import SpeechEnd, SpeechStart, VADEvent
from services.errors import FailedPrecondition, OutOfRange, VoxError, to_vox_error

log = logging.getLogger(__name__)

#: Ended turns kept for late PlaybackPosition / truncate messages.
RECENT_TURNS = 8


@dataclass
class _BargeIn:
    """Speech over an answer whose fate is not decided yet."""

    response: Turn
    check: asyncio.Task[str] | None = None


class Conversation:
    """The state of one voice conversation (see the module docstring)."""

    def __init__(self, stages: Stages, settings: SessionSettings, *, history: ChatHistory | None = None,
                 session_id: str | None = None, info: dict[str, str] | None = None,
                 observer: Observer | None = None, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] | None = None) -> None:
        self.stages = stages
        self.settings = settings
        self.history = history or ChatHistory(settings.system_prompt)
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.observer: Observer = observer or NullObserver()
        self._info = info or {}
        self._clock = clock
        self._t0 = clock()
        self.on_change = on_change  # told when the turns change (the session journal writes then)
        self._out = Outbox(settings.send_queue, on_put=self._on_event)
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
        self._queued_at_close: list[UserInput] = []  # (still unanswered: the journal keeps them)
        self._unanswered: list[UserInput] = []  # committed without auto-respond
        self._carry: UserInput | None = None  # words of a discarded turn, said before the next ones
        self._recent: OrderedDict[int, Turn] = OrderedDict()
        self._barge: _BargeIn | None = None
        self._paused_key: tuple[int, int] | None = None  # the pause speculation/EOT signals belong to
        self._listener = Listener(stages, settings, self._tasks, clock)
        #: how far behind real time the client's audio arrives (admission watches it)
        self.input_lag = InputLag(clock=clock)
        # the answer before this one may be sent but not yet committed: the model sees it too
        self._answers = AnswerProducer(stages, lambda: self.settings, self.history, lambda: self._response, clock)
        self._tools = ToolCalls(lambda: self.settings, self.history, self.emit, self._tasks, self.observer,
                                say=self._say, floor_taken=self._floor_taken, respond=self._continue,
                                lock=self._lock, clock=clock)

    # --- output side ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int((self._clock() - self._t0) * 1000)

    def _stamp(self, event: ev.Event, audio_ms: float | None = None) -> ev.Event:
        event.server_time_ms = self.now_ms()
        event.audio_time_ms = int(self._listener.in_ms if audio_ms is None else audio_ms)
        return event

    async def emit(self, event: ev.Event, audio_ms: float | None = None) -> None:
        await self._out.put(self._stamp(event, audio_ms))

    async def events(self) -> AsyncIterator[ev.Event]:
        """Events for the client, until the conversation is closed."""
        while (item := await self._out.get()) is not None:
            yield item

    async def start(self, *, resume_token: str = "", restored: dict[str, Any] | None = None) -> None:
        """Say the session started. ``restored``: the journal entry this session continues (its
        history is already in place); its user turns that were never answered are answered now."""
        await self.emit(ev.SessionStarted(
            session_id=self.session_id, output_sample_rate=self.settings.output_sample_rate,
            mode=self.settings.mode, llm_model=self._info.get("llm_model", ""),
            asr_model=self._info.get("asr_model", ""), resume_token=resume_token,
            resumed=restored is not None, restored_turns=len(self.history)))
        if restored is None:
            return
        self._next_response = max(self._next_response, int(restored.get("next_response", 1)))
        for text in restored.get("unanswered", []):
            await self.push_text(text, respond=False)
        for text in restored.get("pending", []):
            await self.push_text(text)

    # --- the session journal ---------------------------------------------------------------------

    #: Events after which the journal's copy of the conversation is out of date.
    _TURN_CHANGES = (ev.FinalTranscript, ev.InputCommitted, ev.ResponseStarted, ev.ResponseDone,
                     ev.ResponseInterrupted, ev.ToolCallDone, ev.ToolResultAccepted, ev.ToolCallCancelled)

    def _on_event(self, event: ev.Event) -> None:
        if self.on_change is not None and isinstance(event, self._TURN_CHANGES):
            self.on_change()

    def state(self) -> dict[str, Any]:
        """What another replica needs to continue this conversation (``services.conversation.snapshot``)."""
        return capture(session_id=self.session_id, settings=self.settings, history=self.history,
                       response=self._response, queued=list(self._queue or self._queued_at_close),
                       unanswered=self._unanswered,
                       next_response=self._next_response, carried=self._carry)

    @property
    def at_turn_boundary(self) -> bool:
        """Nothing is being said by either side: a good moment to move the session."""
        return not self.response_in_progress and not self._queue and not self._listener.segmenter.in_speech

    async def wait_turn_boundary(self, timeout_s: float) -> bool:
        """Wait until ``at_turn_boundary`` (True) or ``timeout_s`` passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._closed and not self.at_turn_boundary:
            left = deadline - loop.time()
            if left <= 0:
                return False
            # the user's speech ends without a _notify: look again at least every 100 ms
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
        return True

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
        # as it arrives, before waiting for the engine; at the rate of now (session.update may change it)
        self.input_lag.push(samples.size / self.settings.input_sample_rate)
        async with self._lock:
            self._check_open()
            events = await self._listener.push(samples)
            if events is None:
                return
            for event in events:
                await self._on_vad(event)
            await self._after_audio()

    async def _on_vad(self, event: VADEvent) -> None:
        if isinstance(event, SpeechStart):
            await self.emit(ev.SpeechStarted(), audio_ms=self._listener.vad_origin_ms + event.start_ms)
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
        seg = self._listener.segmenter
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
            self._listener.maybe_partial(self.emit)
            return
        key = (seg.speech_start_ms or 0, seg.silence_start_ms or 0)
        if self._paused_key != key and silence >= self.settings.turn.speculate_after_ms:
            self._paused_key = key
            # when the speech stopped (not now): a speculation is due from there
            stopped = self._listener.wall_at(self._listener.vad_origin_ms + (seg.silence_start_ms or 0))
            await self._on_pause(seg.utterance_so_far(), stopped)
        eot = self._listener.end_of_turn
        if self._paused_key == key and eot.wants_score(silence):
            eot.start_score(silence)
            audio = seg.current_audio()  # with the silence so far: the model hears the pause too
            if audio is not None:
                self._listener.score_end_of_turn(eot, audio)
        if self._paused_key == key and eot.decide(silence):
            event = seg.end_now()
            if event is not None:
                await self._turn_over(event)

    # --- end of turn and speculation -----------------------------------------------------------

    async def _on_pause(self, audio: np.ndarray | None, stopped: float | None = None) -> None:
        """The silence after speech reached ``speculate_after_ms``: start the transcript the end of
        turn needs and, if the output is free, a speculative answer (which makes that transcript)."""
        if audio is None or audio.size == 0:
            return
        eot = self._listener.end_of_turn
        eot.reset()
        semantic = self.settings.turn.mode == "semantic"
        await self._discard_speculation()
        r = self._response
        output_free = r is None or r.ended or r.state is TurnState.SENT
        if self.settings.turn.speculate and self.settings.auto_respond and output_free:
            now = self._clock()
            user = UserInput(0, audio, None, now, now if stopped is None else min(stopped, now))
            self._spec = self._new_turn(user, speculative=True)
            self._spec_key = self._paused_key
            self.observer.speculation("started")
            if semantic:
                self._listener.follow_transcript(eot, self._spec.transcript)
        elif semantic:
            self._listener.transcribe_for(eot, audio)

    async def _discard_speculation(self) -> None:
        spec, self._spec, self._spec_key = self._spec, None, None
        if spec is not None:
            await spec.end(TurnState.DISCARDED, "speech_resumed", carry=False)
            self.observer.speculation("discarded")

    async def _turn_over(self, event: SpeechEnd) -> None:
        """The user's turn ended (``event`` holds its audio): release the speculation or answer it."""
        self._paused_key = None
        self._listener.cancel_partial()
        audio = event.audio
        end_ms = self._listener.vad_origin_ms + event.end_ms
        await self.emit(ev.SpeechStopped(utterance_ms=int(1000 * audio.size / MODEL_RATE)), audio_ms=end_ms)
        user_stop = self._listener.wall_at(end_ms)
        spec, key = self._spec, self._spec_key
        self._spec, self._spec_key = None, None
        input_id = self._take_input_id()
        await self.emit(ev.InputCommitted(input_id=input_id, utterance_ms=int(1000 * audio.size / MODEL_RATE)))
        await self._tools.cancel_all("barge_in")  # the user spoke on: no answer waits for those results
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
        seg = self._listener.segmenter
        cfg = self.settings.interruptions
        if not barge.response.live or barge.response.state is not TurnState.PAUSED:
            self._barge = None  # the answer ended meanwhile (cancelled by the client, error)
            return
        if seg.in_speech and seg.silence_ms < cfg.resume_silence_ms:
            if seg.speech_ms >= cfg.min_duration_ms and barge.check is None:
                barge.check = self._tasks.spawn(self._listener.transcribe_burst(seg.utterance_so_far()),
                                                name="barge-check")
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
            text = await self._listener.transcribe_burst(audio)
        except VoxError:
            text = "?"  # unknown words: a long burst is taken as a turn
        verdict = classify_barge_in(text, cfg)
        if verdict == "turn":
            await self._interrupt_for_barge_in()
            return True
        await self._resume_after_barge_in(verdict)
        return False

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
        self._listener.segmenter.drop()  # it was not a turn: nothing of it is answered or kept
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
            await self._tools.cancel_all("barge_in")
            if not respond:
                self._unanswered.append(user)
                return
            await self._answer(user)

    def playback(self, response_id: int, played_ms: int, underruns: int = 0, underrun_ms: float = 0.0) -> None:
        """The client says how much of a response's audio the user has heard (and, optionally, the
        stalls its player heard in it so far)."""
        turn = self._turn_by_id(response_id)
        if turn is not None and not turn.ended:
            turn.playback.report(played_ms, underruns, underrun_ms)

    async def commit_audio(self) -> None:
        """End the user's turn now (push-to-talk): the audio so far is the utterance."""
        async with self._lock:
            self._check_open()
            if self._listener.manual:
                await self._commit_manual()
                return
            event = self._listener.segmenter.end_now("flush")
            if event is None:
                raise FailedPrecondition("no speech to commit: the voice activity detector heard none")
            if self._barge is not None:
                await self._interrupt_for_barge_in()
            await self._turn_over(event)

    async def _commit_manual(self) -> None:
        event = self._listener.take_manual()
        if event is None:
            raise FailedPrecondition("no audio to commit: send audio first")
        await self._turn_over(event)

    async def clear_audio(self) -> None:
        """Drop the user's uncommitted audio."""
        async with self._lock:
            self._check_open()
            self._listener.clear_manual()
            self._listener.segmenter.drop()
            self._paused_key = None
            await self._discard_speculation()
            await self.emit(ev.InputCleared())

    async def create_response(self) -> None:
        """Answer now: the inputs committed without auto-respond (or continue the conversation)."""
        async with self._lock:
            self._check_open()
            if self.response_in_progress and not self.filler_in_progress:
                raise FailedPrecondition("a response is already in progress; cancel it first")
            pending, self._unanswered = self._unanswered, []
            audio = [u.audio for u in pending if u.audio is not None]
            text = " ".join(u.text for u in pending if u.text) or None
            now = self._clock()
            results_at = self._tools.take_answer_due()  # the answer after tool results, timed from them
            since = results_at if results_at is not None and not pending else now
            user = UserInput(pending[-1].input_id if pending else 0,
                             np.concatenate(audio) if audio else None, text, since,
                             pending[-1].t_user_stop if pending else since,
                             after_tools=results_at is not None and not pending)
            await self._make_room()  # an answer all sent (e.g. tool calls only) joins the history first
            if user.audio is None and user.text is None and not len(self.history):
                raise FailedPrecondition("nothing to respond to: send audio or a text item first")
            await self._answer(user)

    async def cancel_response(self) -> None:
        """Stop the answer in progress (history keeps what was heard) and the wait for its tools' results."""
        async with self._lock:
            await self._discard_speculation()
            await self._cancel_current("cancelled")
            await self._tools.cancel_all("cancelled")

    async def submit_tool_result(self, call_id: str, output: str) -> None:
        """The client ran tool call ``call_id``: its ``output`` goes into the history (NotFound for
        an unknown id). With ``tool_calling.auto_continue`` the model answers once every call of
        its response has a result; otherwise ``create_response`` asks for that answer."""
        async with self._lock:
            self._check_open()
            await self._tools.submit(call_id, output)

    @property
    def filler_in_progress(self) -> bool:
        """The answer in progress is a filler said while a tool runs (a new response waits for it)."""
        r = self._response
        return self.response_in_progress and r is not None and bool(r.filler)

    @property
    def pending_tool_calls(self) -> list[str]:
        """Ids of the tool calls whose results are awaited."""
        return self._tools.pending

    def _floor_taken(self) -> bool:
        """An answer is being said, or the user is talking: no filler now."""
        return self.response_in_progress or self._listener.segmenter.in_speech

    async def _say(self, text: str) -> None:
        """Speak a fixed phrase as a response of its own (the filler while a tool runs); the
        caller holds the lock."""
        now = self._clock()
        await self._make_room()
        self._own(self._new_turn(UserInput(0, None, None, now, now), speculative=False, filler=text))

    async def _continue(self, since: float) -> None:
        """The model answers again (tool results are in); ``since``: when the last result came
        (its latency is measured from there). The caller holds the lock."""
        if self._closed:
            return
        await self._answer(UserInput(0, None, None, since, since, after_tools=True))

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
            if self.on_change is not None:
                self.on_change()
            if settings.system_prompt:
                self.history.system_prompt = settings.system_prompt
            if self._listener.configure(settings, previous):
                await self._discard_speculation()
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

    def _new_turn(self, user: UserInput, *, speculative: bool, filler: str = "") -> Turn:
        self._check_open()  # aclose may have run while the caller awaited
        rid, self._next_response = self._next_response, self._next_response + 1
        s = self.settings
        turn = Turn(rid, user, speculative=speculative, history=self.history, outbox=self._out,
                    stamp=self._stamp, playback=PlaybackClock(s.playback, self._clock),
                    held_limit=s.held_events, on_sent=self._on_sent, on_call=self._tools.made, filler=filler,
                    clock=self._clock)
        producer = asyncio.get_running_loop().create_task(self._answers.produce(turn), name=f"turn-{rid}")
        turn.start(producer)
        producer.add_done_callback(lambda task: self._tasks.spawn(self._after_producer(turn, task)))
        return turn

    def _on_sent(self, turn: Turn) -> None:
        if not turn.filler:  # a filler is no answer: admission's latency window must not see it
            self.observer.answered(turn.latency)
        if turn.user.after_tools and turn.latency.first_audio_ms:
            self.observer.tool_call("result_to_audio", turn.latency.first_audio_ms / 1000)
        if turn.calls:
            self._tasks.spawn(self._calls_sent(turn), name=f"calls-{turn.response_id}")
        self._notify()
        if self._queue and turn is self._response:
            self._tasks.spawn(self._next_queued(), name="next-turn")

    async def _calls_sent(self, turn: Turn) -> None:
        """Every call of ``turn`` is out: if their results are all in, the model answers."""
        async with self._lock:
            if not self._closed:
                await self._tools.turn_finished(turn)

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
        self._ended(turn, reason)
        self._notify()

    def _ended(self, turn: Turn, reason: str) -> None:
        self.observer.turn_ended(turn.state.value, reason)
        if turn.playback.first_wall is not None and not turn.filler:
            # stalls are final only now: the client reports what it heard after the last audio went out
            self.observer.played(*turn.playback.stalls())

    async def _cancel_current(self, reason: str) -> None:
        r = self._response
        if r is not None and r.live:
            if self._barge is not None:
                barge, self._barge = self._barge, None
                await cancel_and_wait(barge.check)
            await self._end_turn(r, TurnState.INTERRUPTED, reason)

    # --- closing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the conversation is closed")

    async def end_input(self) -> None:
        """No more input: end an open utterance, let every answer finish, then close."""
        async with self._lock:
            if not self._closed:
                for event in await self._listener.flush():
                    await self._on_vad(event)
            if self._listener.has_manual_audio and not self._closed:
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
        if drain:  # the client still reads (end of input): it is told which calls were cancelled
            await self._tools.cancel_all("closed")
        self._closed = True
        await self._out.close(drop_pending=not drain)
        if not drain:  # a hang-up: nobody may read any more, the events are dropped
            await self._tools.cancel_all("closed")
        self._queued_at_close = list(self._queue)
        self._queue.clear()
        spec, self._spec = self._spec, None
        if spec is not None:
            await spec.end(TurnState.DISCARDED, "closed", carry=False)
        r = self._response
        if r is not None and not r.ended:
            done = r.state is TurnState.SENT and (drain or r.playback_done())
            end = await r.end(TurnState.COMMITTED if done else TurnState.INTERRUPTED, "closed")
            if end.carry is not None and end.carry.full_text():  # never heard: the journal keeps the words
                if self._carry is not None:
                    end.carry.carried = self._carry.full_text()
                self._carry = end.carry
            self._ended(r, "closed")
        await self._tasks.aclose()
        self._notify()

    # --- operator view ---------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """The history as recorded (with interruption flags), for operators and tests."""
        return self.history.records()

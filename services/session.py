"""One conversation: the turn state machine, full duplex, barge-in, history true to what was heard.

``Conversation`` is framework-free. It talks to the four stages through the ``Stages`` protocol,
so the same logic runs in one process (``services.local.LocalStages``: demo, benchmarks) and in
the Ray Serve gateway (DeploymentHandles). The caller feeds input from one task
(``push_audio``/``push_text``/``playback``/``end_input``) and drains ``events()`` from another,
so a reply never blocks listening.

States: LISTENING -> USER_SPEAKING -> THINKING -> SPEAKING -> LISTENING; speech start in any state
goes to USER_SPEAKING and, during THINKING/SPEAKING, interrupts the response (barge-in): its task
is cancelled (which cancels the LLM and TTS streams and so aborts the vLLM request), its queued
audio is dropped from the send queue, and only the text the user heard enters the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services import events as ev
from services.audio import MODEL_RATE, StreamResampler
from services.chunking import ChunkerConfig, TextChunker
from services.errors import VoxError, client_message, status_name
from services.history import ChatHistory
from services.vad import WINDOW, SpeechEnd, SpeechStart, VADConfig, VADSegmenter, VADState

log = logging.getLogger(__name__)

CASCADE, SPEECH_NATIVE = "cascade", "speech_native"


class Stages(Protocol):
    """What a conversation needs from the four stages (local engines or remote deployments)."""

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        """Speech probability per 512-sample window, and the carried detector state."""
        ...

    async def transcribe(self, audio16k: np.ndarray, language: str | None) -> Any:
        """Final transcript (an object with ``text`` and ``language``) of one utterance."""
        ...

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        """Best-effort transcript of a growing utterance; None when the ASR is busy (finals first)."""
        ...

    def generate(
        self, messages: list[dict[str, str]], *, max_tokens: int | None,
        audio: np.ndarray | None = None,
    ) -> AsyncIterator[str]:
        """LLM text deltas; ``audio`` (16 kHz) is the user's turn in speech-native mode."""
        ...

    def synthesize(self, text: str, *, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        """PCM16 audio for ``text`` at ``sample_rate``, streamed."""
        ...


class SessionSettings(BaseModel):
    """Per-conversation settings (from the client's SessionConfig, validated by the gateway)."""

    model_config = ConfigDict(extra="forbid")

    input_sample_rate: int = Field(MODEL_RATE, description="Rate of the client's audio.")
    language: str | None = Field(None, description="Language hint for ASR; None = detect.")
    system_prompt: str = Field("", description="System prompt; '' = the LLM's default.")
    voice: str = Field("", description="TTS voice; '' = the deployment's default.")
    vad: VADConfig = Field(default_factory=VADConfig, description="Turn detection settings.")
    mode: str = Field(CASCADE, description="'cascade' or 'speech_native'.")
    output_sample_rate: int = Field(22050, description="Rate of the answer audio sent.")
    partial_transcripts: bool = Field(False, description="Emit partial transcripts while speaking.")
    partial_interval_ms: int = Field(700, ge=100, description="Min wall time between partials.")
    max_response_tokens: int | None = Field(None, description="Cap on answer tokens; None = LLM default.")
    barge_in: bool = Field(True, description="User speech interrupts the answer.")
    history_turns: int = Field(8, ge=0, description="Turn pairs kept as LLM context.")
    output_chunk_ms: int = Field(100, ge=20, description="Answer audio is sent in pieces of this length.")
    chunker: ChunkerConfig = Field(default_factory=ChunkerConfig, description="LLM text -> TTS chunks.")
    send_queue: int = Field(64, ge=4, description="Events buffered for a slow client before backpressure.")


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[Any]) -> AsyncIterator[None]:
    """Close a stage stream when its consumer stops, cancelled or not. A cancel that lands while
    the consumer awaits something else would otherwise leave the stream open until garbage
    collection, and with it the remote vLLM request or TTS synthesis."""
    try:
        yield
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class State(enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"


class _Outbox:
    """Bounded send queue whose pending payload of an interrupted response can be dropped."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[ev.Event | None] = deque()
        self._maxsize = maxsize
        self._cond = asyncio.Condition()

    async def put(self, item: ev.Event | None) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: len(self._items) < self._maxsize or item is None)
            self._items.append(item)
            self._cond.notify_all()

    async def get(self) -> ev.Event | None:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items))
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    async def purge(self, response_id: int) -> int:
        async with self._cond:
            keep = deque(
                i for i in self._items
                if not (isinstance(i, ev.RESPONSE_PAYLOAD) and i.response_id == response_id)
            )
            dropped = len(self._items) - len(keep)
            self._items = keep
            self._cond.notify_all()
            return dropped


@dataclass
class _Turn:
    """Book-keeping of one response, enough to say what the user heard."""

    response_id: int
    utterance: np.ndarray | None
    user_text: str | None
    t_turn_end: float  # wall time the turn was declared over
    t_user_stop: float  # wall time the user's last speech sample arrived
    generated: str = ""
    audio_ms: float = 0.0
    segments: list[tuple[str, float, float]] = field(default_factory=list)  # text, start, end ms
    first_audio_wall: float | None = None
    played_ms: float | None = None  # from the client's PlaybackPosition
    started: bool = False  # ResponseStarted sent
    answered: bool = False  # ResponseDone sent: the whole answer is in the history
    interrupted: bool = False
    latency: ev.TurnLatency = field(default_factory=ev.TurnLatency)


def heard_text(segments: list[tuple[str, float, float]], played_ms: float) -> str:
    """Words of the answer the user heard, if audio was played up to ``played_ms``.

    A segment heard in part contributes the share of its words played so far (speech rate is
    near constant within a clause, so this is the best estimate without word timestamps).
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


class Conversation:
    """The state machine of one voice conversation."""

    def __init__(self, stages: Stages, settings: SessionSettings, *, history: ChatHistory,
                 session_id: str | None = None, mode_info: dict[str, str] | None = None) -> None:
        self.stages = stages
        self.settings = settings
        self.history = history
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.state = State.LISTENING
        self._mode_info = mode_info or {}
        self._t0 = time.monotonic()
        self._out = _Outbox(settings.send_queue)
        self._resampler = StreamResampler(settings.input_sample_rate, MODEL_RATE)
        self._segmenter = VADSegmenter(settings.vad)
        self._vad_state = VADState()
        self._in_ms = 0.0  # input audio received, ms
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=4096)  # (audio ms, wall)
        self._speech_buf: list[np.ndarray] = []  # audio since speech start (partials)
        self._partial_task: asyncio.Task[None] | None = None
        self._last_partial = 0.0
        self._response: asyncio.Task[None] | None = None
        self._turn: _Turn | None = None
        self._next_id = 1
        self._carry: np.ndarray | None = None  # an utterance whose answer was never heard
        self._closed = False
        self.barge_ins = 0

    # --- output side ----------------------------------------------------------------------

    def now_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000)

    async def emit(self, event: ev.Event, audio_ms: float | None = None) -> None:
        event.server_time_ms = self.now_ms()
        event.audio_time_ms = int(self._in_ms if audio_ms is None else audio_ms)
        await self._out.put(event)

    async def events(self) -> AsyncIterator[ev.Event]:
        """Events to send to the client, until the conversation is closed."""
        while (item := await self._out.get()) is not None:
            yield item

    async def start(self) -> None:
        await self.emit(ev.SessionStarted(
            session_id=self.session_id, output_sample_rate=self.settings.output_sample_rate,
            mode=self.settings.mode, llm_model=self._mode_info.get("llm_model", ""),
            asr_model=self._mode_info.get("asr_model", ""),
        ))

    # --- input side -----------------------------------------------------------------------

    async def push_audio(self, samples: np.ndarray) -> None:
        """Client audio (float32 at the input rate), any chunk size."""
        x = self._resampler.push(samples)
        self._in_ms += 1000.0 * samples.size / self.settings.input_sample_rate
        self._arrivals.append((self._in_ms, time.monotonic()))
        if x.size == 0:
            return
        lead = self._vad_state.leftover
        probs, self._vad_state = await self.stages.vad_probs(x, self._vad_state)
        scored = np.concatenate([lead, x]) if lead.size else x
        for event in self._segmenter.feed(probs, scored[: probs.size * WINDOW]):
            await self._on_vad(event)
        if self.state is State.USER_SPEAKING:
            self._speech_buf.append(x)
            self._maybe_partial()

    async def push_text(self, text: str) -> None:
        """A typed user turn: interrupts any answer and is answered like speech."""
        await self._interrupt()
        now = time.monotonic()
        self._start_response(_Turn(self._take_id(), None, text, now, now))

    def playback(self, response_id: int, played_ms: int) -> None:
        """The client says how much of a response's audio the user has heard."""
        if self._turn is not None and self._turn.response_id == response_id:
            self._turn.played_ms = float(played_ms)

    async def end_input(self) -> None:
        """No more input: close an open utterance, let the answer finish, then close."""
        for event in self._segmenter.flush():
            await self._on_vad(event)
        if self._response is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._response
        await self.aclose()

    async def aclose(self) -> None:
        """Stop everything this conversation started (disconnect, cancel, error)."""
        if self._closed:
            return
        self._closed = True
        for task in (self._partial_task, self._response):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._out.put(None)

    # --- turn logic -----------------------------------------------------------------------

    def _take_id(self) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        return rid

    def _wall_at(self, audio_ms: float) -> float:
        """Wall time at which input audio up to ``audio_ms`` had arrived."""
        for pos, wall in self._arrivals:
            if pos >= audio_ms:
                return wall
        return time.monotonic()

    async def _on_vad(self, event: object) -> None:
        if isinstance(event, SpeechStart):
            if self.settings.barge_in:
                await self._interrupt()
            self.state = State.USER_SPEAKING
            self._speech_buf = []
            await self.emit(ev.SpeechStarted(), audio_ms=event.start_ms)
        elif isinstance(event, SpeechEnd):
            self._cancel_partial()
            audio = event.audio
            await self.emit(ev.SpeechStopped(utterance_ms=int(1000 * audio.size / MODEL_RATE)),
                            audio_ms=event.end_ms)
            if self._carry is not None:
                audio = np.concatenate([self._carry, audio])
                self._carry = None
            if self._response is not None and not self._response.done():
                return  # barge-in is off and an answer is playing: the turn is ignored
            turn = _Turn(self._take_id(), audio, None, time.monotonic(),
                         self._wall_at(event.end_ms))
            self._start_response(turn)

    def _start_response(self, turn: _Turn) -> None:
        self._turn = turn
        self.state = State.THINKING
        self._response = asyncio.create_task(self._respond(turn), name=f"response-{turn.response_id}")

    async def _interrupt(self) -> None:
        """Barge-in: stop the current answer now and record only what was heard."""
        task, turn = self._response, self._turn
        if turn is None or turn.interrupted:
            return
        if task is None or task.done():
            await self._interrupt_playback(turn)
            return
        turn.interrupted = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await self._out.purge(turn.response_id)
        if not turn.started:  # still transcribing: nothing was said, keep the user's words
            if turn.utterance is not None:
                self._carry = turn.utterance
            return
        self.barge_ins += 1
        played = self._played_ms(turn)
        heard = heard_text(turn.segments, played)
        if turn.audio_ms > 0:
            if turn.user_text:  # speech-native turns whose transcript is not back are dropped
                self.history.add_user(turn.user_text)
                self.history.add_assistant(heard, interrupted=True)
        elif turn.utterance is not None:  # no audio reached the user: not answered at all
            self._carry = turn.utterance
        await self.emit(ev.ResponseInterrupted(
            response_id=turn.response_id, heard_text=heard, heard_ms=int(played),
            generated_text=turn.generated,
        ))

    async def _interrupt_playback(self, turn: _Turn) -> None:
        """Barge-in after the whole answer was sent but while the client still plays it."""
        played = self._played_ms(turn)
        if not turn.answered or played >= turn.audio_ms - 1:
            return  # nothing left unheard
        turn.interrupted = True
        self.barge_ins += 1
        heard = heard_text(turn.segments, played)
        self.history.truncate_last_assistant(heard)
        await self.emit(ev.ResponseInterrupted(
            response_id=turn.response_id, heard_text=heard, heard_ms=int(played),
            generated_text=turn.generated,
        ))

    def _played_ms(self, turn: _Turn) -> float:
        if turn.played_ms is not None:
            return min(turn.played_ms, turn.audio_ms)
        if turn.first_audio_wall is None:
            return 0.0
        # No playback report: assume the client plays in real time from the first chunk.
        return min(turn.audio_ms, 1000.0 * (time.monotonic() - turn.first_audio_wall))

    # --- partial transcripts ----------------------------------------------------------------

    def _maybe_partial(self) -> None:
        if not self.settings.partial_transcripts:
            return
        now = time.monotonic()
        busy = self._partial_task is not None and not self._partial_task.done()
        if busy or (now - self._last_partial) * 1000 < self.settings.partial_interval_ms:
            return
        self._last_partial = now
        audio = np.concatenate(self._speech_buf)
        self._partial_task = asyncio.create_task(self._partial(audio))

    async def _partial(self, audio: np.ndarray) -> None:
        try:
            text = await self.stages.partial_transcribe(audio, self.settings.language)
        except VoxError:
            return
        if text and text.strip() and self.state is State.USER_SPEAKING:
            await self.emit(ev.PartialTranscript(text=text.strip()))

    def _cancel_partial(self) -> None:
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()
        self._partial_task = None

    # --- one response -----------------------------------------------------------------------

    async def _respond(self, turn: _Turn) -> None:
        try:
            await self._respond_inner(turn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed turn is reported; the conversation goes on
            if not isinstance(exc, VoxError):
                log.exception("response %s failed", turn.response_id)
            await self.emit(ev.ErrorEvent(code=status_name(exc), message=client_message(exc)))
        finally:
            if self.state in (State.THINKING, State.SPEAKING):
                self.state = State.LISTENING

    async def _respond_inner(self, turn: _Turn) -> None:
        s, lat = self.settings, turn.latency
        t_now = time.monotonic
        audio_in: np.ndarray | None = None
        if turn.utterance is not None:
            lat.vad_end_delay_ms = 1000 * (turn.t_turn_end - turn.t_user_stop)
            if s.mode == SPEECH_NATIVE:
                audio_in = turn.utterance
                # ASR runs beside the LLM, off the latency path: transcript for the client and history.
                asr_task: asyncio.Task[None] | None = asyncio.create_task(self._native_transcript(turn))
            else:
                asr_task = None
                t = t_now()
                result = await self.stages.transcribe(turn.utterance, s.language)
                lat.asr_ms = 1000 * (t_now() - t)
                turn.user_text = result.text.strip()
                await self.emit(ev.FinalTranscript(
                    text=turn.user_text, language=result.language or "",
                    utterance_ms=int(1000 * turn.utterance.size / MODEL_RATE)))
                if not turn.user_text:
                    return  # noise, cough, breath: nothing to answer
        else:
            asr_task = None
        # The turn enters the history only once answered (or heard in part, on barge-in).
        messages = self.history.messages(max(1, 2 * s.history_turns))
        if not s.history_turns:
            messages = [m for m in messages if m["role"] == "system"]
        messages.append({"role": "user", "content": turn.user_text or ""})
        turn.started = True
        await self.emit(ev.ResponseStarted(response_id=turn.response_id))
        text_q: asyncio.Queue[str | None] = asyncio.Queue(maxsize=16)
        speaker = asyncio.create_task(self._speak(turn, text_q))
        try:
            chunker = TextChunker(s.chunker)
            t_llm = t_now()
            n_tokens = 0
            llm_stream = self.stages.generate(messages, max_tokens=s.max_response_tokens, audio=audio_in)
            async with _closing(llm_stream):
                async for delta in llm_stream:
                    if n_tokens == 0:
                        lat.llm_first_token_ms = 1000 * (t_now() - t_llm)
                    n_tokens += 1
                    turn.generated += delta
                    await self.emit(ev.TextDelta(response_id=turn.response_id, text=delta))
                    for chunk in chunker.push(delta):
                        await text_q.put(chunk)
            gen_s = t_now() - t_llm
            lat.llm_tokens = n_tokens
            lat.llm_tokens_per_s = n_tokens / gen_s if gen_s > 0 else 0.0
            for chunk in chunker.flush():
                await text_q.put(chunk)
            await text_q.put(None)
            await speaker
            if asr_task is not None:
                await asr_task
                asr_task = None
        finally:
            if not speaker.done():
                speaker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await speaker
            if asr_task is not None and not asr_task.done():
                asr_task.cancel()
        if turn.user_text:
            self.history.add_user(turn.user_text)
            self.history.add_assistant(turn.generated.strip())
        turn.answered = True
        lat.total_ms = 1000 * (t_now() - turn.t_turn_end)
        await self.emit(ev.ResponseDone(
            response_id=turn.response_id, text=turn.generated.strip(),
            audio_ms=int(turn.audio_ms), latency=lat))

    async def _native_transcript(self, turn: _Turn) -> None:
        assert turn.utterance is not None
        result = await self.stages.transcribe(turn.utterance, self.settings.language)
        turn.user_text = result.text.strip()
        await self.emit(ev.FinalTranscript(text=turn.user_text, language=result.language or "",
                                           utterance_ms=int(1000 * turn.utterance.size / MODEL_RATE)))

    async def _speak(self, turn: _Turn, text_q: asyncio.Queue[str | None]) -> None:
        """TTS consumer: speaks chunks in order while the LLM is still generating."""
        s, lat = self.settings, turn.latency
        rate = s.output_sample_rate
        piece_bytes = 2 * max(1, rate * s.output_chunk_ms // 1000)
        while (chunk := await text_q.get()) is not None:
            start_ms = turn.audio_ms
            turn.segments.append((chunk, start_ms, start_ms))
            t_tts = time.monotonic()
            first_in_segment = True
            pending = b""
            tts_stream = self.stages.synthesize(chunk, voice=s.voice, sample_rate=rate)
            async with _closing(tts_stream):
                async for pcm in tts_stream:
                    if lat.tts_first_audio_ms == 0.0:
                        lat.tts_first_audio_ms = 1000 * (time.monotonic() - t_tts)
                    pending += pcm
                    while len(pending) >= piece_bytes:
                        piece, pending = pending[:piece_bytes], pending[piece_bytes:]
                        await self._send_audio(turn, piece, chunk if first_in_segment else "")
                        first_in_segment = False
            if pending:
                await self._send_audio(turn, pending, chunk if first_in_segment else "")
            turn.segments[-1] = (chunk, start_ms, turn.audio_ms)

    async def _send_audio(self, turn: _Turn, pcm: bytes, text: str) -> None:
        rate = self.settings.output_sample_rate
        if turn.first_audio_wall is None:
            turn.first_audio_wall = time.monotonic()
            self.state = State.SPEAKING
            lat = turn.latency
            lat.first_audio_ms = 1000 * (turn.first_audio_wall - turn.t_turn_end)
            lat.voice_to_voice_ms = 1000 * (turn.first_audio_wall - turn.t_user_stop)
        await self.emit(ev.AudioOut(response_id=turn.response_id, pcm16=pcm, sample_rate=rate,
                                    offset_ms=int(turn.audio_ms), text=text))
        turn.audio_ms += 1000.0 * (len(pcm) // 2) / rate
        text_seg = turn.segments[-1]
        turn.segments[-1] = (text_seg[0], text_seg[1], turn.audio_ms)


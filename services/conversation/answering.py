"""The answering side of a conversation: one answer, ASR -> LLM -> text chunks -> TTS -> the turn.

``AnswerProducer.produce(turn)`` is the body of a ``Turn``'s producer task: it transcribes the
user's audio (or hands it to a speech-native LLM), streams the LLM's deltas into a ``TTSStream``
and the synthesized audio into the turn in ``output_chunk_ms`` pieces. Everything it sends goes
through ``turn.put``, so the turn decides what is held (speculation), paused or dropped; it never
touches the history (only the turn writes it) nor picks which turn runs (the conversation does).
Cancelling the producer cancels the LLM and TTS streams, which aborts the engines' work.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from services.batching import Priority
from services.conversation import events as ev
from services.conversation.aio import cancel_and_wait
from services.conversation.history import ChatHistory
from services.conversation.settings import SPEECH_NATIVE, SessionSettings
from services.conversation.stages import Stages, deadline_stream, within
from services.conversation.tts_stream import SynthesizedAudio, TTSStream
from services.conversation.turn import Turn, TurnState
from services.errors import InvalidArgument, VoxError
from services.tools import ToolCallDelta, ToolChoice, ToolSpec, check_arguments

#: Longest a call's arguments may take to check against the tool's schema.
CHECK_ARGUMENTS_S = 1.0


class _CallReader:
    """Tool-call items of one answer's LLM stream -> the turn's tool-call events, each call
    checked against its tool's schema when done (a call that does not match is reported, not made)."""

    def __init__(self, turn: Turn, tools: dict[str, ToolSpec]) -> None:
        self._turn = turn
        self._tools = tools
        self._ids: dict[int, str] = {}

    async def on_delta(self, delta: ToolCallDelta) -> None:
        turn = self._turn
        call_id = self._ids.get(delta.index)
        if call_id is None:
            call_id = self._ids[delta.index] = f"call_{uuid.uuid4().hex[:20]}"
            await turn.put(ev.ToolCallStarted(response_id=turn.response_id, call_id=call_id,
                                              name=delta.name, index=delta.index))
        if delta.arguments_delta:
            await turn.put(ev.ToolCallArguments(response_id=turn.response_id, call_id=call_id,
                                                delta=delta.arguments_delta))
        if delta.done:
            error = ""
            tool = self._tools.get(delta.name)
            try:
                if tool is None:
                    raise InvalidArgument(f"the model called {delta.name!r}, which is not among the session's tools")
                # in a thread, bounded: a client's schema may hold a regex that backtracks for long
                async with asyncio.timeout(CHECK_ARGUMENTS_S):
                    await asyncio.to_thread(check_arguments, tool, delta.arguments)
            except InvalidArgument as exc:
                error = exc.message
            except TimeoutError:
                error = f"checking the arguments of {delta.name} against its schema took over {CHECK_ARGUMENTS_S:g} s"
            await turn.put(ev.ToolCallDone(response_id=turn.response_id, call_id=call_id, name=delta.name,
                                           arguments=delta.arguments, error=error))
            if error:
                await turn.put(ev.ErrorEvent(code="INVALID_ARGUMENT", response_id=turn.response_id,
                                             message=f"tool call {call_id} not made: {error}", tool_call_id=call_id))


class NothingToSay(Exception):
    """The utterance had no words (noise, breath): the turn ends without an answer."""


class AnswerProducer:
    """Produces answers for one conversation; ``settings`` is read at each answer (it may change)."""

    def __init__(self, stages: Stages, settings: Callable[[], SessionSettings], history: ChatHistory,
                 output_owner: Callable[[], Turn | None], clock: Callable[[], float]) -> None:
        self.stages = stages
        self._settings = settings
        self._history = history
        self._output_owner = output_owner
        self._clock = clock

    def messages(self, turn: Turn) -> list[dict[str, Any]]:
        """What the LLM sees for ``turn``, once its user text is known."""
        messages = self._history.messages(2 * self._settings().history_turns)
        r = self._output_owner()
        if r is not None and r is not turn and r.state is TurnState.SENT:
            # not committed yet, but it will be played in full before this answer
            for entry in r.history_entries():
                if messages and entry["role"] == messages[-1]["role"] == "user":
                    messages[-1] = {"role": "user", "content": f"{messages[-1]['content']} {entry['content']}"}
                else:
                    messages.append(entry)
        content = turn.user.full_text()
        if not content and turn.user.audio is None:
            return messages  # create_response with nothing new: the model continues
        if messages and messages[-1]["role"] == "user":  # the user spoke twice: one message
            messages[-1] = {"role": "user", "content": f"{messages[-1]['content']} {content}".strip()}
        else:
            messages.append({"role": "user", "content": content})
        return messages

    @property
    def _timeouts(self) -> Any:
        return self._settings().timeouts

    async def produce(self, turn: Turn) -> None:
        s, lat, user, t = self._settings(), turn.latency, turn.user, self._timeouts
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
            turn.transcript.set_result("" if turn.filler else user.text or "")
        try:
            await turn.put(ev.ResponseStarted(response_id=turn.response_id, input_id=user.input_id,
                                              filler=bool(turn.filler)))
            if turn.filler:
                await self._say(turn, turn.filler)
            else:
                await self._generate_and_speak(turn, audio_in)
            if side_asr is not None:
                await side_asr
        finally:
            await cancel_and_wait(side_asr)
        await turn.put(ev.ResponseDone(response_id=turn.response_id, text=turn.generated.strip(),
                                       audio_ms=int(turn.audio_ms), latency=lat, filler=bool(turn.filler)))

    async def _side_transcript(self, turn: Turn) -> None:
        """Speech-native: the transcript for the client and the history, off the latency path. A
        failure here does not fail the answer the user already hears."""
        user = turn.user
        assert user.audio is not None
        try:
            result = await within(self.stages.transcribe(user.audio, self._settings().language, Priority.SPECULATIVE),
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
        s, lat, t = self._settings(), turn.latency, self._timeouts
        messages = self.messages(turn)
        tts = TTSStream(self._synthesizer(turn), sample_rate=s.output_sample_rate, chunker=s.chunker,
                        buffer_ms=lambda: self._buffer_ms(turn), lookahead=s.playout.tts_lookahead,
                        cut_lead_ms=s.playout.cut_lead_ms)
        async with tts:
            speaker = asyncio.get_running_loop().create_task(self._speak(turn, tts), name="speak")
            try:
                t_llm = self._clock()
                tokens = 0
                tools, choice = self._tools_for(turn, audio)
                # stages that predate tools are still called the old way when there are none
                extra: dict[str, Any] = {"tools": tools, "tool_choice": choice} if tools else {}
                if tools and turn.user.after_tools and choice is not None and choice.mode == "none":
                    extra["words_only"] = True  # the answer that reads the results out: no JSON in it
                stream = self.stages.generate(messages, max_tokens=s.max_response_tokens, audio=audio, **extra)
                calls = _CallReader(turn, {t.name: t for t in s.tools})
                async for delta in deadline_stream(stream, t.llm_first_token_s, t.llm_stall_s, "the LLM"):
                    if tokens == 0:
                        lat.llm_first_token_ms = 1000 * (self._clock() - t_llm)
                    tokens += 1
                    if isinstance(delta, ToolCallDelta):
                        await calls.on_delta(delta)
                        continue
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

    def _tools_for(self, turn: Turn, audio: np.ndarray | None) -> tuple[list[ToolSpec] | None, ToolChoice | None]:
        """The session's tools for this answer: none for audio turns (speech-native LLMs take
        none). A continuation (nothing new from the user, e.g. after tool results) answers in
        words unless ``tool_calling.tools_after_results``; even then it may answer in words when
        the session requires a call, or it would call tools forever."""
        s = self._settings()
        if not s.tools or audio is not None:
            return None, None
        choice = s.choice
        if not turn.user.full_text() and turn.user.audio is None:
            if not s.tool_calling.tools_after_results:
                choice = ToolChoice("none")  # still the tool model: it reads the calls and results
            elif choice.constrained:
                choice = ToolChoice("auto")
        return list(s.tools), choice

    async def _say(self, turn: Turn, text: str) -> None:
        """A fixed phrase (a filler while a tool runs), spoken as an answer of its own."""
        s = self._settings()
        turn.generated = text
        await turn.put(ev.TextDelta(response_id=turn.response_id, text=text))
        tts = TTSStream(self._synthesizer(turn), sample_rate=s.output_sample_rate, chunker=s.chunker,
                        buffer_ms=lambda: self._buffer_ms(turn), lookahead=s.playout.tts_lookahead)
        async with tts:
            tts.push_text(text)
            tts.end_input()
            await self._speak(turn, tts)

    def _slack_s(self, turn: Turn) -> float:
        s = self._settings()
        return turn.audio_slack_s((s.turn.min_silence_ms + s.playout.speculative_slack_ms) / 1000)

    def _buffer_ms(self, turn: Turn) -> float | None:
        """Audio the caller has in hand, for sizing chunks; None (the fixed schedule) while the
        answer is not playing (a speculation, or paused)."""
        if not turn.live or turn.state is TurnState.PAUSED:
            return None
        return max(0.0, 1000 * self._slack_s(turn))

    def _synthesizer(self, turn: Turn) -> Callable[[str], AsyncIterator[bytes]]:
        s, t, lat = self._settings(), self._timeouts, turn.latency

        # Chunks asked for ahead (lookahead) and not yet spoken: their words will play before
        # the next chunk's, so that chunk is due that much later (it must not take a slot from
        # a caller who needs one sooner).
        ahead: dict[int, int] = {}
        ids = itertools.count()

        async def synthesize(text: str) -> AsyncIterator[bytes]:
            t0, key = self._clock(), next(ids)
            slack = self._slack_s(turn) + sum(ahead.values()) * s.playout.speech_ms_per_word / 1000
            ahead[key] = len(text.split())
            try:
                stream = self.stages.synthesize(text, voice=s.voice, sample_rate=s.output_sample_rate,
                                                slack_s=slack)
                async for pcm in deadline_stream(stream, t.tts_first_audio_s, t.tts_stall_s, "speech synthesis"):
                    ahead.pop(key, None)  # its audio is now counted in the turn's own figures
                    if lat.tts_first_audio_ms == 0.0:
                        lat.tts_first_audio_ms = 1000 * (self._clock() - t0)
                    yield pcm
            finally:
                ahead.pop(key, None)

        return synthesize

    async def _speak(self, turn: Turn, tts: TTSStream) -> None:
        """TTS audio -> the turn's output in ``output_chunk_ms`` pieces, keeping each text chunk's
        span of the answer audio (what ``heard_text`` reads)."""
        s = self._settings()
        rate = s.output_sample_rate
        piece_bytes = 2 * max(1, rate * s.output_chunk_ms // 1000)
        pending = b""
        chunk_index = -1
        label = ""
        async for piece in tts:
            assert isinstance(piece, SynthesizedAudio)
            if piece.chunk_index != chunk_index:
                if pending:
                    await self._send_piece(turn, pending, label, rate)
                    pending, label = b"", ""
                chunk_index = piece.chunk_index
                turn.segments.append((piece.text, turn.audio_ms, turn.audio_ms))
                label = piece.text
            pending += piece.pcm if isinstance(piece.pcm, bytes) else bytes(piece.pcm)
            while len(pending) >= piece_bytes:
                out, pending = pending[:piece_bytes], pending[piece_bytes:]
                await self._send_piece(turn, out, label, rate)
                label = ""
            if piece.is_last_in_chunk and pending:
                await self._send_piece(turn, pending, label, rate)
                pending, label = b"", ""
        if pending:
            await self._send_piece(turn, pending, label, rate)

    @staticmethod
    async def _send_piece(turn: Turn, pcm: bytes, text: str, rate: int) -> None:
        event = ev.AudioOut(response_id=turn.response_id, pcm16=pcm, sample_rate=rate,
                            offset_ms=int(turn.audio_ms), text=text)
        turn.audio_ms += 1000.0 * (len(pcm) // 2) / rate
        seg_text, seg_start, _ = turn.segments[-1]
        turn.segments[-1] = (seg_text, seg_start, turn.audio_ms)
        await turn.put(event)

"""Reference Converse client: streams speech at real-time pace like a microphone would, plays the
answer in simulated real time, and measures what a caller feels.

Latency is measured on the client's clock only: ``voice_to_voice_ms`` runs from the moment the
end of the speech in a turn's audio was sent (found by its energy, so a file's trailing silence
does not shorten the figure) to the moment the first answer audio arrived. Between turns the
client keeps streaming silence (a live microphone), which is what lets the server see the end of
the turn; in push-to-talk sessions (``turn_detection.mode = MANUAL``) it instead ends each spoken
turn with ``CommitInput`` and sends no audio between turns.

Events are routed to turns by the server's ids: ``InputCommitted`` gives each user turn an
``input_id``, ``FinalTranscript`` and ``ResponseStarted`` name it, and every later answer event
names its ``response_id``. ``ResponsePaused`` / ``ResponseResumed`` / ``ResponseInterrupted``
pause, resume and stop the simulated playback, so what the user "heard" (reported back with
``PlaybackPosition``) is what a real player would have played.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from clients.audio import float_to_pcm16, speech_end
from clients.tools import LocalTools
from protos.voxserve.v1 import voice_pb2 as pb
from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc

#: Environment variable the reference client reads its API key from.
API_KEY_ENV = "VOXSERVE_API_KEY"
MAX_MESSAGE = 16 * 1024 * 1024


@dataclass
class UserTurn:
    """One thing the caller says: speech audio (at the session's input rate) or a text turn."""

    audio: np.ndarray | None = None
    text: str | None = None
    barge_in_after_ms: float | None = None
    """Start this turn this long after the previous answer's first audio (an interruption)."""
    label: str = ""
    restored: bool = False
    """Said before the session moved, committed (``text``: its transcript) but not answered: the
    server answers it after the resume, so nothing is sent; the turn waits for that answer."""


@dataclass
class TurnResult:
    """What the caller experienced in one turn (times in ms, client clock)."""

    label: str = ""
    transcript: str = ""
    partials: list[str] = field(default_factory=list)
    response_text: str = ""
    response_id: int = 0
    audio_ms: float = 0.0
    voice_to_voice_ms: float | None = None
    first_transcript_ms: float | None = None
    first_text_ms: float | None = None
    underrun_ms: float = 0.0
    underruns: int = 0
    interrupted: bool = False
    heard_text: str = ""
    server_latency: dict[str, float] = field(default_factory=dict)
    error: str = ""
    t_speech_end: float = 0.0
    """Client clock (time.monotonic) when the end of the speech was sent (text turns: when the text
    was sent); 0 until then. Latencies above run from it."""
    speech_end_ms: float = 0.0
    """Where the speech ends in the turn's audio (ms from its start; the whole audio if no speech
    was found). 0 for text turns."""
    input_id: int = 0
    """The server's id of the user input the answer answered (InputCommitted / ResponseStarted)."""
    speculative: bool = False
    """The server started the answer before the turn was over (TurnLatency.speculative)."""
    paused: int = 0
    """Times the answer was paused by speech over it (ResponsePaused)."""
    resumed: int = 0
    """Times the paused answer resumed (ResponseResumed: the speech was noise or a backchannel)."""
    interrupt_reason: str = ""
    """ResponseInterrupted.reason when the answer was cut off (barge_in, text_turn, error, ...)."""
    early_answers: int = 0
    """Answers the server started on part of this turn (its end of turn fired inside the turn)
    that the rest of the turn then interrupted; the fields above describe the last answer."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Tools the model called in this turn: name, arguments, output (run here), error."""
    result_to_audio_ms: float | None = None
    """Last tool result sent -> first audio of the answer that uses it (client clock)."""
    committed: bool = False
    """The server took the turn in (its InputCommitted or final transcript came)."""
    answered: bool = False
    """Its answer ended (ResponseDone, or interrupted by the user): not to be asked again."""
    restored: bool = False
    """The server answered it after a resume (``UserTurn.restored``)."""


@dataclass
class SessionResult:
    turns: list[TurnResult]
    status: str = "OK"
    details: str = ""
    session_id: str = ""
    output_sample_rate: int = 0
    audio: list[bytes] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    resume_token: str = ""
    """The newest token to resume this session with (SessionStarted, SessionMoved)."""
    moved: bool = False
    """The server moved the session (SessionMoved): reconnect with ``resume_token``."""
    resumed: bool = False
    restored_turns: int = 0
    t_started: float = 0.0
    """Client clock when SessionStarted came (0: it never did)."""
    extra_answers: int = 0
    """Answers that ended for a turn that already had a newer one (a turn answered twice)."""

    def answer_audio(self) -> np.ndarray:
        raw = b"".join(self.audio)
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("audio")
        return d


class _Player:
    """Simulated real-time playback of one response: tracks underruns, pauses and what was heard.

    The playback clock runs from the first chunk, minus the time the buffer was dry (stalls) and
    the time it was paused; ``stop`` freezes it for good (an interrupted answer).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start: float | None = None
        self.queued_ms = 0.0
        self.stall_ms = 0.0
        self.underruns = 0
        self.paused_at: float | None = None
        self.paused_ms = 0.0
        self.stopped_at: float | None = None

    def _clock_ms(self, now: float) -> float:
        assert self.start is not None
        t = self.paused_at if self.paused_at is not None else now
        if self.stopped_at is not None:
            t = min(t, self.stopped_at)
        return 1000 * (t - self.start) - self.stall_ms - self.paused_ms

    def add(self, now: float, ms: float) -> None:
        if self.stopped_at is not None:
            return  # the answer was stopped: nothing more of it is played
        if self.start is None:
            self.start = now
            if self.paused_at is not None:  # paused before its first audio: the pause starts now
                self.paused_at = now
        elif self.paused_at is None:
            ahead = self.queued_ms - self._clock_ms(now)
            if ahead < 0:  # the buffer ran dry before this chunk arrived: audible gap
                self.stall_ms += -ahead
                self.underruns += 1
        self.queued_ms += ms

    def played_ms(self, now: float) -> float:
        if self.start is None:
            return 0.0
        return max(0.0, min(self.queued_ms, self._clock_ms(now)))

    def pause(self, now: float) -> None:
        if self.paused_at is None and self.stopped_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        if self.paused_at is not None:
            if self.start is not None:
                self.paused_ms += 1000 * (now - self.paused_at)
            self.paused_at = None

    def stop(self, now: float) -> None:
        if self.stopped_at is None:
            self.stopped_at = now

    @property
    def paused(self) -> bool:
        return self.paused_at is not None and self.stopped_at is None

    def done_at(self) -> float:
        """When playback ends (infinity while paused: it ends only after a resume or a stop)."""
        if self.stopped_at is not None:
            return self.stopped_at
        if self.paused_at is not None:
            return float("inf")
        return (self.start or 0.0) + (self.queued_ms + self.stall_ms + self.paused_ms) / 1000


@dataclass
class _TurnState:
    """Routing state of one turn (private to ``converse``)."""

    audio_turn: bool
    inputs: dict[int, str] = field(default_factory=dict)  # input_id -> its final transcript
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class VoiceClient:
    """One gRPC channel; ``converse`` runs a whole conversation of user turns."""

    def __init__(self, address: str, api_key: str | None = None) -> None:
        """``api_key`` (default: $VOXSERVE_API_KEY) is sent as ``authorization: Bearer <key>``."""
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
        self.stub = pb_grpc.VoiceAssistantStub(self.channel)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        #: Call metadata every RPC of this client sends (the API key, if any).
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()

    async def close(self) -> None:
        await self.channel.close()

    async def converse(self, turns: list[UserTurn], config: pb.SessionConfig | None = None, *,
                       chunk_ms: int = 20, realtime: bool = True, pause_ms: float = 300,
                       trailing_silence_ms: float = 1200, wait_playback: bool = True,
                       turn_timeout_s: float = 120, on_event: Callable[[pb.ServerEvent], None] | None = None,
                       tools: LocalTools | None = None, idle_timeout_s: float | None = None) -> SessionResult:
        """Speak each turn, wait for its answer (and its playback), then the next one.

        A turn with ``barge_in_after_ms`` is spoken while the previous answer is still playing,
        that long into its playback. With ``config.turn_detection.mode == MANUAL`` (push-to-talk)
        each spoken turn is followed by ``CommitInput`` and no audio is sent between turns.

        With ``tools`` (declared in ``config.tools``), each call the model makes is run here and its
        result sent back; the turn then waits for the answer that uses it.

        A stream that makes no progress for ``idle_timeout_s`` (default: ``turn_timeout_s``) is
        given up with status DEADLINE_EXCEEDED: no event from the server, while the client is not
        busy with a wait of its own (sending, playback, a pause) either, because the server stopped
        taking its messages or it has nothing left to send. A proxy that lost the replica behind
        it can keep a stream open like that, and a caller must not wait on it forever.
        """
        idle_s = turn_timeout_s if idle_timeout_s is None else idle_timeout_s
        progress = [time.monotonic()]  # the client's own last step: a message taken, a wait's tick
        cfg = config or pb.SessionConfig()
        rate = cfg.input_sample_rate or 16000
        manual = cfg.turn_detection.mode == pb.MANUAL
        results: list[TurnResult] = []
        states: list[_TurnState] = []
        session = SessionResult(turns=results)
        by_response: dict[int, int] = {}  # response id -> turn index
        by_input: dict[int, int] = {}  # input id -> turn index
        player = _Player()  # playback of the response playing now
        paused_early: set[int] = set()  # responses paused before their first audio arrived
        # turn being spoken, latest spoken (audio) turn, response playing, turn of the last input
        state: dict[str, int] = {"speaking": -1, "audio": -1, "playing": 0, "last_input": -1}
        samples_per_chunk = max(1, rate * chunk_ms // 1000)
        silence = np.zeros(samples_per_chunk, np.float32)

        async def pace(t_next: float) -> None:
            if realtime:
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))

        def playback_report() -> pb.ClientMessage | None:
            if not state["playing"]:
                return None
            return pb.ClientMessage(playback=pb.PlaybackPosition(
                response_id=state["playing"], played_ms=int(player.played_ms(time.monotonic())),
                underruns=player.underruns, underrun_ms=player.stall_ms))

        started = asyncio.Event()  # SessionStarted came, or the call ended

        async def requests() -> AsyncIterator[pb.ClientMessage]:
            yield pb.ClientMessage(config=cfg)
            # Audio only once the session is admitted: a refused call then ends with its real status.
            # A gRPC Python client still writing when the server ends the call may report INTERNAL
            # "Internal error from Core" instead of that status (grpc/grpc#34148, #36066).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(started.wait(), turn_timeout_s)
            if call.done():
                return
            t_next = time.monotonic()

            async def send_audio(x: np.ndarray, result: TurnResult | None = None,
                                 end: int = 0) -> AsyncIterator[pb.ClientMessage]:
                """Stream ``x`` in chunks at the pace of speech; ``result.t_speech_end`` is set when the
                chunk holding sample ``end - 1`` leaves (at the time that sample is spoken)."""
                nonlocal t_next
                base = t_next
                for i in range(0, x.size, samples_per_chunk):
                    piece = x[i:i + samples_per_chunk]
                    await pace(t_next)
                    t_next += piece.size / rate
                    if result is not None and i < end <= i + piece.size:
                        now = time.monotonic()
                        result.t_speech_end = max(now, base + end / rate) if realtime else now
                    yield pb.ClientMessage(audio=pb.AudioInput(data=float_to_pcm16(piece)))

            async def wait_until(cond: Callable[[], bool], max_s: float) -> AsyncIterator[pb.ClientMessage]:
                """Until ``cond``: a live microphone sends silence; push-to-talk sends nothing. Either
                way, tell the server what the user has heard."""
                nonlocal t_next
                deadline = time.monotonic() + max_s
                while not cond() and time.monotonic() < deadline:
                    progress[0] = time.monotonic()  # waiting by choice, not stuck on the server
                    if manual:
                        await asyncio.sleep(chunk_ms / 1000)
                        t_next = time.monotonic()
                    else:
                        async for msg in send_audio(silence):
                            yield msg
                    if (report := playback_report()) is not None:
                        yield report

            for index, turn in enumerate(turns):
                if turn.restored and index < len(results):  # made before the call (see below)
                    result = results[index]
                    state["speaking"] = index
                    result.t_speech_end = time.monotonic()
                    async for msg in wait_until(states[index].finished.is_set, turn_timeout_s):
                        yield msg
                    continue
                result = TurnResult(label=turn.label or f"turn{index + 1}")
                if turn.barge_in_after_ms is not None and index > 0:
                    prev = states[index - 1].finished

                    def reached(point: float = turn.barge_in_after_ms, prev: asyncio.Event = prev,
                                before: TurnResult = results[index - 1]) -> bool:
                        # By playback, not by the server's ResponseDone: answers arrive faster
                        # than they play, and the user interrupts what they hear.
                        now = time.monotonic()
                        playing = before.response_id != 0 and state["playing"] == before.response_id
                        if playing and player.played_ms(now) >= point:
                            return True
                        return prev.is_set() and (not playing or now >= player.done_at())

                    async for msg in wait_until(reached, turn_timeout_s):
                        yield msg
                    if prev.is_set() and not results[index - 1].interrupted and state["playing"] and \
                            time.monotonic() >= player.done_at():
                        result.error = "the previous answer finished playing before the barge-in point"
                results.append(result)
                states.append(_TurnState(audio_turn=turn.text is None))
                state["speaking"] = index
                if turn.text is not None:
                    result.t_speech_end = time.monotonic()
                    yield pb.ClientMessage(text=pb.TextInput(text=turn.text))
                else:
                    assert turn.audio is not None
                    audio = np.asarray(turn.audio, dtype=np.float32)
                    end = speech_end(audio, rate) or audio.size
                    result.speech_end_ms = 1000 * end / rate
                    state["audio"] = index
                    async for msg in send_audio(audio, result, end):
                        yield msg
                    if not result.t_speech_end:  # empty audio
                        result.t_speech_end = time.monotonic()
                    if manual:
                        yield pb.ClientMessage(commit=pb.CommitInput())
                if index + 1 < len(turns) and turns[index + 1].barge_in_after_ms is not None:
                    continue  # the next turn interrupts this answer
                async for msg in wait_until(states[index].finished.is_set, turn_timeout_s):
                    yield msg
                if index + 1 < len(turns):
                    if wait_playback:
                        async for msg in wait_until(lambda: time.monotonic() >= player.done_at(), 60):
                            yield msg
                    pause_until = time.monotonic() + pause_ms / 1000

                    def paused(until: float = pause_until) -> bool:
                        return time.monotonic() >= until

                    async for msg in wait_until(paused, 60):
                        yield msg
            if not manual:
                async for msg in send_audio(np.zeros(int(rate * trailing_silence_ms / 1000), np.float32)):
                    yield msg
            if (report := playback_report()) is not None:
                yield report
            yield pb.ClientMessage(end_of_input=pb.EndOfInput())

        def turn_of(response_id: int) -> int | None:
            return by_response.get(response_id)

        def adopt(response_id: int) -> int | None:
            """A response the client never saw start (ended before ResponseStarted, e.g. nothing was
            said): it belongs to the turn of the last committed input, else the turn being spoken."""
            index = state["last_input"] if state["last_input"] >= 0 else state["speaking"]
            if index < 0 or not response_id:
                return None
            by_response[response_id] = index
            return index

        def end(index: int) -> None:
            turn = results[index]
            if turn.response_id and state["playing"] == turn.response_id:
                turn.underrun_ms, turn.underruns = player.stall_ms, player.underruns
            states[index].finished.set()

        def on_input_committed(e: pb.InputCommitted) -> None:
            index = -1
            if e.text:  # a typed turn: the first one sent with this text (else any) not committed yet
                waiting = [i for i, st in enumerate(states) if not st.audio_turn and not st.inputs]
                same = [i for i in waiting if (turns[i].text or "").strip() == e.text.strip()]
                index = (same or waiting or [-1])[0]
            if index < 0:
                index = state["audio"] if state["audio"] >= 0 else state["speaking"]
            if index < 0:
                return
            by_input[e.input_id] = index
            states[index].inputs.setdefault(e.input_id, e.text)
            state["last_input"] = index
            results[index].committed = True

        def index_of_input(input_id: int) -> int | None:
            if input_id and input_id in by_input:
                return by_input[input_id]
            return state["speaking"] if state["speaking"] >= 0 else None

        def split_turn(index: int, rid: int, now: float) -> None:
            """The answer to the first part of a turn was interrupted by the rest of it: wait for the
            answer to the whole turn, and measure that one."""
            turn = results[index]
            turn.early_answers += 1
            turn.response_text, turn.voice_to_voice_ms, turn.first_text_ms = "", None, None
            turn.first_transcript_ms, turn.audio_ms, turn.heard_text = None, 0.0, ""
            if state["playing"] == rid:
                player.stop(now)
            states[index].finished.clear()  # in case the early answer had already ended

        results_out: asyncio.Queue[pb.ClientMessage] = asyncio.Queue(maxsize=64)  # tool results to send
        tool_state: dict[str, Any] = {"turn": None, "t_result": 0.0}
        calling: set[int] = set()  # responses that called tools: the turn waits for the next answer
        runs: set[asyncio.Task[None]] = set()

        async def run_tool(index: int, e: pb.ToolCall) -> None:
            record: dict[str, Any] = {"name": e.name, "arguments": e.arguments_json, "call_id": e.call_id}
            results[index].tool_calls.append(record)
            assert tools is not None
            record["output"] = await tools.run(e.name, e.arguments_json)
            tool_state["t_result"] = time.monotonic()
            await results_out.put(pb.ClientMessage(tool_result=pb.ToolResult(call_id=e.call_id,
                                                                             output_json=record["output"])))

        # Turns the server answers by itself after a resume: known before the call, since their
        # InputCommitted may come before the request loop reaches them.
        for said in turns:
            if not said.restored:
                break
            results.append(TurnResult(label=said.label or f"turn{len(results) + 1}", restored=True))
            states.append(_TurnState(audio_turn=False))
        async def taken(source: AsyncIterator[pb.ClientMessage]) -> AsyncIterator[pb.ClientMessage]:
            async for msg in source:
                yield msg
                progress[0] = time.monotonic()  # gRPC took it and asks for the next one

        call = self.stub.Converse(taken(_merged(requests(), results_out)), metadata=self.metadata)
        events = aiter(call)
        reading: asyncio.Future[pb.ServerEvent] | None = None
        try:
            while True:
                # a read is never cancelled (that would cancel the call): it is waited on in slices
                reading = reading or asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({reading}, timeout=min(1.0, idle_s))
                if not done:
                    if time.monotonic() - progress[0] > idle_s:
                        session.status = "DEADLINE_EXCEEDED"
                        session.details = f"no progress on the stream for {idle_s:.0f} s: given up"
                        break
                    continue
                try:
                    event = reading.result()
                except StopAsyncIteration:
                    break
                finally:
                    reading = None
                now = progress[0] = time.monotonic()
                if on_event is not None:
                    on_event(event)
                kind = event.WhichOneof("event") or ""
                session.events.append(kind)
                index: int | None
                speaking = state["speaking"]
                if kind == "session_started":
                    started.set()
                    s = event.session_started
                    session.session_id, session.output_sample_rate = s.session_id, s.output_sample_rate
                    session.resume_token, session.resumed, session.restored_turns = (
                        s.resume_token, s.resumed, s.restored_turns)
                    session.t_started = now
                elif kind == "session_moved":
                    session.resume_token, session.moved = event.session_moved.resume_token, True
                elif kind == "partial_transcript" and speaking >= 0:
                    results[speaking].partials.append(event.partial_transcript.text)
                elif kind == "input_committed":
                    on_input_committed(event.input_committed)
                elif kind == "final_transcript":
                    e = event.final_transcript
                    if (index := index_of_input(e.input_id)) is None:
                        continue
                    turn = results[index]
                    turn.committed = True
                    states[index].inputs[e.input_id] = e.text
                    turn.transcript = " ".join(t for t in states[index].inputs.values() if t) or e.text
                    if turn.first_transcript_ms is None and turn.t_speech_end:
                        turn.first_transcript_ms = 1000 * (now - turn.t_speech_end)
                elif kind == "response_started":
                    e = event.response_started
                    if not e.input_id and tool_state["turn"] is not None:
                        # the answer after tool results (or a filler while they run) is the calling turn's
                        by_response[e.response_id] = tool_state["turn"]
                        if not e.filler:
                            results[tool_state["turn"]].response_id = e.response_id
                        continue
                    if (index := index_of_input(e.input_id)) is None:
                        continue
                    by_response[e.response_id] = index
                    results[index].response_id, results[index].input_id = e.response_id, e.input_id
                elif kind == "text_delta" and (index := turn_of(event.text_delta.response_id)) is not None:
                    turn = results[index]
                    if turn.first_text_ms is None and turn.t_speech_end:
                        turn.first_text_ms = 1000 * (now - turn.t_speech_end)
                    turn.response_text += event.text_delta.text
                elif kind == "audio" and (index := turn_of(event.audio.response_id)) is not None:
                    chunk = event.audio
                    turn = results[index]
                    ms = 1000.0 * (len(chunk.data) // 2) / chunk.sample_rate
                    if turn.tool_calls and turn.result_to_audio_ms is None and tool_state["t_result"] \
                            and chunk.response_id == turn.response_id:
                        turn.result_to_audio_ms = 1000 * (now - tool_state["t_result"])
                    if turn.voice_to_voice_ms is None and turn.t_speech_end:
                        turn.voice_to_voice_ms = 1000 * (now - turn.t_speech_end)
                    if state["playing"] != chunk.response_id:  # a new answer starts playing
                        state["playing"] = chunk.response_id
                        player.reset()
                        if chunk.response_id in paused_early:
                            player.pause(now)
                    player.add(now, ms)
                    turn.audio_ms += ms
                    session.audio.append(chunk.data)
                elif kind == "response_paused" and (index := turn_of(event.response_paused.response_id)) is not None:
                    results[index].paused += 1
                    if state["playing"] == event.response_paused.response_id:
                        player.pause(now)
                    else:
                        paused_early.add(event.response_paused.response_id)
                elif kind == "response_resumed" and (index := turn_of(event.response_resumed.response_id)) is not None:
                    results[index].resumed += 1
                    paused_early.discard(event.response_resumed.response_id)
                    if state["playing"] == event.response_resumed.response_id:
                        player.resume(now)
                elif kind == "response_done" and (index := turn_of(event.response_done.response_id)) is not None:
                    d = event.response_done
                    turn = results[index]
                    if d.response_id != turn.response_id:
                        if turn.answered and d.response_id > turn.response_id:
                            session.extra_answers += 1
                        continue  # an older answer of this turn (or a filler): a newer one is under way
                    turn.response_text = d.text
                    if d.response_id in calling:
                        continue  # it called tools: the answer that uses their results follows
                    turn.server_latency = {f.name: getattr(d.latency, f.name) for f in d.latency.DESCRIPTOR.fields}
                    turn.speculative = bool(d.latency.speculative)
                    turn.answered = True
                    end(index)
                elif kind == "response_interrupted":
                    e = event.response_interrupted
                    index = turn_of(e.response_id)
                    if index is None and (index := adopt(e.response_id)) is None:
                        continue
                    turn = results[index]
                    if turn.response_id and e.response_id != turn.response_id:
                        continue  # an older answer of this turn: a newer one is under way
                    if e.reason == "barge_in" and index == speaking and states[index].audio_turn:
                        # no later turn was spoken: the speech over this answer was this turn's own rest
                        split_turn(index, e.response_id, now)
                        continue
                    turn.interrupted = True
                    turn.answered = e.reason != "closed"  # cut by the session's end: not answered
                    turn.interrupt_reason = e.reason
                    turn.heard_text = e.heard_text
                    turn.response_text = e.generated_text
                    if state["playing"] == e.response_id:
                        player.stop(now)
                    end(index)
                elif kind == "tool_call" and tools is not None and (index := turn_of(event.tool_call.response_id)) \
                        is not None and event.tool_call.done and not event.tool_call.error:
                    calling.add(event.tool_call.response_id)
                    tool_state["turn"] = index
                    task = asyncio.create_task(run_tool(index, event.tool_call))
                    runs.add(task)
                    task.add_done_callback(runs.discard)
                elif kind == "tool_call_cancelled" and tool_state["turn"] is not None \
                        and event.tool_call_cancelled.reason != "timeout":  # after a timeout the model still answers
                    end(tool_state["turn"])  # the user spoke on (or cancelled): no answer comes for that turn
                    tool_state["turn"] = None
                elif kind == "error" and session.moved and not event.error.response_id:
                    continue  # the end of a moved stream (UNAVAILABLE): no turn's error; resume
                elif kind == "error":
                    e = event.error
                    index = turn_of(e.response_id) if e.response_id else None
                    if index is None and e.response_id:
                        index = adopt(e.response_id)
                    if index is not None:
                        # a turn's error: the answer's own end (ResponseInterrupted/Done) follows
                        results[index].error = f"{e.code}: {e.message}"
                    elif speaking >= 0:
                        results[speaking].error = f"{e.code}: {e.message}"
                        states[speaking].finished.set()
        except grpc.aio.AioRpcError as exc:
            session.status = exc.code().name
            session.details = exc.details() or ""
        finally:
            if reading is not None:
                reading.cancel()
            started.set()
            for task in list(runs):
                task.cancel()
            for st in states:
                st.finished.set()
            with contextlib.suppress(Exception):
                call.cancel()
        return session


async def _merged(first: AsyncIterator[pb.ClientMessage],
                  extra: asyncio.Queue[pb.ClientMessage]) -> AsyncIterator[pb.ClientMessage]:
    """The messages of ``first`` and, whenever one is ready, those put in ``extra`` (tool results),
    until ``first`` ends."""
    source = aiter(first)
    nxt: asyncio.Future[pb.ClientMessage] = asyncio.ensure_future(anext(source))
    got: asyncio.Future[pb.ClientMessage] = asyncio.ensure_future(extra.get())
    try:
        while True:
            done, _ = await asyncio.wait({nxt, got}, return_when=asyncio.FIRST_COMPLETED)
            if got in done:
                yield got.result()
                got = asyncio.ensure_future(extra.get())
            if nxt in done:
                try:
                    msg = nxt.result()
                except StopAsyncIteration:
                    return
                yield msg
                nxt = asyncio.ensure_future(anext(source))
    finally:
        for fut in (nxt, got):
            fut.cancel()
        with contextlib.suppress(BaseException):
            await nxt
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


async def synthesize(address: str, text: str, sample_rate: int = 0,
                     api_key: str | None = None) -> tuple[bytes, int]:
    """Call the Synthesize RPC; returns PCM16 and its rate."""
    client = VoiceClient(address, api_key)
    try:
        chunks, rate = [], 0
        async for chunk in client.stub.Synthesize(pb.SynthesizeRequest(text=text, sample_rate=sample_rate),
                                                  metadata=client.metadata):
            chunks.append(chunk.data)
            rate = chunk.sample_rate
        return b"".join(chunks), rate
    finally:
        await client.close()

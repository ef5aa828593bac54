"""Reference Converse client: streams speech at real-time pace like a microphone would, plays the
answer in simulated real time, and measures what a caller feels.

Latency is measured on the client's clock only: ``voice_to_voice_ms`` runs from the moment the
last speech sample of a turn was sent to the moment the first answer audio arrived. Between
turns the client keeps streaming silence (a live microphone), which is what lets the server's
VAD see the end of the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from protos.voxserve.v1 import voice_pb2 as pb
from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc
from services.audio import float_to_pcm16

MAX_MESSAGE = 16 * 1024 * 1024


@dataclass
class UserTurn:
    """One thing the caller says: speech audio (at the session's input rate) or a text turn."""

    audio: np.ndarray | None = None
    text: str | None = None
    barge_in_after_ms: float | None = None
    """Start this turn this long after the previous answer's first audio (an interruption)."""
    label: str = ""


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


@dataclass
class SessionResult:
    turns: list[TurnResult]
    status: str = "OK"
    details: str = ""
    session_id: str = ""
    output_sample_rate: int = 0
    audio: list[bytes] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def answer_audio(self) -> np.ndarray:
        raw = b"".join(self.audio)
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("audio")
        return d


class _Player:
    """Simulated real-time playback of one response: tracks underruns and what was heard."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start: float | None = None
        self.queued_ms = 0.0
        self.stall_ms = 0.0
        self.underruns = 0

    def add(self, now: float, ms: float) -> None:
        if self.start is None:
            self.start = now
        else:
            ahead = self.queued_ms + self.stall_ms - 1000 * (now - self.start)
            if ahead < 0:  # the buffer ran dry before this chunk arrived: audible gap
                self.stall_ms += -ahead
                self.underruns += 1
        self.queued_ms += ms

    def played_ms(self, now: float) -> float:
        if self.start is None:
            return 0.0
        return max(0.0, min(self.queued_ms, 1000 * (now - self.start) - self.stall_ms))

    def done_at(self) -> float:
        return (self.start or 0.0) + (self.queued_ms + self.stall_ms) / 1000


class VoiceClient:
    """One gRPC channel; ``converse`` runs a whole conversation of user turns."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
        self.stub = pb_grpc.VoiceAssistantStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def converse(self, turns: list[UserTurn], config: pb.SessionConfig | None = None, *,
                       chunk_ms: int = 20, realtime: bool = True, pause_ms: float = 300,
                       trailing_silence_ms: float = 1200, wait_playback: bool = True,
                       turn_timeout_s: float = 120, on_event: Callable[[pb.ServerEvent], None] | None = None,
                       ) -> SessionResult:
        """Speak each turn, wait for its answer (and its playback), then the next one.

        A turn with ``barge_in_after_ms`` is spoken while the previous answer is still playing,
        that long after its first audio. Answer events are matched to turns by response id.
        """
        cfg = config or pb.SessionConfig()
        rate = cfg.input_sample_rate or 16000
        results: list[TurnResult] = []
        session = SessionResult(turns=results)
        finished: dict[int, asyncio.Event] = {}  # turn index -> its answer ended (any way)
        by_response: dict[int, int] = {}  # response id -> turn index
        player = _Player()  # playback of the response playing now
        state: dict[str, int] = {"speaking": -1, "playing": 0}  # turn being spoken, response playing
        samples_per_chunk = rate * chunk_ms // 1000
        silence = np.zeros(samples_per_chunk, np.float32)

        async def pace(t_next: float) -> None:
            if realtime:
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))

        async def requests() -> Any:
            yield pb.ClientMessage(config=cfg)
            t_next = time.monotonic()

            async def send_audio(x: np.ndarray) -> Any:
                nonlocal t_next
                for i in range(0, x.size, samples_per_chunk):
                    piece = x[i:i + samples_per_chunk]
                    await pace(t_next)
                    t_next += piece.size / rate
                    yield pb.ClientMessage(audio=pb.AudioInput(data=float_to_pcm16(piece)))

            async def send_silence_until(cond: Callable[[], bool], max_s: float) -> Any:
                deadline = time.monotonic() + max_s
                while not cond() and time.monotonic() < deadline:
                    async for msg in send_audio(silence):
                        yield msg
                    if state["playing"]:  # tell the server what the user heard
                        yield pb.ClientMessage(playback=pb.PlaybackPosition(
                            response_id=state["playing"], played_ms=int(player.played_ms(time.monotonic()))))

            for index, turn in enumerate(turns):
                result = TurnResult(label=turn.label or f"turn{index + 1}")
                if turn.barge_in_after_ms is not None and index > 0:
                    prev = finished[index - 1]

                    def reached(point: float = turn.barge_in_after_ms, prev: asyncio.Event = prev,
                                before: TurnResult = results[index - 1]) -> bool:
                        # By playback, not by the server's ResponseDone: answers arrive faster
                        # than they play, and the user interrupts what they hear.
                        now = time.monotonic()
                        playing = before.response_id != 0 and state["playing"] == before.response_id
                        if playing and player.played_ms(now) >= point:
                            return True
                        return prev.is_set() and (not playing or now >= player.done_at())

                    async for msg in send_silence_until(reached, turn_timeout_s):
                        yield msg
                    if prev.is_set() and not results[index - 1].interrupted and state["playing"] and \
                            time.monotonic() >= player.done_at():
                        result.error = "the previous answer finished playing before the barge-in point"
                results.append(result)
                finished[index] = asyncio.Event()
                state["speaking"] = index
                if turn.text is not None:
                    result.t_speech_end = time.monotonic()
                    yield pb.ClientMessage(text=pb.TextInput(text=turn.text))
                else:
                    assert turn.audio is not None
                    async for msg in send_audio(turn.audio):
                        yield msg
                    # the last speech sample leaves now (paced: at t_next)
                    result.t_speech_end = max(time.monotonic(), t_next if realtime else 0.0)
                if index + 1 < len(turns) and turns[index + 1].barge_in_after_ms is not None:
                    continue  # the next turn interrupts this answer
                async for msg in send_silence_until(finished[index].is_set, turn_timeout_s):
                    yield msg
                if index + 1 < len(turns):
                    if wait_playback:
                        async for msg in send_silence_until(lambda: time.monotonic() >= player.done_at(), 60):
                            yield msg
                    pause_until = time.monotonic() + pause_ms / 1000

                    def paused(until: float = pause_until) -> bool:
                        return time.monotonic() >= until

                    async for msg in send_silence_until(paused, 60):
                        yield msg
            async for msg in send_audio(np.zeros(int(rate * trailing_silence_ms / 1000), np.float32)):
                yield msg
            yield pb.ClientMessage(end_of_input=pb.EndOfInput())

        def turn_of(response_id: int) -> TurnResult | None:
            index = by_response.get(response_id)
            return results[index] if index is not None else None

        def end(turn: TurnResult) -> None:
            turn.underrun_ms, turn.underruns = player.stall_ms, player.underruns
            finished[results.index(turn)].set()

        call = self.stub.Converse(requests())
        try:
            async for event in call:
                now = time.monotonic()
                if on_event is not None:
                    on_event(event)
                kind = event.WhichOneof("event") or ""
                session.events.append(kind)
                speaking = results[state["speaking"]] if state["speaking"] >= 0 else None
                if kind == "session_started":
                    session.session_id = event.session_started.session_id
                    session.output_sample_rate = event.session_started.output_sample_rate
                elif kind == "partial_transcript" and speaking is not None:
                    speaking.partials.append(event.partial_transcript.text)
                elif kind == "final_transcript" and speaking is not None:
                    speaking.transcript = event.final_transcript.text
                    if speaking.first_transcript_ms is None:
                        speaking.first_transcript_ms = 1000 * (now - speaking.t_speech_end)
                elif kind == "response_started" and speaking is not None:
                    speaking.response_id = event.response_started.response_id
                    by_response[speaking.response_id] = state["speaking"]
                elif kind == "text_delta" and (turn := turn_of(event.text_delta.response_id)):
                    if turn.first_text_ms is None:
                        turn.first_text_ms = 1000 * (now - turn.t_speech_end)
                    turn.response_text += event.text_delta.text
                elif kind == "audio" and (turn := turn_of(event.audio.response_id)):
                    chunk = event.audio
                    ms = 1000.0 * (len(chunk.data) // 2) / chunk.sample_rate
                    if turn.voice_to_voice_ms is None:
                        turn.voice_to_voice_ms = 1000 * (now - turn.t_speech_end)
                    if state["playing"] != chunk.response_id:  # a new answer starts playing
                        state["playing"] = chunk.response_id
                        player.reset()
                    player.add(now, ms)
                    turn.audio_ms += ms
                    session.audio.append(chunk.data)
                elif kind == "response_done" and (turn := turn_of(event.response_done.response_id)):
                    d = event.response_done
                    turn.response_text = d.text
                    turn.server_latency = {f.name: getattr(d.latency, f.name) for f in d.latency.DESCRIPTOR.fields}
                    end(turn)
                elif kind == "response_interrupted" and (turn := turn_of(event.response_interrupted.response_id)):
                    turn.interrupted = True
                    turn.heard_text = event.response_interrupted.heard_text
                    turn.response_text = event.response_interrupted.generated_text
                    end(turn)
                elif kind == "error" and speaking is not None:
                    speaking.error = f"{event.error.code}: {event.error.message}"
                    finished[state["speaking"]].set()
        except grpc.aio.AioRpcError as exc:
            session.status = exc.code().name
            session.details = exc.details() or ""
        finally:
            for event_ in finished.values():
                event_.set()
            with contextlib.suppress(Exception):
                call.cancel()
        return session


async def synthesize(address: str, text: str, sample_rate: int = 0) -> tuple[bytes, int]:
    """Call the Synthesize RPC; returns PCM16 and its rate."""
    client = VoiceClient(address)
    try:
        chunks, rate = [], 0
        async for chunk in client.stub.Synthesize(pb.SynthesizeRequest(text=text, sample_rate=sample_rate)):
            chunks.append(chunk.data)
            rate = chunk.sample_rate
        return b"".join(chunks), rate
    finally:
        await client.close()

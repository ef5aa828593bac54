"""The voice graph end to end: a real local Ray Serve app with the real models, over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
import pytest

from clients.voice_client import UserTurn, VoiceClient
from protos.voxserve.v1 import voice_pb2 as pb
from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc
from services.audio import float_to_pcm16
from services.history import INTERRUPTED_MARK
from tests.conftest import cer, converse, handle, say, unfinished_llm_requests, wer

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1200)]

MAX_SESSIONS = 4
MAX_STREAM_S = 40.0
CONFIG = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=16000, language="en")


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    from deployments.profiles import load_serve_config
    from deployments.server import free_port, start_local

    srv = start_local(load_serve_config("cpu"), grpc_port=free_port(), app_overrides={
        "gateway": {"max_sessions": MAX_SESSIONS, "max_stream_s": MAX_STREAM_S, "first_message_timeout_s": 5}})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def whisper():  # type: ignore[no-untyped-def]
    from services.asr import WhisperASR

    return WhisperASR.load()


async def raw_converse(address: str, messages: Iterable[pb.ClientMessage], *, hold_s: float = 0.0,
                       deadline_s: float = 60) -> tuple[grpc.StatusCode, str, list[pb.ServerEvent]]:
    """Send ``messages`` (then keep the stream open ``hold_s``), collect events and the final status."""

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        for m in messages:
            yield m
        await asyncio.sleep(hold_s)

    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.VoiceAssistantStub(channel).Converse(requests(), timeout=deadline_s)
        events: list[pb.ServerEvent] = []
        try:
            async for event in call:
                events.append(event)
            return grpc.StatusCode.OK, "", events
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", events


def audio_msg(x: np.ndarray) -> pb.ClientMessage:
    return pb.ClientMessage(audio=pb.AudioInput(data=float_to_pcm16(x)))


async def test_spoken_question_answered_with_text_and_audio(server, whisper) -> None:  # type: ignore[no-untyped-def]
    question = "What is the capital of France?"
    kinds: list[str] = []
    result = await converse(server.grpc_address, [UserTurn(audio=say(question))], CONFIG,
                            on_event=lambda e: kinds.append(e.WhichOneof("event") or ""))
    assert result.status == "OK", result.details
    turn = result.turns[0]
    assert wer(question, turn.transcript) < 0.2, turn.transcript
    assert turn.response_text.strip(), "no answer text"
    assert turn.audio_ms > 500, "no answer audio"
    assert turn.voice_to_voice_ms is not None and turn.voice_to_voice_ms > 0
    assert turn.server_latency["first_audio_ms"] > 0 and turn.server_latency["llm_tokens"] > 0
    order = ["session_started", "speech_started", "speech_stopped", "final_transcript", "response_started",
             "text_delta", "audio", "response_done"]
    assert [k for k in dict.fromkeys(kinds) if k in order] == order
    # The answer audio says the answer text.
    answer = result.answer_audio()
    from services.audio import resample

    heard = await whisper.transcribe(resample(answer, result.output_sample_rate, 16000), "en")
    assert cer(turn.response_text, heard.text) <= 0.15, (turn.response_text, heard.text)


async def test_two_turns_keep_history(server) -> None:  # type: ignore[no-untyped-def]
    turns = [UserTurn(audio=say("My name is Alice.")), UserTurn(audio=say("What is my name?"))]
    # A caller who lets the answer finish playing: speaking earlier would be a barge-in.
    result = await converse(server.grpc_address, turns, CONFIG)
    assert result.status == "OK", result.details
    assert all(t.response_text for t in result.turns), [t.error for t in result.turns]
    history = await handle("Gateway").session_history.remote(result.session_id)
    chat = [(m["role"], m["content"]) for m in history if m["role"] != "system"]
    assert [r for r, _ in chat] == ["user", "assistant", "user", "assistant"]
    assert wer("My name is Alice.", chat[0][1]) < 0.34
    assert chat[1][1] == result.turns[0].response_text
    assert wer("What is my name?", chat[2][1]) < 0.34


async def test_barge_in_stops_answer_and_keeps_only_heard_text(server) -> None:  # type: ignore[no-untyped-def]
    events: list[tuple[str, int]] = []

    def record(e: pb.ServerEvent) -> None:
        kind = e.WhichOneof("event") or ""
        rid = getattr(getattr(e, kind), "response_id", 0) if kind else 0
        events.append((kind, rid))

    turns = [UserTurn(audio=say("Tell me a long story about a brave knight who fights a dragon.")),
             UserTurn(audio=say("Stop. What is two plus two?"), barge_in_after_ms=1500)]
    config = pb.SessionConfig(input_sample_rate=16000, language="en", max_response_tokens=120)
    result = await converse(server.grpc_address, turns, config, on_event=record)
    assert result.status == "OK", result.details
    first, second = result.turns
    assert first.interrupted, f"the first answer was not interrupted ({first.error})"
    heard = first.heard_text.split()
    assert heard, "nothing recorded as heard although audio played"
    full = first.response_text.split() if first.response_text else []
    # Heard text is a prefix of what was generated, and shorter than a whole long answer.
    assert full[: len(heard)] == heard or not full
    # Nothing of the interrupted answer reaches the client after the interruption.
    cut = events.index(("response_interrupted", 1))
    assert not [e for e in events[cut:] if e[1] == 1 and e[0] in ("audio", "text_delta")]
    assert second.response_text, "the barge-in question was not answered"
    history = await handle("Gateway").session_history.remote(result.session_id)
    assistant = [m["content"] for m in history if m["role"] == "assistant"]
    assert assistant[0] == first.heard_text + INTERRUPTED_MARK
    assert await unfinished_llm_requests() == 0


async def test_disconnect_aborts_llm_request(server) -> None:  # type: ignore[no-untyped-def]
    question = say("Tell me a long story about the history of Rome.")
    silence = np.zeros(320, np.float32)

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        yield pb.ClientMessage(config=pb.SessionConfig(input_sample_rate=16000, max_response_tokens=400))
        for i in range(0, question.size, 320):
            yield audio_msg(question[i:i + 320])
        for _ in range(500):  # an open microphone
            await asyncio.sleep(0.02)
            yield audio_msg(silence)

    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        call = pb_grpc.VoiceAssistantStub(channel).Converse(requests())
        async for event in call:
            if event.WhichOneof("event") == "text_delta":
                call.cancel()  # the caller hangs up while the LLM is generating
                break
    assert await unfinished_llm_requests() == 0
    stats = await handle("Gateway").stats.remote()
    for _ in range(40):
        if stats["active_sessions"] == 0:
            break
        await asyncio.sleep(0.25)
        stats = await handle("Gateway").stats.remote()
    assert stats["active_sessions"] == 0


async def test_bad_input_gets_status_while_good_session_completes(server) -> None:  # type: ignore[no-untyped-def]
    client = VoiceClient(server.grpc_address)
    good = asyncio.create_task(client.converse([UserTurn(audio=say("What is the capital of Italy?"))], CONFIG))
    ok_config = pb.ClientMessage(config=CONFIG)
    speech = say("Hello.")
    cases = {
        "audio before config": ([audio_msg(speech)], grpc.StatusCode.FAILED_PRECONDITION),
        "float32 encoding": ([pb.ClientMessage(config=pb.SessionConfig(input_encoding=pb.FLOAT32))],
                             grpc.StatusCode.INVALID_ARGUMENT),
        "unsupported rate": ([pb.ClientMessage(config=pb.SessionConfig(input_sample_rate=12345))],
                             grpc.StatusCode.OUT_OF_RANGE),
        "odd-length pcm": ([ok_config, pb.ClientMessage(audio=pb.AudioInput(data=b"\x00" * 321))],
                           grpc.StatusCode.INVALID_ARGUMENT),
        "oversized message": ([ok_config, pb.ClientMessage(audio=pb.AudioInput(data=b"\x00" * 300_000))],
                              grpc.StatusCode.RESOURCE_EXHAUSTED),
        "over-long stream": ([ok_config] + [audio_msg(np.zeros(16000, np.float32))] * int(MAX_STREAM_S + 2),
                             grpc.StatusCode.RESOURCE_EXHAUSTED),
        "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT),
        "empty text turn": ([ok_config, pb.ClientMessage(text=pb.TextInput(text="  "))],
                            grpc.StatusCode.INVALID_ARGUMENT),
        "second config": ([ok_config, ok_config], grpc.StatusCode.FAILED_PRECONDITION),
        "bad vad threshold": ([pb.ClientMessage(config=pb.SessionConfig(vad=pb.VADSettings(threshold=1.5)))],
                              grpc.StatusCode.OUT_OF_RANGE),
        "speech-native without audio model": (
            [pb.ClientMessage(config=pb.SessionConfig(response_mode=pb.SPEECH_NATIVE))],
            grpc.StatusCode.FAILED_PRECONDITION),
    }
    try:
        for name, (messages, expected) in cases.items():
            code, details, _ = await raw_converse(server.grpc_address, messages)
            assert code == expected, f"{name}: got {code.name} ({details})"
            assert details and "Traceback" not in details, f"{name}: unhelpful details {details!r}"
        result = await good
    finally:
        await client.close()
    assert result.status == "OK", result.details
    assert result.turns[0].response_text and result.turns[0].audio_ms > 0


async def test_overload_gets_resource_exhausted_fast(server) -> None:  # type: ignore[no-untyped-def]
    holders = [asyncio.create_task(raw_converse(server.grpc_address, [pb.ClientMessage(config=CONFIG)], hold_s=20))
               for _ in range(MAX_SESSIONS)]
    for _ in range(80):  # wait until every holder is admitted
        if (await handle("Gateway").stats.remote())["active_sessions"] >= MAX_SESSIONS:
            break
        await asyncio.sleep(0.25)
    code, details, _ = await raw_converse(server.grpc_address, [pb.ClientMessage(config=CONFIG)], deadline_s=10)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    for task in holders:
        task.cancel()
    await asyncio.gather(*holders, return_exceptions=True)


async def test_synthesize_and_transcribe_helpers(server) -> None:  # type: ignore[no-untyped-def]
    text = "The weather is lovely today, so let us go for a walk."
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.VoiceAssistantStub(channel)
        chunks = [c async for c in stub.Synthesize(pb.SynthesizeRequest(text=text, sample_rate=16000))]
        assert chunks and all(c.sample_rate == 16000 for c in chunks)
        audio = np.frombuffer(b"".join(c.data for c in chunks), "<i2").astype(np.float32) / 32768
        padded = np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(16000, np.float32)])

        async def requests() -> AsyncIterator[pb.TranscribeRequest]:
            yield pb.TranscribeRequest(config=pb.TranscribeConfig(sample_rate=16000, language="en"))
            for i in range(0, padded.size, 1600):
                yield pb.TranscribeRequest(audio=pb.AudioInput(data=float_to_pcm16(padded[i:i + 1600])))

        finals = [e async for e in stub.Transcribe(requests())]
        assert wer(text, " ".join(e.text for e in finals)) < 0.2, [e.text for e in finals]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [c async for c in stub.Synthesize(pb.SynthesizeRequest(text="   "))]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

"""The voice graph end to end: a real local Ray Serve app with the real models, over gRPC.

Each behaviour of the conversation engine tested on fake stages in test_conversation.py has at
least one test here through the real engines (Moonshine, Smart Turn, vLLM, Piper) and Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
import pytest

from clients.voice_client import UserTurn, VoiceClient
from protos.voxserve.v1 import voice_pb2 as pb
from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc
from services.audio import float_to_pcm16
from services.conversation import SessionSettings
from tests.conftest import cer, converse, handle, say, unfinished_llm_requests, wer

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1200)]

MAX_SESSIONS = 4
MAX_STREAM_S = 40.0
AUDIO_TIMEOUT_S = 2.0
CONFIG = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=16000, language="en")


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    from deployments.profiles import load_serve_config
    from deployments.server import free_port
    from tests.graph_app import start_observed

    config = load_serve_config("cpu")
    for dep in config["applications"][0]["deployments"]:
        if dep["name"] == "Gateway":  # one replica at its max: a full gateway refuses (the growing
            dep["autoscaling_config"]["max_replicas"] = 1  # case is test_autoscaling_graph.py's)
    srv = start_observed(config, grpc_port=free_port(), app_overrides={
        "gateway": {"max_sessions": MAX_SESSIONS, "max_stream_s": MAX_STREAM_S, "first_message_timeout_s": 5,
                    "client_audio_timeout_s": AUDIO_TIMEOUT_S}})
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


async def recent_llm_requests(n: int = 64) -> list[dict]:  # type: ignore[type-arg]
    return list(await handle("LLM").recent_requests.remote(n))


# --- answering ----------------------------------------------------------------------------------------


async def test_every_path_of_the_first_turn_was_warmed_before_traffic(server) -> None:  # type: ignore[no-untyped-def]
    """The first turn after start must be as fast as the second: every engine it touches ran once
    before the first session (asserted on what ran, not on time)."""
    stats = await handle("Gateway").stats.remote()
    assert set(stats["warm_up_s"]) == {"stage_info", "vad", "end_of_turn", "asr", "llm", "tts", "count_tokens"}
    asr = await handle("ASR").info.remote()
    assert asr["engines"] and all(e["warm_up_s"] is not None for e in asr["engines"].values()), asr


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
    order = ["session_started", "speech_started", "speech_stopped", "input_committed", "final_transcript",
             "response_started", "text_delta", "audio", "response_done"]
    assert [k for k in dict.fromkeys(kinds) if k in order] == order
    # The answer audio says the answer text.
    from services.audio import resample

    # Two independent listeners: a misheard word of one ASR ("Paris is the" -> "parrises that", CER
    # 0.16 for Whisper base once) is not the audio's fault; the audio must say the text to one.
    from services.moonshine_asr import MoonshineASR

    audio16k = resample(result.answer_audio(), result.output_sample_rate, 16000)
    moonshine = MoonshineASR.load()
    try:
        heard = [(await whisper.transcribe(audio16k, "en")).text, (await moonshine.transcribe(audio16k, "en")).text]
    finally:
        moonshine.close()
    assert min(cer(turn.response_text, h) for h in heard) <= 0.15, (turn.response_text, heard)


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


#: Eight questions and words an on-topic answer mentions.
TOPICS = {
    "What is the capital of France?": ("paris", "france"),
    "What color is the sky on a clear day?": ("blue", "sky"),
    "How many legs does a spider have?": ("spider", "legs", "eight", "8"),
    "What do bees make?": ("honey", "bee"),
    "What is the opposite of hot?": ("cold", "hot"),
    "Which animal says moo?": ("cow", "moo"),
    "What do we use to write on a blackboard?": ("chalk", "blackboard", "board"),
    "What is frozen water called?": ("ice", "frozen", "water"),
}


async def test_eight_typed_questions_get_eight_different_answers_on_topic(server) -> None:  # type: ignore[no-untyped-def]
    """Defect 11: from the third typed turn on every answer was '…' (each typed turn counted as a
    barge-in, the history filled with markers, and the small model imitated them). Each question
    is sent right after the previous answer's ResponseDone, by a client that plays no audio."""
    config = pb.SessionConfig(input_sample_rate=16000, language="en", playback=pb.PLAYBACK_NONE)
    done: asyncio.Queue[str] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        yield pb.ClientMessage(config=config)
        for question in TOPICS:
            yield pb.ClientMessage(text=pb.TextInput(text=question))
            await done.get()
        yield pb.ClientMessage(end_of_input=pb.EndOfInput())

    answers: list[str] = []
    session_id = ""
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        async for e in pb_grpc.VoiceAssistantStub(channel).Converse(requests(), timeout=300):
            kind = e.WhichOneof("event")
            if kind == "session_started":
                session_id = e.session_started.session_id
            elif kind == "response_done":
                answers.append(e.response_done.text.strip())
                done.put_nowait(e.response_done.text)
            assert kind not in ("response_interrupted", "error"), e
    # The defect made every answer from the third on the same marker (2 distinct answers); a small
    # sampled model may still repeat an earlier answer word for word now and then (one repeat in
    # CI, two in a fresh clone on a Zen 3), which is not it: the on-topic check below is the proof.
    assert len(answers) == 8 and all(answers) and len(set(answers)) >= 5, answers
    assert not [a for a in answers if "…" in a], answers
    on_topic = [any(re.search(rf"\b{w}", a.lower()) for w in words) for a, words in zip(answers, TOPICS.values(),
                                                                                        strict=True)]
    assert sum(on_topic) >= 6, list(zip(TOPICS, answers, strict=True))
    history = await handle("Gateway").session_history.remote(session_id)
    assert not [m for m in history if m["role"] == "assistant" and (m["interrupted"] or "…" in m["content"])]
    assert [m["role"] for m in history if m["role"] != "system"] == ["user", "assistant"] * 8


async def test_system_prompt_over_the_token_limit_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    """Defect 4/10: a long system prompt was accepted and then failed every turn (or stalled others)."""
    prompt = "Du bist ein hilfreicher Sprachassistent. Antworte kurz und freundlich auf Deutsch. " * 95
    code, details, _ = await raw_converse(server.grpc_address, [pb.ClientMessage(
        config=pb.SessionConfig(input_sample_rate=16000, system_prompt=prompt[:7990]))])
    assert code == grpc.StatusCode.OUT_OF_RANGE and "tokens" in details, details


# --- speculation, end of turn --------------------------------------------------------------------------


async def test_pause_inside_a_sentence_is_one_turn_and_its_speculation_is_aborted(server) -> None:  # type: ignore[no-untyped-def]
    """A pause inside a sentence: the speculative answer started in the pause is discarded (its LLM
    request aborted if it still runs, none of its audio sent) and the whole sentence is one turn."""
    before = {r["request_id"] for r in await recent_llm_requests()}
    # Piper reads any cut text with a final intonation; "that we could" still sounds unfinished
    first, rest = say("So I was thinking that we could"), say("go to the beach tomorrow.")
    pause = np.zeros(int(0.7 * 16000), np.float32)
    config = pb.SessionConfig(input_sample_rate=16000, language="en", max_response_tokens=200)
    kinds: list[str] = []
    result = await converse(server.grpc_address, [UserTurn(audio=np.concatenate([first, pause, rest]))], config,
                            on_event=lambda e: kinds.append(e.WhichOneof("event") or ""))
    assert result.status == "OK", result.details
    assert kinds.count("input_committed") == 1 and kinds.count("response_started") == 1, kinds
    assert wer("So I was thinking that we could go to the beach tomorrow", result.turns[0].transcript) < 0.25
    new = [r for r in await recent_llm_requests() if r["request_id"] not in before]
    # The speculation's request, if one started, is gone: aborted while it ran, or, with the CPU
    # engine's ~70 tok/s, already finished inside the 0.7 s pause (its answer then simply unused).
    # That a discard aborts a running request is pinned by the engine's state in test_conversation
    # (test_speculation_discarded_when_the_user_speaks_on_aborts_and_sends_nothing).
    assert len(new) in (1, 2) and all(r["finish_reason"] in ("abort", "stop", "length") for r in new), new
    assert await unfinished_llm_requests() == 0


async def test_finished_question_uses_its_speculation(server) -> None:  # type: ignore[no-untyped-def]
    result = await converse(server.grpc_address, [UserTurn(audio=say("How many days are in a week?"))], CONFIG)
    assert result.status == "OK", result.details
    lat = result.turns[0].server_latency
    assert lat["speculative"], lat
    assert lat["vad_end_delay_ms"] < 700, lat  # ended at the short silence, not the 1.5 s fallback


# --- interruptions ---------------------------------------------------------------------------------------


async def test_barge_in_stops_answer_and_keeps_only_heard_text(server) -> None:  # type: ignore[no-untyped-def]
    events: list[tuple[str, int]] = []

    def record(e: pb.ServerEvent) -> None:
        kind = e.WhichOneof("event") or ""
        rid = getattr(getattr(e, kind), "response_id", 0) if kind else 0
        events.append((kind, rid))

    before = {r["request_id"] for r in await recent_llm_requests()}
    turns = [UserTurn(audio=say("Tell me a long story about a brave knight who fights a dragon.")),
             UserTurn(audio=say("Stop. What is two plus two?"), barge_in_after_ms=1500)]
    config = pb.SessionConfig(input_sample_rate=16000, language="en", max_response_tokens=300)
    result = await converse(server.grpc_address, turns, config, on_event=record)
    assert result.status == "OK", result.details
    first, second = result.turns
    assert first.interrupted, f"the first answer was not interrupted ({first.error})"
    assert ("response_paused", first.response_id) in events  # pause, then decide
    heard = first.heard_text.split()
    assert heard, "nothing recorded as heard although audio played"
    full = first.response_text.split() if first.response_text else []
    assert full[: len(heard)] == heard or not full  # a prefix of what was generated
    cut = events.index(("response_interrupted", first.response_id))
    assert not [e for e in events[cut:] if e[1] == first.response_id and e[0] in ("audio", "text_delta")]
    assert second.response_text, "the barge-in question was not answered"
    history = await handle("Gateway").session_history.remote(result.session_id)
    assistant = [m for m in history if m["role"] == "assistant"]
    assert assistant[0]["content"] == first.heard_text and assistant[0]["interrupted"]
    # the first answer's vLLM request was aborted, long before its 300 tokens
    new = {r["request_id"]: r for r in await recent_llm_requests() if r["request_id"] not in before}
    assert any(r["finish_reason"] == "abort" and r["tokens"] < 300 for r in new.values()), new
    assert await unfinished_llm_requests() == 0


async def test_backchannel_over_the_answer_resumes_it(server) -> None:  # type: ignore[no-untyped-def]
    kinds: list[str] = []
    turns = [UserTurn(audio=say("Tell me about the moon in three sentences.")),
             UserTurn(audio=say("Okay."), barge_in_after_ms=800)]
    config = pb.SessionConfig(input_sample_rate=16000, language="en", max_response_tokens=120)
    # "Okay." gets no answer of its own: the client gives up waiting for one after 8 s
    result = await converse(server.grpc_address, turns, config, turn_timeout_s=8,
                            on_event=lambda e: kinds.append(e.WhichOneof("event") or ""))
    assert result.status == "OK", result.details
    assert "response_paused" in kinds and "response_resumed" in kinds, kinds
    assert "response_interrupted" not in kinds and kinds.count("response_started") == 1, kinds
    history = await handle("Gateway").session_history.remote(result.session_id)
    assert [m["role"] for m in history if m["role"] != "system"] == ["user", "assistant"]


async def test_barge_in_off_answers_afterwards(server) -> None:  # type: ignore[no-untyped-def]
    """Defect 8: with barge-in off the user's words during an answer were thrown away."""
    config = pb.SessionConfig(input_sample_rate=16000, language="en", disable_barge_in=True,
                              max_response_tokens=60)
    turns = [UserTurn(audio=say("Tell me about the sun.")),
             UserTurn(audio=say("What is the capital of Italy?"), barge_in_after_ms=500)]
    result = await converse(server.grpc_address, turns, config)
    assert result.status == "OK", result.details
    assert not result.turns[0].interrupted and result.turns[1].response_text, [t.error for t in result.turns]
    assert wer("What is the capital of Italy?", result.turns[1].transcript) < 0.3


# --- hang-ups, bad input, health --------------------------------------------------------------------------


async def test_hang_ups_always_abort(server) -> None:  # type: ignore[no-untyped-def]
    """Defect 9: a cancel at the first audio left vLLM generating (Ray proxy race) in 3 of 15 runs.
    Each repetition asks for a long answer and hangs up at its first audio; within the watchdog's
    bound the request is aborted and the session gone, every time."""
    question = say("Tell me a very long story about the history of Rome.")
    silence = np.zeros(320, np.float32)
    config = pb.SessionConfig(input_sample_rate=16000, language="en", max_response_tokens=1024)
    for attempt in range(10):
        before = {r["request_id"] for r in await recent_llm_requests()}
        async def requests() -> AsyncIterator[pb.ClientMessage]:
            yield pb.ClientMessage(config=config)
            for i in range(0, question.size, 320):
                yield audio_msg(question[i:i + 320])
            for _ in range(1000):  # an open microphone
                await asyncio.sleep(0.02)
                yield audio_msg(silence)

        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            call = pb_grpc.VoiceAssistantStub(channel).Converse(requests())
            async for event in call:
                if event.WhichOneof("event") == "audio":
                    call.cancel()  # the caller hangs up at the first audio
                    break
        assert await unfinished_llm_requests(within_s=3) == 0, f"attempt {attempt}"
        new = [r for r in await recent_llm_requests() if r["request_id"] not in before]
        assert new and new[-1]["finish_reason"] == "abort" and new[-1]["tokens"] < 1024, (attempt, new)
        for _ in range(40):
            if (await handle("Gateway").stats.remote())["active_sessions"] == 0:
                break
            await asyncio.sleep(0.25)
        assert (await handle("Gateway").stats.remote())["active_sessions"] == 0, f"attempt {attempt}"


async def test_silent_client_is_taken_as_gone(server) -> None:  # type: ignore[no-untyped-def]
    """The watchdog: audio that stops without EndOfInput ends the stream (and its work) in seconds."""
    question = say("Tell me a long story about a castle.")
    messages = [pb.ClientMessage(config=pb.SessionConfig(input_sample_rate=16000, language="en",
                                                         max_response_tokens=1024))]
    messages += [audio_msg(question[i:i + 320]) for i in range(0, question.size, 320)]
    messages += [audio_msg(np.zeros(320, np.float32))] * 30
    code, details, _ = await raw_converse(server.grpc_address, messages, hold_s=30, deadline_s=40)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "keep sending" in details, (code, details)
    assert await unfinished_llm_requests() == 0


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
        "mu-law at 16 kHz": ([pb.ClientMessage(config=pb.SessionConfig(input_encoding=pb.MULAW,
                                                                       input_sample_rate=16000))],
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
        "zero-width text turn": ([ok_config, pb.ClientMessage(text=pb.TextInput(text="\u200b\u200b"))],
                                 grpc.StatusCode.INVALID_ARGUMENT),
        "second config": ([ok_config, ok_config], grpc.StatusCode.FAILED_PRECONDITION),
        "NaN stall report": ([ok_config, pb.ClientMessage(playback=pb.PlaybackPosition(
            response_id=1, played_ms=10, underrun_ms=float("nan")))], grpc.StatusCode.INVALID_ARGUMENT),
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
            assert details and "Traceback" not in details and "ray" not in details.lower(), \
                f"{name}: unhelpful details {details!r}"
        result = await good
    finally:
        await client.close()
    assert result.status == "OK", result.details
    assert result.turns[0].response_text and result.turns[0].audio_ms > 0


async def test_undecodable_bytes_get_invalid_argument(server) -> None:  # type: ignore[no-untyped-def]
    """Defect 12: garbage bytes ended the stream with OK, or with a misleading message."""
    ok = pb.ClientMessage(config=CONFIG).SerializeToString()
    for messages in ([b"\xff\xff\xff\xff"], [ok, b"\xff\xff\xff\xff"]):
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            method = channel.stream_stream("/voxserve.v1.VoiceAssistant/Converse",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)

            async def requests(msgs: list[bytes] = messages) -> AsyncIterator[bytes]:
                for m in msgs:
                    yield m
                await asyncio.sleep(2)

            call = method(requests(), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "not a voxserve.v1.ClientMessage" in (info.value.details() or "")


async def test_phone_quality_question_answered_in_mu_law(server) -> None:  # type: ignore[no-untyped-def]
    """Telephony: an 8 kHz G.711 mu-law question is understood and answered in mu-law."""
    from services.codecs import float_to_mulaw, mulaw_to_float

    question = "What is the capital of France?"
    audio = np.concatenate([say(question, 8000), np.zeros(8000 * 2, np.float32)])
    config = pb.SessionConfig(input_encoding=pb.MULAW, output_encoding=pb.MULAW, language="en")

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        yield pb.ClientMessage(config=config)
        for i in range(0, audio.size, 160):  # 20 ms of 8 kHz audio per message
            await asyncio.sleep(0.02)
            yield pb.ClientMessage(audio=pb.AudioInput(data=float_to_mulaw(audio[i:i + 160])))
        yield pb.ClientMessage(end_of_input=pb.EndOfInput())

    transcript, chunks = "", []
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        async for e in pb_grpc.VoiceAssistantStub(channel).Converse(requests(), timeout=120):
            if e.WhichOneof("event") == "final_transcript":
                transcript = e.final_transcript.text
            elif e.WhichOneof("event") == "audio":
                chunks.append(e.audio)
    assert wer(question, transcript) < 0.3, transcript
    assert chunks and all(c.sample_rate == 8000 for c in chunks)
    answer = mulaw_to_float(b"".join(c.data for c in chunks))  # one byte per sample
    assert answer.size > 8000 * 0.5 and float(np.abs(answer).max()) > 0.1


async def test_emoji_only_text_turn_is_not_answered_and_the_session_goes_on(server) -> None:  # type: ignore[no-untyped-def]
    """Defect 14: an emoji-only turn got an answer with 0 ms of audio."""
    config = pb.SessionConfig(input_sample_rate=16000, language="en", playback=pb.PLAYBACK_NONE)
    code, _, events = await raw_converse(server.grpc_address, [
        pb.ClientMessage(config=config), pb.ClientMessage(text=pb.TextInput(text="🙂🎉")),
        pb.ClientMessage(text=pb.TextInput(text="Say hello.")), pb.ClientMessage(end_of_input=pb.EndOfInput())])
    assert code == grpc.StatusCode.OK
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("response_done") == 1 and "error" in kinds, kinds
    done = next(e.response_done for e in events if e.WhichOneof("event") == "response_done")
    assert done.audio_ms > 0


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


async def test_stage_outage_gives_an_error_and_health_says_so(server) -> None:  # type: ignore[no-untyped-def]
    """Defect 7/13: with the TTS replica killed mid-answer the caller got 12 s of dead air, and
    health kept answering SERVING. Now health says NOT_SERVING, and the caller either gets an
    error event (a call was in flight on the dead replica) or, when Serve's restarted replica
    takes the next chunk within the stage deadline, the rest of the answer. The error path itself
    is pinned down by test_conversation's TTS outage tests. Runs last: it kills a replica."""
    import ray
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve

    async def health() -> int:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="voxserve.v1.VoiceAssistant"), timeout=15)
            return int(reply.status)

    assert await health() == health_pb2.HealthCheckResponse.SERVING
    events: list[pb.ServerEvent] = []
    config = pb.SessionConfig(input_sample_rate=16000, language="en", max_response_tokens=300,
                              playback=pb.PLAYBACK_NONE)

    question = "Tell me a long story about a ship, in at least ten sentences."
    task = asyncio.create_task(converse(server.grpc_address, [UserTurn(text=question)],
                                        config, on_event=events.append, turn_timeout_s=60))
    for _ in range(400):
        if any(e.WhichOneof("event") == "audio" for e in events):
            break
        await asyncio.sleep(0.05)
    replicas = serve.status().applications["voxserve"].deployments["TTS"]
    assert replicas.replica_states
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "TTS" in a["name"] and "SERVE_REPLICA" in a["name"]]
    for actor in actors:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    unhealthy = False
    for _ in range(20):
        if await health() == health_pb2.HealthCheckResponse.NOT_SERVING:
            unhealthy = True
            break
        await asyncio.sleep(0.5)
    result = await asyncio.wait_for(task, 90)
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    if errors:  # a TTS call was in flight on the killed replica: the caller is told, in our words
        assert errors[0].code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), errors[0]
        assert "ray" not in errors[0].message.lower() and "Traceback" not in errors[0].message
    else:
        # no call was in flight: the next chunk went to the replica Serve restarted, within the
        # stage deadline, and the answer finished; never dead air beyond that deadline
        audio_ms = [e.server_time_ms for e in events if e.WhichOneof("event") == "audio"]
        gap_s = max(b - a for a, b in itertools.pairwise(audio_ms)) / 1000
        assert gap_s <= SessionSettings().timeouts.tts_first_audio_s + 2, gap_s
        assert any(e.WhichOneof("event") == "response_done" for e in events)
    assert result.status == "OK"
    assert unhealthy, "health kept answering SERVING with the TTS replica dead"
    for _ in range(120):  # Serve restarts the replica; health recovers
        if await health() == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(1)
    assert await health() == health_pb2.HealthCheckResponse.SERVING

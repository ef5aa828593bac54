"""Speech-native mode through the real Ray Serve graph: the user's audio goes to an audio LLM.

The audio LLM is a tiny locally built Qwen2-Audio (random audio encoder, SmolLM2 text model):
its answers do not follow the question, but every hop is real, and the assertions are on what
the engine received, not on what it said.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from clients.voice_client import UserTurn
from protos.voxserve.v1 import voice_pb2 as pb
from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc
from services.audio import float_to_pcm16
from services.speech_llm import QWEN2_AUDIO, audio_token_count
from tests.conftest import converse, handle, say, unfinished_llm_requests, wer

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1200)]

NATIVE = pb.SessionConfig(input_sample_rate=16000, language="en", response_mode=pb.SPEECH_NATIVE,
                          max_response_tokens=40)


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    from deployments.profiles import load_serve_config
    from deployments.server import free_port
    from services.models import cache_dir
    from tests.graph_app import start_observed
    from tests.tiny_models import build_tiny_qwen2_audio

    model = build_tiny_qwen2_audio(cache_dir() / "tiny" / QWEN2_AUDIO)
    srv = start_observed(load_serve_config("cpu"), grpc_port=free_port(), app_overrides={
        "speech_llm": {"model": str(model), "max_model_len": 2048, "kv_cache_gib": 0.25, "max_audio_s": 30}})
    yield srv
    srv.stop()


async def test_speech_native_turn_sends_audio_to_the_llm(server) -> None:  # type: ignore[no-untyped-def]
    question = "What is the capital of France?"
    modes: list[int] = []
    result = await converse(
        server.grpc_address, [UserTurn(audio=say(question))], NATIVE,
        on_event=lambda e: modes.append(e.session_started.response_mode)
        if e.WhichOneof("event") == "session_started" else None)
    assert result.status == "OK", result.details
    assert modes == [pb.SPEECH_NATIVE]
    turn = result.turns[0]
    assert turn.response_text.strip() and turn.audio_ms > 0, turn.error
    # ASR ran beside the LLM: the client still gets the transcript.
    assert wer(question, turn.transcript) < 0.2, turn.transcript
    audio_turns = [r for r in await handle("LLM").recent_requests.remote(64) if r["audio_samples"]]
    assert audio_turns and audio_turns[-1]["audio_arch"] == QWEN2_AUDIO
    used = [r for r in audio_turns if r["finish_reason"] != "abort"]  # speculations may be aborted
    # The engine got the utterance (VAD segment: speech plus pre/post roll) ...
    seconds = used[-1]["audio_samples"] / 16000
    assert 0.8 * say(question).size / 16000 < seconds < say(question).size / 16000 + 1.5
    # ... and vLLM expanded it into audio embeddings inside the prompt.
    assert used[-1]["prompt_tokens"] > audio_token_count(QWEN2_AUDIO, seconds)
    # History keeps the transcript (text), not the audio.
    history = await handle("Gateway").session_history.remote(result.session_id)
    users = [m["content"] for m in history if m["role"] == "user"]
    assert users == [turn.transcript]


async def test_cascade_still_works_beside_speech_native(server) -> None:  # type: ignore[no-untyped-def]
    result = await converse(server.grpc_address, [UserTurn(text="Say hello.")],
                            pb.SessionConfig(input_sample_rate=16000, response_mode=pb.CASCADE))
    assert result.status == "OK" and result.turns[0].response_text
    last = (await handle("LLM").recent_requests.remote(1))[-1]
    assert last["audio_samples"] == 0 and last["audio_arch"] == ""  # the text LLM answered


async def test_speech_native_barge_in_and_disconnect_abort_the_request(server) -> None:  # type: ignore[no-untyped-def]
    config = pb.SessionConfig(input_sample_rate=16000, language="en", response_mode=pb.SPEECH_NATIVE,
                              max_response_tokens=200)
    turns = [UserTurn(audio=say("Tell me a long story about a dragon.")),
             UserTurn(audio=say("Stop please."), barge_in_after_ms=800)]
    result = await converse(server.grpc_address, turns, config)
    assert result.status == "OK", result.details
    assert result.turns[0].interrupted, result.turns[0].error
    assert await unfinished_llm_requests() == 0
    # Disconnect while the audio LLM generates.
    question = say("Tell me about the history of Rome.")

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        yield pb.ClientMessage(config=config)
        audio = np.concatenate([question, np.zeros(16000 * 10, np.float32)])
        for i in range(0, audio.size, 320):
            await asyncio.sleep(0.02)
            yield pb.ClientMessage(audio=pb.AudioInput(data=float_to_pcm16(audio[i:i + 320])))

    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        call = pb_grpc.VoiceAssistantStub(channel).Converse(requests())
        async for event in call:
            if event.WhichOneof("event") == "text_delta":
                call.cancel()
                break
    assert await unfinished_llm_requests() == 0

"""Validation of client input and the event -> protobuf mapping (no Ray, no models)."""

from __future__ import annotations

import pytest

from deployments.config import AppArgs
from deployments.protocol import decode_audio, event_to_proto, settings_from_config, status_code
from protos.voxserve.v1 import voice_pb2 as pb
from services import events as ev
from services.errors import FailedPrecondition, InvalidArgument, OutOfRange, ResourceExhausted, VoxError
from services.session import SPEECH_NATIVE

ARGS = AppArgs()


def settings(native: bool = False, **cfg: object):  # type: ignore[no-untyped-def]
    return settings_from_config(pb.SessionConfig(**cfg), ARGS, voice_rate=22050, speech_native_available=native)


def test_defaults() -> None:
    s = settings()
    assert s.input_sample_rate == 16000 and s.output_sample_rate == 22050 and s.language is None
    assert s.mode == "cascade" and s.barge_in and s.vad.threshold == ARGS.vad.threshold


def test_client_choices_apply() -> None:
    s = settings(True, input_sample_rate=48000, output_sample_rate=16000, language="de",
                 vad=pb.VADSettings(threshold=0.6, min_silence_ms=800), response_mode=pb.SPEECH_NATIVE,
                 disable_barge_in=True, max_response_tokens=50)
    assert (s.input_sample_rate, s.output_sample_rate, s.language) == (48000, 16000, "de")
    assert s.vad.threshold == pytest.approx(0.6) and s.vad.min_silence_ms == 800
    assert s.mode == SPEECH_NATIVE and not s.barge_in and s.max_response_tokens == 50


@pytest.mark.parametrize("cfg,error", [
    ({"input_encoding": pb.FLOAT32}, InvalidArgument),
    ({"input_sample_rate": 11025}, OutOfRange),
    ({"output_sample_rate": 96000}, OutOfRange),
    ({"language": "english"}, InvalidArgument),
    ({"vad": pb.VADSettings(threshold=0.99)}, OutOfRange),
    ({"vad": pb.VADSettings(min_silence_ms=20000)}, OutOfRange),
    ({"max_response_tokens": 100000}, OutOfRange),
    ({"system_prompt": "x" * 9000}, OutOfRange),
    ({"voice": "nonexistent"}, InvalidArgument),
    ({"response_mode": pb.SPEECH_NATIVE}, FailedPrecondition),
])
def test_bad_config_is_rejected_with_its_code(cfg: dict, error: type[VoxError]) -> None:
    with pytest.raises(error) as info:
        settings(**cfg)
    assert info.value.message
    assert status_code(info.value).name == error.code


def test_audio_decoding_limits() -> None:
    assert decode_audio(b"\x00\x00" * 10, 1024).size == 10
    with pytest.raises(InvalidArgument):
        decode_audio(b"\x00" * 3, 1024)
    with pytest.raises(ResourceExhausted):
        decode_audio(b"\x00" * 2048, 1024)


def test_every_event_maps_to_protobuf() -> None:
    events = [
        ev.SessionStarted(session_id="s", output_sample_rate=22050, mode=SPEECH_NATIVE),
        ev.SpeechStarted(), ev.SpeechStopped(utterance_ms=10), ev.PartialTranscript(text="he"),
        ev.FinalTranscript(text="hello", language="en", utterance_ms=10), ev.ResponseStarted(response_id=1),
        ev.TextDelta(response_id=1, text="hi"),
        ev.AudioOut(response_id=1, pcm16=b"\x00\x00", sample_rate=22050, offset_ms=0, text="hi"),
        ev.ResponseDone(response_id=1, text="hi", audio_ms=5, latency=ev.TurnLatency(asr_ms=3.0, llm_tokens=2)),
        ev.ResponseInterrupted(response_id=1, heard_text="h", heard_ms=1, generated_text="hi"),
        ev.ErrorEvent(code="UNAVAILABLE", message="down"),
    ]
    kinds = [event_to_proto(e).WhichOneof("event") for e in events]
    assert kinds == ["session_started", "speech_started", "speech_stopped", "partial_transcript",
                     "final_transcript", "response_started", "text_delta", "audio", "response_done",
                     "response_interrupted", "error"]
    done = event_to_proto(events[8]).response_done
    assert done.latency.asr_ms == 3.0 and done.latency.llm_tokens == 2
    assert event_to_proto(events[0]).session_started.response_mode == pb.SPEECH_NATIVE

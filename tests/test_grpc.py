"""The gRPC transport's mapping (deployments/grpc): SessionConfig validation, the stream's audio
wire, the event -> protobuf mapping and status codes (no Ray, no models)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.config import AppArgs
from deployments.grpc.adapter import GrpcAdapter, _Liveness
from deployments.grpc.mapper import event_to_proto
from deployments.grpc.session_config import settings_from_config
from deployments.grpc.status import status_code
from deployments.grpc.wire import AudioWire
from deployments.session_checks import check_text
from protos.voxserve.v1 import voice_pb2 as pb
from services.codecs import AudioEncoding
from services.conversation import SPEECH_NATIVE, SessionSettings
from services.conversation import events as ev
from services.errors import FailedPrecondition, InvalidArgument, OutOfRange, ResourceExhausted, VoxError

ARGS = AppArgs()


def settings(native: bool = False, **cfg: object):  # type: ignore[no-untyped-def]
    return settings_from_config(pb.SessionConfig(**cfg), ARGS, voice_rate=22050, speech_native_available=native)[0]


def test_defaults() -> None:
    s = settings()
    assert s.input_sample_rate == 16000 and s.output_sample_rate == 22050 and s.language is None
    assert s.mode == "cascade" and s.interruptions.mode == "pause" and s.vad.threshold == ARGS.vad.threshold
    assert s.turn.mode == "semantic" and s.turn.speculate and s.playback == "estimate"


def test_client_choices_apply() -> None:
    s = settings(True, input_sample_rate=48000, output_sample_rate=16000, language="de",
                 vad=pb.VADSettings(threshold=0.6, min_silence_ms=800), response_mode=pb.SPEECH_NATIVE,
                 disable_barge_in=True, max_response_tokens=50, playback=pb.PLAYBACK_NONE)
    assert (s.input_sample_rate, s.output_sample_rate, s.language) == (48000, 16000, "de")
    assert s.vad.threshold == pytest.approx(0.6) and s.turn.min_silence_ms == 800
    assert s.mode == SPEECH_NATIVE and s.interruptions.mode == "off" and s.max_response_tokens == 50
    assert s.playback == "none" and settings(language="auto").language == "auto"


def test_turn_detection_and_interruption_settings() -> None:
    s = settings(turn_detection=pb.TurnDetectionSettings(mode=pb.SILENCE, min_silence_ms=500, disable_speculation=True),
                 interruptions=pb.InterruptionSettings(mode=pb.INTERRUPTION_CANCEL, min_duration_ms=600,
                                                       min_words=2, backchannels=["sure thing"]))
    assert (s.turn.mode, s.turn.min_silence_ms, s.turn.speculate) == ("silence", 500, False)
    assert (s.interruptions.mode, s.interruptions.min_duration_ms, s.interruptions.min_words) == ("cancel", 600, 2)
    assert s.interruptions.backchannels == ["sure thing"]
    assert settings(turn_detection=pb.TurnDetectionSettings(mode=pb.MANUAL)).turn.mode == "manual"


def test_telephony_encodings_are_8khz() -> None:
    s, wire = settings_from_config(pb.SessionConfig(input_encoding=pb.MULAW, output_encoding=pb.ALAW), ARGS,
                                   voice_rate=22050, speech_native_available=False)
    assert s.input_sample_rate == 8000 and s.output_sample_rate == 8000
    assert wire.decode(b"\xff\xff").size == 2 and len(wire.encode(b"\x00\x00" * 4)) == 4
    with pytest.raises(OutOfRange):
        settings(input_encoding=pb.MULAW, input_sample_rate=16000)


def test_text_turn_checks() -> None:
    assert check_text("  hi\u200b ", 100) == "hi"
    with pytest.raises(InvalidArgument):
        check_text("\u200b\u200b \u2060", 100)  # zero-width characters only
    with pytest.raises(OutOfRange):
        check_text("x" * 101, 100)


@pytest.mark.parametrize("cfg,error,field", [
    ({"input_encoding": pb.FLOAT32}, InvalidArgument, "FLOAT32"),
    ({"input_sample_rate": 11025}, OutOfRange, "11025"),
    ({"output_sample_rate": 96000}, OutOfRange, "96000"),
    ({"language": "english"}, InvalidArgument, "language"),
    ({"vad": pb.VADSettings(threshold=0.99)}, OutOfRange, "vad.threshold must be within [0.05, 0.95]"),
    ({"vad": pb.VADSettings(min_speech_ms=2500)}, OutOfRange, "vad.min_speech_ms must be within [0, 2000]"),
    ({"vad": pb.VADSettings(pre_roll_ms=1500)}, OutOfRange, "vad.pre_roll_ms must be within [0, 1000]"),
    ({"vad": pb.VADSettings(min_silence_ms=20000)}, OutOfRange, "vad.min_silence_ms must be within [50, 5000]"),
    # the older vad.min_silence_ms is ignored when turn_detection's is given, but must still be valid
    ({"vad": pb.VADSettings(min_silence_ms=20000), "turn_detection": pb.TurnDetectionSettings(min_silence_ms=500)},
     OutOfRange, "vad.min_silence_ms must be within [50, 5000]"),
    ({"turn_detection": pb.TurnDetectionSettings(min_silence_ms=20)}, OutOfRange,
     "turn_detection.min_silence_ms must be within [50, 5000]"),
    ({"turn_detection": pb.TurnDetectionSettings(max_silence_ms=50)}, OutOfRange,
     "turn_detection.max_silence_ms must be within [100, 10000]"),
    ({"interruptions": pb.InterruptionSettings(min_words=50)}, OutOfRange,
     "interruptions.min_words must be within [0, 20]"),
    ({"interruptions": pb.InterruptionSettings(min_duration_ms=6000)}, OutOfRange,
     "interruptions.min_duration_ms must be within [0, 5000]"),
    ({"interruptions": pb.InterruptionSettings(backchannels=["x" * 65])}, OutOfRange, "interruptions.backchannels"),
    ({"output_encoding": pb.FLOAT32}, InvalidArgument, "FLOAT32"),
    ({"max_response_tokens": 100000}, OutOfRange, "max_response_tokens must be at most 2048"),
    ({"system_prompt": "x" * 9000}, OutOfRange, "system_prompt is 9000 characters long"),
    ({"voice": "nonexistent"}, InvalidArgument, "unknown voice 'nonexistent'"),
    ({"response_mode": pb.SPEECH_NATIVE}, FailedPrecondition, "speech-native"),
])
def test_bad_config_is_rejected_with_its_code(cfg: dict, error: type[VoxError], field: str) -> None:
    with pytest.raises(error) as info:
        settings(**cfg)
    assert field in info.value.message, info.value.message
    assert status_code(info.value).name == error.code


def test_a_longest_silence_below_the_shortest_is_raised_to_it() -> None:
    s = settings(turn_detection=pb.TurnDetectionSettings(min_silence_ms=2000, max_silence_ms=1000))
    assert (s.turn.min_silence_ms, s.turn.max_silence_ms) == (2000, 2000)
    assert settings(vad=pb.VADSettings(min_silence_ms=1800)).turn.max_silence_ms == 1800  # server default 1500


def test_session_settings_do_not_share_the_deployment_defaults() -> None:
    s = settings(vad=pb.VADSettings(threshold=0.6))
    assert s.vad.threshold == pytest.approx(0.6) and ARGS.vad.threshold == 0.5
    assert s.turn is not ARGS.gateway.turn and s.interruptions is not ARGS.gateway.interruptions


def test_audio_decoding_limits() -> None:
    wire = AudioWire(AudioEncoding.PCM16, 16000, max_bytes=1024)
    assert wire.decode(b"\x00\x00" * 10).size == 10
    with pytest.raises(InvalidArgument):
        wire.decode(b"\x00" * 3)
    with pytest.raises(ResourceExhausted):
        wire.decode(b"\x00" * 2048)


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
        ev.InputCommitted(input_id=1), ev.ResponsePaused(response_id=1, played_ms=3),
        ev.ResponseResumed(response_id=1, reason="noise"),
        ev.ToolCallStarted(response_id=1, call_id="c", name="f"),
        ev.ToolCallArguments(response_id=1, call_id="c", delta="{"),
        ev.ToolCallDone(response_id=1, call_id="c", name="f", arguments="{}"),
        ev.ToolCallCancelled(call_id="c", reason="timeout"), ev.ToolResultAccepted(call_id="c", late=True),
    ]
    kinds = [event_to_proto(e).WhichOneof("event") for e in events]  # type: ignore[union-attr]
    assert kinds == ["session_started", "speech_started", "speech_stopped", "partial_transcript",
                     "final_transcript", "response_started", "text_delta", "audio", "response_done",
                     "response_interrupted", "error", "input_committed", "response_paused", "response_resumed",
                     "tool_call", "tool_call", "tool_call", "tool_call_cancelled", "tool_result_accepted"]
    done = event_to_proto(events[16]).tool_call  # type: ignore[union-attr]
    assert done.done and done.arguments_json == "{}" and done.name == "f"
    assert event_to_proto(ev.InputCleared()) is None
    done = event_to_proto(events[8]).response_done  # type: ignore[union-attr]
    assert done.latency.asr_ms == 3.0 and done.latency.llm_tokens == 2
    assert event_to_proto(events[0]).session_started.response_mode == pb.SPEECH_NATIVE  # type: ignore[union-attr]


def test_tools_in_the_session_config() -> None:
    weather = pb.Tool(name="get_weather", description="Weather",
                      parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')
    s = settings(tools=[weather], tool_choice="get_weather",
                 tool_calling=pb.ToolCallSettings(filler_after_ms=300, manual_continue=True, result_timeout_ms=5000))
    assert [t.name for t in s.tools] == ["get_weather"] and s.choice.name == "get_weather"
    assert s.tool_calling.filler_after_ms == 300 and not s.tool_calling.auto_continue
    assert s.tool_calling.result_timeout_s == 5.0 and s.tool_calling.filler
    assert settings().tools == [] and settings().tool_calling.auto_continue
    for bad, match in (({"tools": [pb.Tool(name="f", parameters_json="{")]}, "not JSON"),
                       ({"tools": [pb.Tool(name="two words")]}, "two words"),
                       ({"tools": [weather], "tool_choice": "nope"}, "not among"),
                       ({"tool_choice": "required"}, "at least one tool")):
        with pytest.raises(InvalidArgument, match=match):
            settings(**bad)


# --- the Converse reader ----------------------------------------------------------------------------


class _RoundTripStream:
    """Serve's gRPC input stream as a replica sees it: each message comes one round trip after
    it is asked for."""

    def __init__(self, messages: list[pb.ClientMessage], rtt_s: float) -> None:
        self.messages, self.rtt_s = messages, rtt_s

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._messages()

    async def _messages(self):  # type: ignore[no-untyped-def]
        for message in self.messages:
            await asyncio.sleep(self.rtt_s)
            yield message

    def is_cancelled(self) -> bool:
        return False


class _BusyConversation:
    """Takes 40 ms per push of audio (VAD, turn logic on a busy core) and records the order."""

    settings = SessionSettings()

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.ended = False

    async def push_audio(self, samples: np.ndarray) -> None:
        self.log.append(("audio", samples.size))
        await asyncio.sleep(0.04)

    def playback(self, response_id: int, played_ms: int, underruns: int = 0, underrun_ms: float = 0.0) -> None:
        self.log.append(("playback", played_ms))

    async def end_input(self) -> None:
        self.ended = True

    async def aclose(self) -> None:
        pass


async def test_the_reader_reads_ahead_of_a_busy_conversation_and_keeps_the_order() -> None:
    """Messages keep coming (one round trip each) while the conversation works; the audio that
    queued up meanwhile goes in as one piece, and a PlaybackPosition stays where it was sent."""
    chunk = pb.ClientMessage(audio=pb.AudioInput(data=b"\x00\x00" * 320))  # 20 ms at 16 kHz
    messages = [chunk] * 10 + [pb.ClientMessage(playback=pb.PlaybackPosition(response_id=1, played_ms=7))]
    messages += [chunk] * 10 + [pb.ClientMessage(end_of_input=pb.EndOfInput())]
    adapter = GrpcAdapter(SimpleNamespace(args=ARGS, stages=None), None, None)  # type: ignore[arg-type]
    conv = _BusyConversation()
    wire = AudioWire.for_input(pb.PCM16, 16000, max_bytes=ARGS.gateway.max_message_bytes)
    await asyncio.wait_for(adapter._read(_RoundTripStream(messages, 0.01), conv, wire, _Liveness()),  # type: ignore[arg-type]
                           timeout=30)
    audio = [n for kind, n in conv.log if kind == "audio"]
    assert sum(audio) == 20 * 320 and len(audio) < 20  # coalesced while the conversation was busy
    at = conv.log.index(("playback", 7))
    assert sum(n for kind, n in conv.log[:at] if kind == "audio") == 10 * 320
    assert conv.ended

"""The session floor both transports share (deployments/session_checks.py): one set of server
defaults, pydantic bounds reported in the client's words, and one text/language/voice check."""

from __future__ import annotations

import pytest

from deployments.config import AppArgs
from deployments.grpc.session_config import settings_from_config
from deployments.realtime.session_config import RealtimeConfig
from deployments.session_checks import (
    check_bounds,
    check_client_vad,
    check_language,
    check_system_prompt,
    check_voice,
    session_defaults,
    settings_with,
)
from protos.voxserve.v1 import voice_pb2 as pb
from services.conversation.settings import TurnDetection
from services.errors import InvalidArgument, OutOfRange

ARGS = AppArgs.model_validate({"gateway": {"history_turns": 3, "output_chunk_ms": 60,
                                           "turn": {"min_silence_ms": 400}, "interruptions": {"min_words": 2}},
                               "vad": {"threshold": 0.4}, "asr": {"partial_interval_ms": 900}})
SHARED = ("vad", "turn", "interruptions", "chunker", "timeouts", "history_turns", "output_chunk_ms",
          "partial_interval_ms", "mode")


def test_both_transports_start_from_the_same_server_defaults() -> None:
    defaults = session_defaults(ARGS)
    assert (defaults.vad.threshold, defaults.turn.min_silence_ms, defaults.interruptions.min_words) == (0.4, 400, 2)
    assert (defaults.history_turns, defaults.output_chunk_ms, defaults.partial_interval_ms) == (3, 60, 900)
    grpc, _ = settings_from_config(pb.SessionConfig(), ARGS, voice_rate=22050, speech_native_available=False)
    realtime = RealtimeConfig.initial(ARGS).settings()
    for name in SHARED:
        assert getattr(grpc, name) == getattr(defaults, name) == getattr(realtime, name), name


def test_defaults_are_copies() -> None:
    defaults = session_defaults(ARGS)
    defaults.vad.threshold = 0.9
    defaults.turn.min_silence_ms = 1000
    assert ARGS.vad.threshold == 0.4 and ARGS.gateway.turn.min_silence_ms == 400


def test_settings_with_applies_nested_changes_and_names_the_client_field() -> None:
    base = session_defaults(ARGS)
    s = settings_with(base, {"turn": {"mode": "silence"}, "language": "de"})
    assert (s.turn.mode, s.turn.min_silence_ms, s.language) == ("silence", 400, "de")
    with pytest.raises(OutOfRange, match=r"^turn_detection\.min_silence_ms must be within \[50, 5000\]; got 20$"):
        settings_with(base, {"turn": {"min_silence_ms": 20}}, {"turn.min_silence_ms": "turn_detection.min_silence_ms"})
    with pytest.raises(OutOfRange, match=r"^interruptions\.min_words must be within \[0, 20\]; got 21$"):
        settings_with(base, {"interruptions": {"min_words": 21}})
    with pytest.raises(OutOfRange, match=r"^history_turns must be at least 0; got -1$"):
        settings_with(base, {"history_turns": -1})
    with pytest.raises(InvalidArgument, match=r"^turn\.mode: "):
        settings_with(base, {"turn": {"mode": "sometimes"}})


def test_client_vad_ranges_are_narrower_than_the_deployment_s() -> None:
    assert check_client_vad({"threshold": 0.6}) == {"threshold": 0.6}
    with pytest.raises(OutOfRange, match=r"^vad\.threshold must be within \[0\.05, 0\.95\]; got 0\.99$"):
        check_client_vad({"threshold": 0.99})  # a deployment may set up to 1.0
    with pytest.raises(InvalidArgument, match=r"^vad\.neg_threshold: "):
        check_client_vad({"neg_threshold": 0.2})  # not a client's to change


def test_check_bounds_reads_the_field_s_declared_bounds() -> None:
    check_bounds(TurnDetection, "max_silence_ms", 10_000, "x")
    with pytest.raises(OutOfRange, match=r"^x must be within \[100, 10000\]; got 10001$"):
        check_bounds(TurnDetection, "max_silence_ms", 10_001, "x")


def test_one_voice_check_for_every_transport() -> None:
    args = AppArgs.model_validate({"tts": {"voice": "joe"}})
    for ok in ("", "default", "joe"):
        assert check_voice(ok, args) == ok
    assert check_voice("alloy", args, aliases={"alloy"}) == "alloy"
    with pytest.raises(InvalidArgument, match=r"^unknown voice 'alloy': this deployment speaks with one voice; "
                                              r"leave voice empty$"):
        check_voice("alloy", args)


def test_language_and_prompt_checks() -> None:
    assert (check_language(""), check_language("auto"), check_language("de")) == (None, "auto", "de")
    with pytest.raises(InvalidArgument, match="ISO 639-1"):
        check_language("German")
    with pytest.raises(OutOfRange, match=r"^instructions is 8001 characters long; at most 8000 are accepted$"):
        check_system_prompt("x" * 8001, "instructions")

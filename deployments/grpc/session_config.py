"""A client's ``SessionConfig`` -> the engine's ``SessionSettings`` and the stream's ``AudioWire``.

The server's defaults and every check shared with the realtime transport come from
``deployments.session_checks``; the bounds are those the settings' pydantic fields declare.
What is gRPC's own lives here: protobuf enums, 0 meaning "unset", the deprecated
``vad.min_silence_ms``, ``disable_barge_in``, and the backchannel list's size.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from deployments.config import AppArgs
from deployments.grpc.wire import AudioWire
from deployments.session_checks import (
    MAX_RESPONSE_TOKENS,
    check_bounds,
    check_client_vad,
    check_language,
    check_system_prompt,
    check_voice,
    session_defaults,
    settings_with,
)
from protos.voxserve.v1 import voice_pb2 as pb
from services.conversation.settings import CASCADE, SPEECH_NATIVE, SessionSettings, TurnDetection
from services.errors import FailedPrecondition, InvalidArgument, OutOfRange
from services.tools import MAX_TOOLS, ToolChoice, ToolSpec, check_tools

_TURN_MODES = {pb.SEMANTIC: "semantic", pb.SILENCE: "silence", pb.MANUAL: "manual"}
_INTERRUPTION_MODES = {pb.INTERRUPTION_PAUSE: "pause", pb.INTERRUPTION_CANCEL: "cancel",
                       pb.INTERRUPTION_OFF: "off"}
_PLAYBACK = {pb.PLAYBACK_ESTIMATE: "estimate", pb.PLAYBACK_REPORTED: "reported", pb.PLAYBACK_NONE: "none"}
MAX_BACKCHANNELS, MAX_BACKCHANNEL_CHARS = 100, 64


def settings_from_config(cfg: pb.SessionConfig, args: AppArgs, *, voice_rate: int,
                         speech_native_available: bool) -> tuple[SessionSettings, AudioWire]:
    """Validate a client's SessionConfig against the deployment's limits."""
    wire = AudioWire.for_session(cfg, voice_rate=voice_rate, max_bytes=args.gateway.max_message_bytes)
    check_system_prompt(cfg.system_prompt)
    if cfg.max_response_tokens > MAX_RESPONSE_TOKENS:
        raise OutOfRange(f"max_response_tokens must be at most {MAX_RESPONSE_TOKENS}; got {cfg.max_response_tokens}")
    base = session_defaults(args)
    # settings path -> the client's name for it (for the message of a value out of bounds)
    names: dict[str, str] = {}
    changes: dict[str, Any] = {"input_sample_rate": wire.input_rate, "output_sample_rate": wire.output_rate}
    vad = {name: value for name in ("threshold", "min_speech_ms", "pre_roll_ms") if (value := getattr(cfg.vad, name))}
    if vad:
        changes["vad"] = check_client_vad(vad)
    mode: str = base.mode
    if cfg.response_mode != pb.RESPONSE_MODE_UNSPECIFIED:
        mode = SPEECH_NATIVE if cfg.response_mode == pb.SPEECH_NATIVE else CASCADE
    if mode == SPEECH_NATIVE and not speech_native_available:
        raise FailedPrecondition("speech-native mode was asked for, but this deployment's LLM has no audio "
                                 "model loaded; use CASCADE or deploy an audio LLM (see README)")
    check_voice(cfg.voice, args, hint="leave voice empty")
    if cfg.playback and cfg.playback not in _PLAYBACK:
        raise InvalidArgument(f"unknown playback reporting {cfg.playback}")
    changes.update(
        mode=mode, language=check_language(cfg.language), system_prompt=cfg.system_prompt, voice=cfg.voice,
        partial_transcripts=cfg.partial_transcripts, max_response_tokens=cfg.max_response_tokens or None,
        playback=_PLAYBACK.get(cfg.playback, "estimate"),
        turn=_turn_detection(cfg, base.turn, names), interruptions=_interruptions(cfg, names))
    changes.update(_tools(cfg))
    return settings_with(base, changes, names), wire


#: SessionConfig fields that describe the stream's audio, not the conversation: a resumed session
#: takes them from the new config, whatever the stored session had.
_WIRE_FIELDS = ("input_encoding", "input_sample_rate", "output_sample_rate", "output_encoding")


def resumed_settings(cfg: pb.SessionConfig, stored: SessionSettings, args: AppArgs, *, voice_rate: int,
                     speech_native_available: bool) -> tuple[SessionSettings, AudioWire]:
    """The settings of a resumed session: the stored ones, except where ``cfg`` sets a field
    (a field the client set differs from what the same config without it gives)."""
    sent, wire = settings_from_config(cfg, args, voice_rate=voice_rate,
                                      speech_native_available=speech_native_available)
    bare = pb.SessionConfig()
    for name in _WIRE_FIELDS:
        setattr(bare, name, getattr(cfg, name))
    unset, _ = settings_from_config(bare, args, voice_rate=voice_rate,
                                    speech_native_available=speech_native_available)
    changes = {name: getattr(sent, name) for name in SessionSettings.model_fields
               if getattr(sent, name) != getattr(unset, name)}
    changes.update(input_sample_rate=sent.input_sample_rate, output_sample_rate=sent.output_sample_rate)
    return stored.model_copy(update=changes), wire


def _tools(cfg: pb.SessionConfig) -> dict[str, Any]:
    """SessionConfig.tools, tool_choice and tool_calling as settings (InvalidArgument naming the field)."""
    if len(cfg.tools) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools per session; got {len(cfg.tools)}")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(cfg.tools):
        try:
            parameters = json.loads(tool.parameters_json) if tool.parameters_json else None
            tools.append(ToolSpec(name=tool.name, description=tool.description,
                                  **({"parameters": parameters} if parameters is not None else {})))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"tools[{i}].parameters_json is not JSON: {exc.msg}") from None
        except ValidationError as exc:
            raise InvalidArgument(f"tools[{i}] ({tool.name!r}): {exc.errors()[0]['msg']}") from None
    choice = ToolChoice.parse(cfg.tool_choice or "auto")
    check_tools(tools, choice)
    t = cfg.tool_calling
    calling: dict[str, Any] = {"filler": not t.disable_filler, "auto_continue": not t.manual_continue}
    if t.filler_text:
        calling["filler_text"] = t.filler_text
    if t.filler_after_ms:
        calling["filler_after_ms"] = t.filler_after_ms
    if t.result_timeout_ms:
        calling["result_timeout_s"] = t.result_timeout_ms / 1000
    return {"tools": tools, "tool_choice": choice.wire(), "tool_calling": calling}


def _turn_detection(cfg: pb.SessionConfig, default: TurnDetection, names: dict[str, str]) -> dict[str, Any]:
    t, values = cfg.turn_detection, dict[str, Any]()
    if t.mode:
        if t.mode not in _TURN_MODES:
            raise InvalidArgument(f"unknown turn_detection.mode {t.mode}")
        values["mode"] = _TURN_MODES[t.mode]
    # Checked as they are read: a longest silence below the shortest is raised to it below.
    # vad.min_silence_ms is the older name of turn_detection.min_silence_ms: ignored when both are
    # given, but it still has to be valid.
    given = (("min_silence_ms", cfg.vad.min_silence_ms, "vad.min_silence_ms"),
             ("min_silence_ms", t.min_silence_ms, "turn_detection.min_silence_ms"),
             ("max_silence_ms", t.max_silence_ms, "turn_detection.max_silence_ms"))
    for name, value, client_name in given:
        if value:
            check_bounds(TurnDetection, name, value, client_name)
            values[name] = value
            names[f"turn.{name}"] = client_name
    shortest = values.get("min_silence_ms", default.min_silence_ms)
    if values.get("max_silence_ms", default.max_silence_ms) < shortest:
        values["max_silence_ms"] = shortest
    if t.disable_speculation:
        values["speculate"] = False
    return values


def _interruptions(cfg: pb.SessionConfig, names: dict[str, str]) -> dict[str, Any]:
    i, values = cfg.interruptions, dict[str, Any]()
    if i.mode:
        if i.mode not in _INTERRUPTION_MODES:
            raise InvalidArgument(f"unknown interruptions.mode {i.mode}")
        values["mode"] = _INTERRUPTION_MODES[i.mode]
    if cfg.disable_barge_in:
        values["mode"] = "off"
    for name in ("min_duration_ms", "min_words"):
        if value := getattr(i, name):
            values[name] = value
            names[f"interruptions.{name}"] = f"interruptions.{name}"
    if i.backchannels:
        if len(i.backchannels) > MAX_BACKCHANNELS or any(len(b) > MAX_BACKCHANNEL_CHARS for b in i.backchannels):
            raise OutOfRange(f"interruptions.backchannels: at most {MAX_BACKCHANNELS} phrases of at most "
                             f"{MAX_BACKCHANNEL_CHARS} characters")
        values["backchannels"] = list(i.backchannels)
    return values


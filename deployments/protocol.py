"""Mapping between the public protobuf API and the framework-free session types.

Validation of client input lives here, so every entry point (Converse, Transcribe, Synthesize)
rejects bad input with the same status codes and messages.
"""

from __future__ import annotations

import re

import grpc
import numpy as np

from deployments.config import AppArgs
from protos.voxserve.v1 import voice_pb2 as pb
from services import events as ev
from services.audio import MODEL_RATE, check_rate, pcm16_to_float
from services.errors import FailedPrecondition, InvalidArgument, OutOfRange, ResourceExhausted, VoxError
from services.session import CASCADE, SPEECH_NATIVE, SessionSettings

_LANG = re.compile(r"^[a-z]{2,3}$")
MAX_SYSTEM_PROMPT_CHARS = 8000
MAX_RESPONSE_TOKENS = 2048


def status_code(exc: VoxError) -> grpc.StatusCode:
    """The one map from our error family to gRPC status codes."""
    return grpc.StatusCode[exc.code]


def check_encoding(encoding: int) -> None:
    if encoding == pb.FLOAT32:
        raise InvalidArgument("FLOAT32 input is not supported yet; send PCM16 (little-endian, mono)")
    if encoding not in (pb.AUDIO_ENCODING_UNSPECIFIED, pb.PCM16):
        raise InvalidArgument(f"unknown audio encoding {encoding}; send PCM16")


def check_language(language: str) -> str | None:
    if not language:
        return None
    if not _LANG.match(language):
        raise InvalidArgument(f"language must be an ISO 639-1 code such as 'en'; got {language!r}")
    return language


def decode_audio(data: bytes, max_bytes: int) -> np.ndarray:
    if len(data) > max_bytes:
        raise ResourceExhausted(f"audio message of {len(data)} bytes exceeds the {max_bytes}-byte limit; "
                                "send smaller chunks (20-100 ms each)")
    return pcm16_to_float(data)


def settings_from_config(cfg: pb.SessionConfig, args: AppArgs, *, voice_rate: int,
                         speech_native_available: bool) -> SessionSettings:
    """Validate a client's SessionConfig against the deployment's limits."""
    check_encoding(cfg.input_encoding)
    in_rate = check_rate(cfg.input_sample_rate or MODEL_RATE)
    out_rate = check_rate(cfg.output_sample_rate) if cfg.output_sample_rate else voice_rate
    if len(cfg.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise OutOfRange(f"system_prompt has {len(cfg.system_prompt)} characters; at most "
                         f"{MAX_SYSTEM_PROMPT_CHARS} are accepted")
    if cfg.max_response_tokens > MAX_RESPONSE_TOKENS:
        raise OutOfRange(f"max_response_tokens must be at most {MAX_RESPONSE_TOKENS}")
    vad = args.vad.model_copy()
    v = cfg.vad
    if v.threshold:
        if not 0.05 <= v.threshold <= 0.95:
            raise OutOfRange(f"vad.threshold must be within [0.05, 0.95]; got {v.threshold}")
        vad.threshold = v.threshold
    for name, lo, hi in (("min_silence_ms", 100, 5000), ("min_speech_ms", 0, 2000), ("pre_roll_ms", 0, 1000)):
        value = getattr(v, name)
        if value:
            if not lo <= value <= hi:
                raise OutOfRange(f"vad.{name} must be within [{lo}, {hi}]; got {value}")
            setattr(vad, name, value)
    mode = CASCADE
    if cfg.response_mode == pb.SPEECH_NATIVE or (
            cfg.response_mode == pb.RESPONSE_MODE_UNSPECIFIED and args.gateway.speech_native):
        mode = SPEECH_NATIVE
    if mode == SPEECH_NATIVE and not speech_native_available:
        raise FailedPrecondition("speech-native mode was asked for, but this deployment's LLM has no audio "
                                 "model loaded; use CASCADE or deploy an audio LLM (see README)")
    if cfg.voice not in ("", "default") and cfg.voice != args.tts.voice:
        raise InvalidArgument(f"unknown voice {cfg.voice!r}; this deployment has one voice: leave voice empty")
    return SessionSettings(
        input_sample_rate=in_rate, language=check_language(cfg.language),
        system_prompt=cfg.system_prompt, voice=cfg.voice, vad=vad, mode=mode,
        output_sample_rate=out_rate, partial_transcripts=cfg.partial_transcripts,
        partial_interval_ms=args.asr.partial_interval_ms,
        max_response_tokens=cfg.max_response_tokens or None,
        barge_in=not cfg.disable_barge_in, history_turns=args.gateway.history_turns,
        output_chunk_ms=args.gateway.output_chunk_ms, chunker=args.tts.chunker,
    )


def event_to_proto(e: ev.Event) -> pb.ServerEvent:
    out = pb.ServerEvent(server_time_ms=e.server_time_ms, audio_time_ms=e.audio_time_ms)
    if isinstance(e, ev.AudioOut):
        out.audio.CopyFrom(pb.AudioChunk(data=e.pcm16, sample_rate=e.sample_rate, response_id=e.response_id,
                                         offset_ms=e.offset_ms, text=e.text))
    elif isinstance(e, ev.TextDelta):
        out.text_delta.CopyFrom(pb.ResponseTextDelta(response_id=e.response_id, text=e.text))
    elif isinstance(e, ev.SpeechStarted):
        out.speech_started.SetInParent()
    elif isinstance(e, ev.SpeechStopped):
        out.speech_stopped.utterance_ms = e.utterance_ms
    elif isinstance(e, ev.PartialTranscript):
        out.partial_transcript.text = e.text
    elif isinstance(e, ev.FinalTranscript):
        out.final_transcript.CopyFrom(pb.FinalTranscript(text=e.text, language=e.language,
                                                         utterance_ms=e.utterance_ms))
    elif isinstance(e, ev.ResponseStarted):
        out.response_started.response_id = e.response_id
    elif isinstance(e, ev.ResponseDone):
        lat = e.latency
        out.response_done.CopyFrom(pb.ResponseDone(
            response_id=e.response_id, text=e.text, audio_ms=e.audio_ms,
            latency=pb.TurnLatency(**{f: getattr(lat, f) for f in pb.TurnLatency.DESCRIPTOR.fields_by_name})))
    elif isinstance(e, ev.ResponseInterrupted):
        out.response_interrupted.CopyFrom(pb.ResponseInterrupted(
            response_id=e.response_id, heard_text=e.heard_text, heard_ms=e.heard_ms,
            generated_text=e.generated_text))
    elif isinstance(e, ev.SessionStarted):
        out.session_started.CopyFrom(pb.SessionStarted(
            session_id=e.session_id, output_sample_rate=e.output_sample_rate,
            response_mode=pb.SPEECH_NATIVE if e.mode == SPEECH_NATIVE else pb.CASCADE,
            llm_model=e.llm_model, asr_model=e.asr_model))
    elif isinstance(e, ev.ErrorEvent):
        out.error.CopyFrom(pb.Error(code=e.code, message=e.message))
    else:  # pragma: no cover - a new event type without a mapping is a bug
        raise TypeError(f"no protobuf mapping for {type(e).__name__}")
    return out

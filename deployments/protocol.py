"""The gRPC protocol adapter's mapping: protobuf messages <-> the conversation engine's types.

Validation of client input lives here, so every gRPC method (Converse, Transcribe, Synthesize)
rejects bad input with the same status codes and messages. The engine never sees protobuf.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from deployments.config import AppArgs
from protos.voxserve.v1 import voice_pb2 as pb
from services.audio import MODEL_RATE, pcm16_to_float
from services.codecs import AudioEncoding, check_encoding_rate, decoder, encoder
from services.conversation import events as ev
from services.conversation.settings import SPEECH_NATIVE, Interruptions, SessionSettings, TurnDetection
from services.errors import FailedPrecondition, InvalidArgument, OutOfRange, ResourceExhausted, VoxError

_LANG = re.compile(r"^[a-z]{2,3}$")
MAX_SYSTEM_PROMPT_CHARS = 8000
MAX_RESPONSE_TOKENS = 2048
_ENCODINGS: dict[int, AudioEncoding] = {
    pb.AUDIO_ENCODING_UNSPECIFIED: AudioEncoding.PCM16, pb.PCM16: AudioEncoding.PCM16,
    pb.MULAW: AudioEncoding.MULAW, pb.ALAW: AudioEncoding.ALAW}
_TURN_MODES = {pb.SEMANTIC: "semantic", pb.SILENCE: "silence", pb.MANUAL: "manual"}
_INTERRUPTION_MODES = {pb.INTERRUPTION_PAUSE: "pause", pb.INTERRUPTION_CANCEL: "cancel",
                       pb.INTERRUPTION_OFF: "off"}
_PLAYBACK = {pb.PLAYBACK_ESTIMATE: "estimate", pb.PLAYBACK_REPORTED: "reported", pb.PLAYBACK_NONE: "none"}


def status_code(exc: VoxError) -> grpc.StatusCode:
    """The one map from our error family to gRPC status codes."""
    return grpc.StatusCode[exc.code]


def encoding_of(value: int) -> AudioEncoding:
    if value == pb.FLOAT32:
        raise InvalidArgument("FLOAT32 audio is not supported; send PCM16 (little-endian, mono) or G.711")
    if value not in _ENCODINGS:
        raise InvalidArgument(f"unknown audio encoding {value}; send PCM16, MULAW or ALAW")
    return _ENCODINGS[value]


def check_language(language: str) -> str | None:
    """'' = the server's default language (None), 'auto' = detect, else an ISO 639-1 code."""
    if not language:
        return None
    if language == "auto":
        return language
    if not _LANG.match(language):
        raise InvalidArgument(f"language must be an ISO 639-1 code such as 'en' (or 'auto'); got {language!r}")
    return language


def check_text(text: str, max_chars: int) -> str:
    """A typed turn's text without invisible characters; INVALID_ARGUMENT if nothing is left."""
    visible = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cc") or ch in "\n\t").strip()
    if not visible:
        raise InvalidArgument("text turn is empty (only whitespace or invisible characters)")
    if len(visible) > max_chars:
        raise OutOfRange(f"text turn has {len(visible)} characters; at most {max_chars}")
    return visible


@dataclass(frozen=True)
class WireFormat:
    """How one stream's audio travels: bytes <-> float32 at the session's rates."""

    decode: Callable[[bytes], np.ndarray]
    output: AudioEncoding

    def encode(self, pcm16: bytes) -> bytes:
        """Answer audio (PCM16 from the engine) in the client's output encoding."""
        if self.output is AudioEncoding.PCM16:
            return pcm16
        return encoder(self.output)(pcm16_to_float(pcm16))


def decode_audio(data: bytes, max_bytes: int, decode: Callable[[bytes], np.ndarray] = pcm16_to_float) -> np.ndarray:
    if len(data) > max_bytes:
        raise ResourceExhausted(f"audio message of {len(data)} bytes exceeds the {max_bytes}-byte limit; "
                                "send smaller chunks (20-100 ms each)")
    return decode(data)


def _turn_detection(cfg: pb.SessionConfig, default: TurnDetection) -> TurnDetection:
    t, values = cfg.turn_detection, default.model_dump()
    if t.mode:
        if t.mode not in _TURN_MODES:
            raise InvalidArgument(f"unknown turn_detection.mode {t.mode}")
        values["mode"] = _TURN_MODES[t.mode]
    min_silence = t.min_silence_ms or cfg.vad.min_silence_ms
    for name, value, lo, hi in (("min_silence_ms", min_silence, 50, 5000),
                                ("max_silence_ms", t.max_silence_ms, 100, 10_000)):
        if value:
            if not lo <= value <= hi:
                raise OutOfRange(f"turn_detection.{name} must be within [{lo}, {hi}]; got {value}")
            values[name] = value
    values["max_silence_ms"] = max(values["max_silence_ms"], values["min_silence_ms"])
    if t.disable_speculation:
        values["speculate"] = False
    return TurnDetection.model_validate(values)


def _interruptions(cfg: pb.SessionConfig, default: Interruptions) -> Interruptions:
    i, values = cfg.interruptions, default.model_dump()
    if i.mode:
        if i.mode not in _INTERRUPTION_MODES:
            raise InvalidArgument(f"unknown interruptions.mode {i.mode}")
        values["mode"] = _INTERRUPTION_MODES[i.mode]
    if cfg.disable_barge_in:
        values["mode"] = "off"
    if i.min_duration_ms:
        if i.min_duration_ms > 5000:
            raise OutOfRange(f"interruptions.min_duration_ms must be at most 5000; got {i.min_duration_ms}")
        values["min_duration_ms"] = i.min_duration_ms
    if i.min_words:
        if i.min_words > 20:
            raise OutOfRange(f"interruptions.min_words must be at most 20; got {i.min_words}")
        values["min_words"] = i.min_words
    if i.backchannels:
        if len(i.backchannels) > 100 or any(len(b) > 64 for b in i.backchannels):
            raise OutOfRange("interruptions.backchannels: at most 100 phrases of at most 64 characters")
        values["backchannels"] = list(i.backchannels)
    return Interruptions.model_validate(values)


def settings_from_config(cfg: pb.SessionConfig, args: AppArgs, *, voice_rate: int,
                         speech_native_available: bool) -> tuple[SessionSettings, WireFormat]:
    """Validate a client's SessionConfig against the deployment's limits."""
    in_enc = encoding_of(cfg.input_encoding)
    out_enc = encoding_of(cfg.output_encoding)
    in_rate = check_encoding_rate(in_enc, cfg.input_sample_rate or (8000 if in_enc != AudioEncoding.PCM16
                                                                     else MODEL_RATE))
    out_default = 8000 if out_enc != AudioEncoding.PCM16 else voice_rate
    out_rate = check_encoding_rate(out_enc, cfg.output_sample_rate or out_default)
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
    for name, lo, hi in (("min_speech_ms", 0, 2000), ("pre_roll_ms", 0, 1000)):
        value = getattr(v, name)
        if value:
            if not lo <= value <= hi:
                raise OutOfRange(f"vad.{name} must be within [{lo}, {hi}]; got {value}")
            setattr(vad, name, value)
    if v.min_silence_ms and not 50 <= v.min_silence_ms <= 5000:
        raise OutOfRange(f"vad.min_silence_ms must be within [50, 5000]; got {v.min_silence_ms}")
    mode = "cascade"
    if cfg.response_mode == pb.SPEECH_NATIVE or (
            cfg.response_mode == pb.RESPONSE_MODE_UNSPECIFIED and args.gateway.speech_native):
        mode = SPEECH_NATIVE
    if mode == SPEECH_NATIVE and not speech_native_available:
        raise FailedPrecondition("speech-native mode was asked for, but this deployment's LLM has no audio "
                                 "model loaded; use CASCADE or deploy an audio LLM (see README)")
    if cfg.voice not in ("", "default") and cfg.voice != args.tts.voice:
        raise InvalidArgument(f"unknown voice {cfg.voice!r}; this deployment has one voice: leave voice empty")
    if cfg.playback and cfg.playback not in _PLAYBACK:
        raise InvalidArgument(f"unknown playback reporting {cfg.playback}")
    g = args.gateway
    settings = SessionSettings(
        input_sample_rate=in_rate, language=check_language(cfg.language),
        system_prompt=cfg.system_prompt, voice=cfg.voice, vad=vad, mode=mode,
        turn=_turn_detection(cfg, g.turn), interruptions=_interruptions(cfg, g.interruptions),
        output_sample_rate=out_rate, partial_transcripts=cfg.partial_transcripts,
        partial_interval_ms=args.asr.partial_interval_ms,
        max_response_tokens=cfg.max_response_tokens or None,
        playback=_PLAYBACK.get(cfg.playback, "estimate"),
        history_turns=g.history_turns, output_chunk_ms=g.output_chunk_ms, chunker=args.tts.chunker,
        timeouts=g.timeouts)
    return settings, WireFormat(decoder(in_enc), out_enc)


def event_to_proto(e: ev.Event, wire: WireFormat | None = None) -> pb.ServerEvent | None:
    """The gRPC event for ``e``; None for engine events gRPC clients do not get."""
    out = pb.ServerEvent(server_time_ms=e.server_time_ms, audio_time_ms=e.audio_time_ms)
    if isinstance(e, ev.AudioOut):
        data = wire.encode(e.pcm16) if wire is not None else e.pcm16
        out.audio.CopyFrom(pb.AudioChunk(data=data, sample_rate=e.sample_rate, response_id=e.response_id,
                                         offset_ms=e.offset_ms, text=e.text))
    elif isinstance(e, ev.TextDelta):
        out.text_delta.CopyFrom(pb.ResponseTextDelta(response_id=e.response_id, text=e.text))
    elif isinstance(e, ev.SpeechStarted):
        out.speech_started.SetInParent()
    elif isinstance(e, ev.SpeechStopped):
        out.speech_stopped.utterance_ms = e.utterance_ms
    elif isinstance(e, ev.InputCommitted):
        out.input_committed.CopyFrom(pb.InputCommitted(input_id=e.input_id, utterance_ms=e.utterance_ms,
                                                       text=e.text))
    elif isinstance(e, ev.InputCleared):
        return None  # the client asked for it
    elif isinstance(e, ev.PartialTranscript):
        out.partial_transcript.text = e.text
    elif isinstance(e, ev.FinalTranscript):
        out.final_transcript.CopyFrom(pb.FinalTranscript(text=e.text, language=e.language,
                                                         utterance_ms=e.utterance_ms, input_id=e.input_id))
    elif isinstance(e, ev.ResponseStarted):
        out.response_started.CopyFrom(pb.ResponseStarted(response_id=e.response_id, input_id=e.input_id))
    elif isinstance(e, ev.ResponseDone):
        lat = e.latency
        out.response_done.CopyFrom(pb.ResponseDone(
            response_id=e.response_id, text=e.text, audio_ms=e.audio_ms,
            latency=pb.TurnLatency(**{f: getattr(lat, f) for f in pb.TurnLatency.DESCRIPTOR.fields_by_name})))
    elif isinstance(e, ev.ResponseInterrupted):
        out.response_interrupted.CopyFrom(pb.ResponseInterrupted(
            response_id=e.response_id, heard_text=e.heard_text, heard_ms=e.heard_ms,
            generated_text=e.generated_text, reason=e.reason))
    elif isinstance(e, ev.ResponsePaused):
        out.response_paused.CopyFrom(pb.ResponsePaused(response_id=e.response_id, played_ms=e.played_ms))
    elif isinstance(e, ev.ResponseResumed):
        out.response_resumed.CopyFrom(pb.ResponseResumed(response_id=e.response_id, reason=e.reason))
    elif isinstance(e, ev.Truncated):
        return None  # the realtime API's event
    elif isinstance(e, ev.SessionStarted):
        out.session_started.CopyFrom(pb.SessionStarted(
            session_id=e.session_id, output_sample_rate=e.output_sample_rate,
            response_mode=pb.SPEECH_NATIVE if e.mode == SPEECH_NATIVE else pb.CASCADE,
            llm_model=e.llm_model, asr_model=e.asr_model))
    elif isinstance(e, ev.ErrorEvent):
        out.error.CopyFrom(pb.Error(code=e.code, message=e.message, response_id=e.response_id))
    else:  # pragma: no cover - a new event type without a mapping is a bug
        raise TypeError(f"no protobuf mapping for {type(e).__name__}")
    return out

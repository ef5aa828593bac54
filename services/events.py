"""Typed events a conversation emits (pipecat-style frames); the gateway maps them to protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TurnLatency:
    """Server-measured latency of one turn, in milliseconds (see voice.proto TurnLatency)."""

    vad_end_delay_ms: float = 0.0
    asr_ms: float = 0.0
    llm_first_token_ms: float = 0.0
    tts_first_audio_ms: float = 0.0
    first_audio_ms: float = 0.0
    voice_to_voice_ms: float = 0.0
    total_ms: float = 0.0
    llm_tokens: int = 0
    llm_tokens_per_s: float = 0.0


@dataclass
class Event:
    """Base: ``server_time_ms`` is set when emitted; ``audio_time_ms`` is the input position."""

    server_time_ms: int = field(default=0, init=False)
    audio_time_ms: int = field(default=0, init=False)


@dataclass
class SessionStarted(Event):
    session_id: str
    output_sample_rate: int
    mode: str
    llm_model: str = ""
    asr_model: str = ""


@dataclass
class SpeechStarted(Event):
    pass


@dataclass
class SpeechStopped(Event):
    utterance_ms: int


@dataclass
class PartialTranscript(Event):
    text: str


@dataclass
class FinalTranscript(Event):
    text: str
    language: str
    utterance_ms: int


@dataclass
class ResponseStarted(Event):
    response_id: int


@dataclass
class TextDelta(Event):
    response_id: int
    text: str


@dataclass
class AudioOut(Event):
    response_id: int
    pcm16: bytes
    sample_rate: int
    offset_ms: int
    text: str = ""


@dataclass
class ResponseDone(Event):
    response_id: int
    text: str
    audio_ms: int
    latency: TurnLatency


@dataclass
class ResponseInterrupted(Event):
    response_id: int
    heard_text: str
    heard_ms: int
    generated_text: str


@dataclass
class ErrorEvent(Event):
    code: str
    message: str


#: Events that belong to one response and are dropped from the send queue when it is interrupted.
RESPONSE_PAYLOAD = (TextDelta, AudioOut)

"""Typed events a conversation emits (pipecat-style frames); each adapter maps them to its protocol.

What an interruption drops is a property of the type: ``ResponsePayload`` events (text deltas and
audio of one response) are purged from the send queue when their response is interrupted;
everything else is always delivered.
"""

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
    speculative: bool = False  # the answer was started before the turn ended, and kept
    # The caller's playout buffer, estimated server-side up to the last audio sent:
    underruns: int = 0  # audio pieces sent after the buffer had run dry (stalls inside the answer)
    underrun_ms: float = 0.0  # the silence those stalls put inside the answer
    min_buffer_ms: float = 0.0  # least audio the caller had in hand when a piece was sent


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
    resume_token: str = ""  # continue this session after its stream breaks ('' = no session journal)
    resumed: bool = False  # this stream continues an earlier session
    restored_turns: int = 0  # history messages restored


@dataclass
class SessionMoved(Event):
    """The replica is going away: reconnect with ``resume_token`` (the stream ends after this)."""

    resume_token: str
    reason: str = "draining"


@dataclass
class SpeechStarted(Event):
    pass


@dataclass
class SpeechStopped(Event):
    utterance_ms: int


@dataclass
class InputCommitted(Event):
    """A user turn is over and will be answered (or kept, without auto-respond) as ``input_id``."""

    input_id: int
    utterance_ms: int = 0
    text: str = ""  # typed turns: the text; spoken turns: '' (the transcript follows)


@dataclass
class InputCleared(Event):
    """Uncommitted user audio was dropped (clear_audio)."""


@dataclass
class PartialTranscript(Event):
    text: str


@dataclass
class FinalTranscript(Event):
    text: str
    language: str
    utterance_ms: int
    input_id: int = 0


@dataclass
class ResponseStarted(Event):
    response_id: int
    input_id: int = 0
    filler: bool = False  # a short phrase said while a tool runs, not an answer


@dataclass
class ResponsePayload(Event):
    """Content of one response; dropped from the send queue if the response is interrupted."""

    response_id: int


@dataclass
class TextDelta(ResponsePayload):
    text: str


@dataclass
class AudioOut(ResponsePayload):
    pcm16: bytes
    sample_rate: int
    offset_ms: int
    text: str = ""


@dataclass
class ResponsePaused(Event):
    """User speech over the answer: the client should pause playback until Resumed/Interrupted."""

    response_id: int
    played_ms: int


@dataclass
class ResponseResumed(Event):
    """The speech over the answer was not a turn (noise, cough, backchannel): play on."""

    response_id: int
    reason: str  # "noise" | "backchannel"


@dataclass
class ResponseDone(Event):
    response_id: int
    text: str
    audio_ms: int
    latency: TurnLatency
    filler: bool = False  # a phrase said while a tool ran, not an answer (no latency figures of its own)


@dataclass
class ResponseInterrupted(Event):
    response_id: int
    heard_text: str
    heard_ms: int
    generated_text: str
    reason: str = "barge_in"  # "barge_in" | "cancelled" | "text_turn"


@dataclass
class Truncated(Event):
    """The client said the user heard only ``audio_end_ms`` of a response (history updated)."""

    response_id: int
    audio_end_ms: int
    heard_text: str


@dataclass
class ToolCallStarted(Event):
    """The model began a call of ``name`` in ``response_id`` (its arguments follow)."""

    response_id: int
    call_id: str
    name: str
    index: int = 0  # order of the call within its response (parallel calls)


@dataclass
class ToolCallArguments(Event):
    """A piece of a call's arguments JSON, as the model writes them (ToolCallDone.arguments is the
    final reading: the same text when the model writes compact JSON, else its normal form)."""

    response_id: int
    call_id: str
    delta: str


@dataclass
class ToolCallDone(Event):
    """The call is complete: run it and send its result (``submit_tool_result``). With ``error``
    set its arguments did not match the tool's schema: it is not a call, no result is awaited."""

    response_id: int
    call_id: str
    name: str
    arguments: str
    error: str = ""


@dataclass
class ToolCallCancelled(Event):
    """A call's result is no longer awaited: the user spoke on (barge_in), the response was
    cancelled (cancelled), the result did not come in time (timeout), or the session ended (closed).
    A result sent later is recorded in the history but not spoken."""

    call_id: str
    reason: str


@dataclass
class ToolResultAccepted(Event):
    """The client's result of ``call_id`` is in the history; ``late`` if the call had been cancelled."""

    call_id: str
    late: bool = False


@dataclass
class ErrorEvent(Event):
    code: str
    message: str
    response_id: int = 0
    tool_call_id: str = ""  # about a tool call (timeout, unknown id, second result), not a turn

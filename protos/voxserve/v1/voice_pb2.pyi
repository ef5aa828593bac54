from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    PCM16: _ClassVar[AudioEncoding]
    FLOAT32: _ClassVar[AudioEncoding]
    MULAW: _ClassVar[AudioEncoding]
    ALAW: _ClassVar[AudioEncoding]

class ResponseMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_MODE_UNSPECIFIED: _ClassVar[ResponseMode]
    CASCADE: _ClassVar[ResponseMode]
    SPEECH_NATIVE: _ClassVar[ResponseMode]

class TurnDetectionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_DETECTION_UNSPECIFIED: _ClassVar[TurnDetectionMode]
    SEMANTIC: _ClassVar[TurnDetectionMode]
    SILENCE: _ClassVar[TurnDetectionMode]
    MANUAL: _ClassVar[TurnDetectionMode]

class InterruptionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERRUPTION_UNSPECIFIED: _ClassVar[InterruptionMode]
    INTERRUPTION_PAUSE: _ClassVar[InterruptionMode]
    INTERRUPTION_CANCEL: _ClassVar[InterruptionMode]
    INTERRUPTION_OFF: _ClassVar[InterruptionMode]

class PlaybackReporting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAYBACK_UNSPECIFIED: _ClassVar[PlaybackReporting]
    PLAYBACK_ESTIMATE: _ClassVar[PlaybackReporting]
    PLAYBACK_REPORTED: _ClassVar[PlaybackReporting]
    PLAYBACK_NONE: _ClassVar[PlaybackReporting]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
PCM16: AudioEncoding
FLOAT32: AudioEncoding
MULAW: AudioEncoding
ALAW: AudioEncoding
RESPONSE_MODE_UNSPECIFIED: ResponseMode
CASCADE: ResponseMode
SPEECH_NATIVE: ResponseMode
TURN_DETECTION_UNSPECIFIED: TurnDetectionMode
SEMANTIC: TurnDetectionMode
SILENCE: TurnDetectionMode
MANUAL: TurnDetectionMode
INTERRUPTION_UNSPECIFIED: InterruptionMode
INTERRUPTION_PAUSE: InterruptionMode
INTERRUPTION_CANCEL: InterruptionMode
INTERRUPTION_OFF: InterruptionMode
PLAYBACK_UNSPECIFIED: PlaybackReporting
PLAYBACK_ESTIMATE: PlaybackReporting
PLAYBACK_REPORTED: PlaybackReporting
PLAYBACK_NONE: PlaybackReporting

class VADSettings(_message.Message):
    __slots__ = ("threshold", "min_silence_ms", "min_speech_ms", "pre_roll_ms")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEECH_MS_FIELD_NUMBER: _ClassVar[int]
    PRE_ROLL_MS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    min_silence_ms: int
    min_speech_ms: int
    pre_roll_ms: int
    def __init__(self, threshold: _Optional[float] = ..., min_silence_ms: _Optional[int] = ..., min_speech_ms: _Optional[int] = ..., pre_roll_ms: _Optional[int] = ...) -> None: ...

class TurnDetectionSettings(_message.Message):
    __slots__ = ("mode", "min_silence_ms", "max_silence_ms", "disable_speculation")
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    DISABLE_SPECULATION_FIELD_NUMBER: _ClassVar[int]
    mode: TurnDetectionMode
    min_silence_ms: int
    max_silence_ms: int
    disable_speculation: bool
    def __init__(self, mode: _Optional[_Union[TurnDetectionMode, str]] = ..., min_silence_ms: _Optional[int] = ..., max_silence_ms: _Optional[int] = ..., disable_speculation: _Optional[bool] = ...) -> None: ...

class InterruptionSettings(_message.Message):
    __slots__ = ("mode", "min_duration_ms", "min_words", "backchannels")
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_WORDS_FIELD_NUMBER: _ClassVar[int]
    BACKCHANNELS_FIELD_NUMBER: _ClassVar[int]
    mode: InterruptionMode
    min_duration_ms: int
    min_words: int
    backchannels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[_Union[InterruptionMode, str]] = ..., min_duration_ms: _Optional[int] = ..., min_words: _Optional[int] = ..., backchannels: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("input_encoding", "input_sample_rate", "language", "system_prompt", "voice", "vad", "response_mode", "output_sample_rate", "partial_transcripts", "max_response_tokens", "barge_in", "disable_barge_in", "turn_detection", "interruptions", "playback", "output_encoding", "tools", "tool_choice", "tool_calling", "resume_token")
    INPUT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    INPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    VAD_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_TRANSCRIPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BARGE_IN_FIELD_NUMBER: _ClassVar[int]
    DISABLE_BARGE_IN_FIELD_NUMBER: _ClassVar[int]
    TURN_DETECTION_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTIONS_FIELD_NUMBER: _ClassVar[int]
    PLAYBACK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLING_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    input_encoding: AudioEncoding
    input_sample_rate: int
    language: str
    system_prompt: str
    voice: str
    vad: VADSettings
    response_mode: ResponseMode
    output_sample_rate: int
    partial_transcripts: bool
    max_response_tokens: int
    barge_in: bool
    disable_barge_in: bool
    turn_detection: TurnDetectionSettings
    interruptions: InterruptionSettings
    playback: PlaybackReporting
    output_encoding: AudioEncoding
    tools: _containers.RepeatedCompositeFieldContainer[Tool]
    tool_choice: str
    tool_calling: ToolCallSettings
    resume_token: str
    def __init__(self, input_encoding: _Optional[_Union[AudioEncoding, str]] = ..., input_sample_rate: _Optional[int] = ..., language: _Optional[str] = ..., system_prompt: _Optional[str] = ..., voice: _Optional[str] = ..., vad: _Optional[_Union[VADSettings, _Mapping]] = ..., response_mode: _Optional[_Union[ResponseMode, str]] = ..., output_sample_rate: _Optional[int] = ..., partial_transcripts: _Optional[bool] = ..., max_response_tokens: _Optional[int] = ..., barge_in: _Optional[bool] = ..., disable_barge_in: _Optional[bool] = ..., turn_detection: _Optional[_Union[TurnDetectionSettings, _Mapping]] = ..., interruptions: _Optional[_Union[InterruptionSettings, _Mapping]] = ..., playback: _Optional[_Union[PlaybackReporting, str]] = ..., output_encoding: _Optional[_Union[AudioEncoding, str]] = ..., tools: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ..., tool_choice: _Optional[str] = ..., tool_calling: _Optional[_Union[ToolCallSettings, _Mapping]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class Tool(_message.Message):
    __slots__ = ("name", "description", "parameters_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters_json: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters_json: _Optional[str] = ...) -> None: ...

class ToolCallSettings(_message.Message):
    __slots__ = ("disable_filler", "filler_text", "filler_after_ms", "result_timeout_ms", "manual_continue")
    DISABLE_FILLER_FIELD_NUMBER: _ClassVar[int]
    FILLER_TEXT_FIELD_NUMBER: _ClassVar[int]
    FILLER_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    RESULT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MANUAL_CONTINUE_FIELD_NUMBER: _ClassVar[int]
    disable_filler: bool
    filler_text: str
    filler_after_ms: int
    result_timeout_ms: int
    manual_continue: bool
    def __init__(self, disable_filler: _Optional[bool] = ..., filler_text: _Optional[str] = ..., filler_after_ms: _Optional[int] = ..., result_timeout_ms: _Optional[int] = ..., manual_continue: _Optional[bool] = ...) -> None: ...

class AudioInput(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class TextInput(_message.Message):
    __slots__ = ("text", "interrupt")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    text: str
    interrupt: bool
    def __init__(self, text: _Optional[str] = ..., interrupt: _Optional[bool] = ...) -> None: ...

class PlaybackPosition(_message.Message):
    __slots__ = ("response_id", "played_ms", "underruns", "underrun_ms")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    UNDERRUNS_FIELD_NUMBER: _ClassVar[int]
    UNDERRUN_MS_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    played_ms: int
    underruns: int
    underrun_ms: float
    def __init__(self, response_id: _Optional[int] = ..., played_ms: _Optional[int] = ..., underruns: _Optional[int] = ..., underrun_ms: _Optional[float] = ...) -> None: ...

class EndOfInput(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CommitInput(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearInput(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("call_id", "output_json")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    output_json: str
    def __init__(self, call_id: _Optional[str] = ..., output_json: _Optional[str] = ...) -> None: ...

class CreateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("config", "audio", "text", "playback", "end_of_input", "commit", "clear", "cancel_response", "tool_result", "create_response")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PLAYBACK_FIELD_NUMBER: _ClassVar[int]
    END_OF_INPUT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    CANCEL_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    CREATE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    audio: AudioInput
    text: TextInput
    playback: PlaybackPosition
    end_of_input: EndOfInput
    commit: CommitInput
    clear: ClearInput
    cancel_response: CancelResponse
    tool_result: ToolResult
    create_response: CreateResponse
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioInput, _Mapping]] = ..., text: _Optional[_Union[TextInput, _Mapping]] = ..., playback: _Optional[_Union[PlaybackPosition, _Mapping]] = ..., end_of_input: _Optional[_Union[EndOfInput, _Mapping]] = ..., commit: _Optional[_Union[CommitInput, _Mapping]] = ..., clear: _Optional[_Union[ClearInput, _Mapping]] = ..., cancel_response: _Optional[_Union[CancelResponse, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., create_response: _Optional[_Union[CreateResponse, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "output_sample_rate", "response_mode", "llm_model", "asr_model", "resume_token", "resumed", "restored_turns")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MODE_FIELD_NUMBER: _ClassVar[int]
    LLM_MODEL_FIELD_NUMBER: _ClassVar[int]
    ASR_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    RESTORED_TURNS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    output_sample_rate: int
    response_mode: ResponseMode
    llm_model: str
    asr_model: str
    resume_token: str
    resumed: bool
    restored_turns: int
    def __init__(self, session_id: _Optional[str] = ..., output_sample_rate: _Optional[int] = ..., response_mode: _Optional[_Union[ResponseMode, str]] = ..., llm_model: _Optional[str] = ..., asr_model: _Optional[str] = ..., resume_token: _Optional[str] = ..., resumed: _Optional[bool] = ..., restored_turns: _Optional[int] = ...) -> None: ...

class SessionMoved(_message.Message):
    __slots__ = ("resume_token", "reason")
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    resume_token: str
    reason: str
    def __init__(self, resume_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SpeechStopped(_message.Message):
    __slots__ = ("utterance_ms",)
    UTTERANCE_MS_FIELD_NUMBER: _ClassVar[int]
    utterance_ms: int
    def __init__(self, utterance_ms: _Optional[int] = ...) -> None: ...

class PartialTranscript(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class FinalTranscript(_message.Message):
    __slots__ = ("text", "language", "utterance_ms", "input_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_MS_FIELD_NUMBER: _ClassVar[int]
    INPUT_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    language: str
    utterance_ms: int
    input_id: int
    def __init__(self, text: _Optional[str] = ..., language: _Optional[str] = ..., utterance_ms: _Optional[int] = ..., input_id: _Optional[int] = ...) -> None: ...

class InputCommitted(_message.Message):
    __slots__ = ("input_id", "utterance_ms", "text")
    INPUT_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    input_id: int
    utterance_ms: int
    text: str
    def __init__(self, input_id: _Optional[int] = ..., utterance_ms: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class ResponseStarted(_message.Message):
    __slots__ = ("response_id", "input_id", "filler")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_ID_FIELD_NUMBER: _ClassVar[int]
    FILLER_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    input_id: int
    filler: bool
    def __init__(self, response_id: _Optional[int] = ..., input_id: _Optional[int] = ..., filler: _Optional[bool] = ...) -> None: ...

class ResponseTextDelta(_message.Message):
    __slots__ = ("response_id", "text")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    text: str
    def __init__(self, response_id: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data", "sample_rate", "response_id", "offset_ms", "text")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sample_rate: int
    response_id: int
    offset_ms: int
    text: str
    def __init__(self, data: _Optional[bytes] = ..., sample_rate: _Optional[int] = ..., response_id: _Optional[int] = ..., offset_ms: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class TurnLatency(_message.Message):
    __slots__ = ("vad_end_delay_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_ms", "voice_to_voice_ms", "total_ms", "llm_tokens", "llm_tokens_per_s", "speculative", "underruns", "underrun_ms", "min_buffer_ms")
    VAD_END_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    ASR_MS_FIELD_NUMBER: _ClassVar[int]
    LLM_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TTS_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    VOICE_TO_VOICE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    LLM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LLM_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    UNDERRUNS_FIELD_NUMBER: _ClassVar[int]
    UNDERRUN_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_BUFFER_MS_FIELD_NUMBER: _ClassVar[int]
    vad_end_delay_ms: float
    asr_ms: float
    llm_first_token_ms: float
    tts_first_audio_ms: float
    first_audio_ms: float
    voice_to_voice_ms: float
    total_ms: float
    llm_tokens: int
    llm_tokens_per_s: float
    speculative: bool
    underruns: int
    underrun_ms: float
    min_buffer_ms: float
    def __init__(self, vad_end_delay_ms: _Optional[float] = ..., asr_ms: _Optional[float] = ..., llm_first_token_ms: _Optional[float] = ..., tts_first_audio_ms: _Optional[float] = ..., first_audio_ms: _Optional[float] = ..., voice_to_voice_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., llm_tokens: _Optional[int] = ..., llm_tokens_per_s: _Optional[float] = ..., speculative: _Optional[bool] = ..., underruns: _Optional[int] = ..., underrun_ms: _Optional[float] = ..., min_buffer_ms: _Optional[float] = ...) -> None: ...

class ResponseDone(_message.Message):
    __slots__ = ("response_id", "text", "audio_ms", "latency")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    text: str
    audio_ms: int
    latency: TurnLatency
    def __init__(self, response_id: _Optional[int] = ..., text: _Optional[str] = ..., audio_ms: _Optional[int] = ..., latency: _Optional[_Union[TurnLatency, _Mapping]] = ...) -> None: ...

class ResponseInterrupted(_message.Message):
    __slots__ = ("response_id", "heard_text", "heard_ms", "generated_text", "reason")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARD_TEXT_FIELD_NUMBER: _ClassVar[int]
    HEARD_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TEXT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    heard_text: str
    heard_ms: int
    generated_text: str
    reason: str
    def __init__(self, response_id: _Optional[int] = ..., heard_text: _Optional[str] = ..., heard_ms: _Optional[int] = ..., generated_text: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResponsePaused(_message.Message):
    __slots__ = ("response_id", "played_ms")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    played_ms: int
    def __init__(self, response_id: _Optional[int] = ..., played_ms: _Optional[int] = ...) -> None: ...

class ResponseResumed(_message.Message):
    __slots__ = ("response_id", "reason")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    reason: str
    def __init__(self, response_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "response_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    response_id: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., response_id: _Optional[int] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("response_id", "call_id", "name", "arguments_delta", "done", "arguments_json", "error")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response_id: int
    call_id: str
    name: str
    arguments_delta: str
    done: bool
    arguments_json: str
    error: str
    def __init__(self, response_id: _Optional[int] = ..., call_id: _Optional[str] = ..., name: _Optional[str] = ..., arguments_delta: _Optional[str] = ..., done: _Optional[bool] = ..., arguments_json: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ToolCallCancelled(_message.Message):
    __slots__ = ("call_id", "reason")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    reason: str
    def __init__(self, call_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ToolResultAccepted(_message.Message):
    __slots__ = ("call_id", "late")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    late: bool
    def __init__(self, call_id: _Optional[str] = ..., late: _Optional[bool] = ...) -> None: ...

class ServerEvent(_message.Message):
    __slots__ = ("server_time_ms", "audio_time_ms", "session_started", "speech_started", "speech_stopped", "partial_transcript", "final_transcript", "response_started", "text_delta", "audio", "response_done", "response_interrupted", "error", "response_paused", "response_resumed", "input_committed", "tool_call", "tool_call_cancelled", "tool_result_accepted", "session_moved")
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STOPPED_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    FINAL_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DONE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_PAUSED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_RESUMED_FIELD_NUMBER: _ClassVar[int]
    INPUT_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SESSION_MOVED_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    audio_time_ms: int
    session_started: SessionStarted
    speech_started: SpeechStarted
    speech_stopped: SpeechStopped
    partial_transcript: PartialTranscript
    final_transcript: FinalTranscript
    response_started: ResponseStarted
    text_delta: ResponseTextDelta
    audio: AudioChunk
    response_done: ResponseDone
    response_interrupted: ResponseInterrupted
    error: Error
    response_paused: ResponsePaused
    response_resumed: ResponseResumed
    input_committed: InputCommitted
    tool_call: ToolCall
    tool_call_cancelled: ToolCallCancelled
    tool_result_accepted: ToolResultAccepted
    session_moved: SessionMoved
    def __init__(self, server_time_ms: _Optional[int] = ..., audio_time_ms: _Optional[int] = ..., session_started: _Optional[_Union[SessionStarted, _Mapping]] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., speech_stopped: _Optional[_Union[SpeechStopped, _Mapping]] = ..., partial_transcript: _Optional[_Union[PartialTranscript, _Mapping]] = ..., final_transcript: _Optional[_Union[FinalTranscript, _Mapping]] = ..., response_started: _Optional[_Union[ResponseStarted, _Mapping]] = ..., text_delta: _Optional[_Union[ResponseTextDelta, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., response_done: _Optional[_Union[ResponseDone, _Mapping]] = ..., response_interrupted: _Optional[_Union[ResponseInterrupted, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., response_paused: _Optional[_Union[ResponsePaused, _Mapping]] = ..., response_resumed: _Optional[_Union[ResponseResumed, _Mapping]] = ..., input_committed: _Optional[_Union[InputCommitted, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., tool_call_cancelled: _Optional[_Union[ToolCallCancelled, _Mapping]] = ..., tool_result_accepted: _Optional[_Union[ToolResultAccepted, _Mapping]] = ..., session_moved: _Optional[_Union[SessionMoved, _Mapping]] = ...) -> None: ...

class TranscribeConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate", "language", "partial_transcripts")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_TRANSCRIPTS_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate: int
    language: str
    partial_transcripts: bool
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate: _Optional[int] = ..., language: _Optional[str] = ..., partial_transcripts: _Optional[bool] = ...) -> None: ...

class TranscribeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: TranscribeConfig
    audio: AudioInput
    def __init__(self, config: _Optional[_Union[TranscribeConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioInput, _Mapping]] = ...) -> None: ...

class TranscriptEvent(_message.Message):
    __slots__ = ("text", "is_final", "language", "start_ms", "end_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    is_final: bool
    language: str
    start_ms: int
    end_ms: int
    def __init__(self, text: _Optional[str] = ..., is_final: _Optional[bool] = ..., language: _Optional[str] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("text", "voice", "sample_rate")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    text: str
    voice: str
    sample_rate: int
    def __init__(self, text: _Optional[str] = ..., voice: _Optional[str] = ..., sample_rate: _Optional[int] = ...) -> None: ...

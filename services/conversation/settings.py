"""Typed settings of one conversation: what a client may tune per session, with server defaults.

The gateway (gRPC) and the realtime adapter (WebSocket) both validate their client's session
config into ``SessionSettings``; the engine never sees a protocol message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.audio import MODEL_RATE
from services.chunking import ChunkerConfig
from services.errors import InvalidArgument
from services.tools import ToolChoice, ToolSpec, check_tools
from services.vad import VADConfig

CASCADE, SPEECH_NATIVE = "cascade", "speech_native"

#: Short acknowledgements a listener says while the other one talks; they never interrupt.
DEFAULT_BACKCHANNELS: tuple[str, ...] = (
    "uh huh", "uh-huh", "mm hmm", "mm-hmm", "mhm", "hmm", "mm", "yeah", "yes", "yep", "ok", "okay",
    "right", "sure", "i see", "got it", "cool", "nice", "wow", "oh", "ah", "alright", "all right",
)


class TurnDetection(BaseModel):
    """When the user's turn is over (end of turn), and whether the answer starts before that."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["semantic", "silence", "manual"] = Field(
        "semantic",
        description="semantic: silence plus the end-of-turn model and the transcript; silence: a fixed "
        "silence; manual: the client commits each turn (push-to-talk).")
    min_silence_ms: int = Field(
        300, ge=50, le=5000,
        description="Silence after which a turn that looks complete ends (silence mode: every turn).")
    max_silence_ms: int = Field(
        1500, ge=100, le=10_000,
        description="Semantic mode: silence after which a turn ends even if it looks unfinished.")
    speculate: bool = Field(
        True, description="Start ASR, LLM and the first TTS chunk when the silence begins; release on "
        "end of turn, discard if the user speaks on.")
    speculate_after_ms: int = Field(
        0, ge=0, le=2000,
        description="Silence after which speculation (and the semantic check) starts; the VAD itself "
        "notices silence ~30-60 ms late, and a speculation that the user talks over is only aborted.")
    completion_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="End-of-turn model probability above which the turn is complete.")

    @model_validator(mode="after")
    def _order(self) -> TurnDetection:
        if self.max_silence_ms < self.min_silence_ms:
            raise ValueError("max_silence_ms must be >= min_silence_ms")
        return self


class Interruptions(BaseModel):
    """What user speech over the assistant's answer does (barge-in)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["pause", "cancel", "off"] = Field(
        "pause",
        description="pause: pause the answer, then interrupt (real turn) or resume (noise, backchannel); "
        "cancel: interrupt at once; off: never interrupt, answer the user's words afterwards.")
    min_duration_ms: int = Field(
        400, ge=0, le=5000, description="Speech shorter than this over an answer is noise: the answer resumes.")
    min_words: int = Field(1, ge=0, le=20, description="Fewer recognised words than this is noise: the answer resumes.")
    backchannels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BACKCHANNELS),
        description="Phrases that only acknowledge (uh-huh, okay...): the answer resumes.")
    resume_silence_ms: int = Field(
        300, ge=50, le=5000, description="Silence after a burst of speech before the paused answer resumes.")


class StageTimeouts(BaseModel):
    """Deadlines of stage calls: a stage that misses one ends that turn with an Error event."""

    model_config = ConfigDict(extra="forbid")

    asr_s: float = Field(10.0, gt=0, description="One transcription.")
    llm_first_token_s: float = Field(20.0, gt=0, description="LLM request sent -> first text delta.")
    llm_stall_s: float = Field(10.0, gt=0, description="Longest gap between two LLM text deltas.")
    tts_first_audio_s: float = Field(10.0, gt=0, description="Text chunk sent -> its first audio.")
    tts_stall_s: float = Field(10.0, gt=0, description="Longest gap between two audio pieces of a chunk.")
    turn_detector_s: float = Field(2.0, gt=0, description="One end-of-turn model call.")


class Playout(BaseModel):
    """How the answer audio is scheduled against the caller's playout buffer."""

    model_config = ConfigDict(extra="forbid")

    speculative_slack_ms: int = Field(
        0, ge=0, le=60000, description="A speculation's speech synthesis is scheduled as if its caller "
        "waited from the earliest end of turn (turn.min_silence_ms after the speech stopped) plus this.")
    speech_ms_per_word: float = Field(
        200.0, gt=0, le=2000, description="Spoken length of a word, to date a chunk asked for ahead: it "
        "is due after the audio of the chunks before it (a low guess schedules it early, never late).")
    tts_lookahead: int = Field(
        2, ge=1, le=8, description="Text chunks of one answer being synthesized at once: the next one "
        "waits in the TTS queue with its deadline while this one is synthesized (1: one after another).")
    cut_lead_ms: float = Field(
        600.0, ge=0, le=10000, description="After the first chunk, when no chunk is being synthesized and the "
        "caller has less than this much audio left, the words the LLM has written so far are spoken at once, "
        "without waiting for a boundary: a word of many tokens ('100°C') would otherwise leave a gap (0: off).")


class ToolCalling(BaseModel):
    """What happens while the client runs a tool the model called."""

    model_config = ConfigDict(extra="forbid")

    filler: bool = Field(True, description="Speak filler_text while a tool runs, when the model said nothing "
                         "before its call and no result came within filler_after_ms (no dead air).")
    filler_text: str = Field("One moment.", min_length=1, max_length=200, description="What the filler says.")
    filler_after_ms: int = Field(700, ge=0, le=30_000, description="Wait for a result before the filler is spoken.")
    result_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="A call with no result after this ends with an error event; the model "
        "is then told it failed.")
    tools_after_results: bool = Field(
        False, description="The answer after tool results may call tools again (several steps); off: it answers "
        "in words, without the tools in its prompt (small models tend to echo the result as JSON otherwise).")
    auto_continue: bool = Field(
        True, description="Answer by itself once every call of a response has its result (gRPC); off: wait for "
        "create_response, as the OpenAI Realtime API does.")


class SessionSettings(BaseModel):
    """Per-conversation settings (from the client's session config, validated by its adapter)."""

    model_config = ConfigDict(extra="forbid")

    input_sample_rate: int = Field(MODEL_RATE, description="Rate of the client's audio.")
    language: str | None = Field(
        None, description="Language of the user's speech: ISO 639-1 code, 'auto' = detect, None = server default.")
    system_prompt: str = Field("", description="System prompt; '' = the LLM's default.")
    voice: str = Field("", description="TTS voice; '' = the deployment's default.")
    vad: VADConfig = Field(default_factory=VADConfig, description="Voice activity detection settings.")
    turn: TurnDetection = Field(default_factory=TurnDetection, description="End-of-turn detection.")
    interruptions: Interruptions = Field(default_factory=Interruptions, description="Barge-in behaviour.")
    mode: Literal["cascade", "speech_native"] = Field("cascade", description="'cascade' or 'speech_native'.")
    output_sample_rate: int = Field(22050, description="Rate of the answer audio sent.")
    partial_transcripts: bool = Field(False, description="Emit partial transcripts while the user speaks.")
    partial_interval_ms: int = Field(700, ge=100, description="Min wall time between partials.")
    max_response_tokens: int | None = Field(None, description="Cap on answer tokens; None = LLM default.")
    auto_respond: bool = Field(True, description="Answer each user turn at once (off: wait for create_response).")
    playback: Literal["estimate", "reported", "none"] = Field(
        "estimate",
        description="How the server knows what the user heard: estimate = real-time playback from the first "
        "chunk (corrected by PlaybackPosition reports); reported = only the client's reports; none = the "
        "client plays no audio, everything sent counts as heard.")
    history_turns: int = Field(8, ge=0, description="User+assistant turn pairs kept as LLM context.")
    output_chunk_ms: int = Field(100, ge=20, description="Answer audio is sent in pieces of this length.")
    chunker: ChunkerConfig = Field(default_factory=ChunkerConfig, description="LLM text -> TTS chunks.")
    playout: Playout = Field(default_factory=Playout, description="Scheduling against the caller's playout buffer.")
    send_queue: int = Field(64, ge=4, description="Events buffered for a slow client before backpressure.")
    held_events: int = Field(
        256, ge=8, description="Events a speculative or paused answer may hold before its generation waits.")
    max_queued_inputs: int = Field(
        4, ge=1, description="User turns waiting for the current answer to finish (barge-in off, typed turns).")
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts, description="Stage deadlines.")
    tools: list[ToolSpec] = Field(default_factory=list, description="Functions the model may call.")
    tool_choice: Any = Field(
        "auto", description="auto, none, required, or a function ({'type': 'function', 'name': ...}).")
    tool_calling: ToolCalling = Field(default_factory=ToolCalling, description="Filler, deadline and "
                                      "continuation of tool calls.")

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, value: Any) -> Any:
        try:
            return ToolChoice.parse(value).wire()
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None

    @model_validator(mode="after")
    def _tools(self) -> SessionSettings:
        try:
            check_tools(self.tools, self.choice)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        return self

    @property
    def choice(self) -> ToolChoice:
        return ToolChoice.parse(self.tool_choice)

"""The OpenAI Realtime (GA) protocol adapter's mapping: JSON events <-> the conversation engine.

What lives here (no FastAPI, no Ray): the client's session object validated into our
``SessionSettings`` (``RealtimeConfig``), the client events' shapes, the error payloads, and
``EventMapper``, which turns each engine event into the OpenAI server events it stands for and
keeps the string ids (items, responses) that the protocol needs and the engine does not have.
The WebSocket session that drives it is ``deployments.realtime``. docs/realtime.md lists the
supported subset and every deviation.
"""

from __future__ import annotations

import base64
import secrets
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.config import AppArgs
from deployments.protocol import MAX_RESPONSE_TOKENS, MAX_SYSTEM_PROMPT_CHARS, check_language
from services.audio import pcm16_to_float
from services.codecs import G711, AudioEncoding, check_encoding_rate, encoder, parse_encoding
from services.conversation import events as ev
from services.conversation.settings import CASCADE, SPEECH_NATIVE, SessionSettings, TurnDetection
from services.errors import InvalidArgument, VoxError

#: The OpenAI default audio: 16-bit PCM at 24 kHz, in and out.
DEFAULT_RATE = 24000
#: OpenAI's built-in voice names: accepted and spoken with the deployment's voice.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"})
#: semantic_vad eagerness -> longest silence before an unfinished-looking turn ends (None = the default).
EAGERNESS_MAX_SILENCE_MS: dict[str, int | None] = {"low": 3000, "medium": None, "auto": None, "high": 800}
#: Item and response ids remembered for truncate and transcripts (older ones are forgotten).
REMEMBERED_IDS = 64
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_ID_CHARS = 64
_WireT = TypeVar("_WireT", bound=BaseModel)
#: Our error codes (gRPC names) -> OpenAI error type: what the client can fix vs what it cannot.
_CLIENT_CODES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "UNAUTHENTICATED"})


class RealtimeError(InvalidArgument):
    """A client event the protocol rejects: sent as an ``error`` event with an OpenAI-style code
    (``invalid_value``, ``unknown_parameter``...) and the parameter at fault; the session goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.realtime_code = code
        self.param = param


def error_payload(code: str, message: str, *, error_type: str = "invalid_request_error", param: str | None = None,
                  event_id: str | None = None) -> dict[str, Any]:
    """An ``error`` server event (its ``event_id`` is added when it is sent)."""
    return {"type": "error", "error": {"type": error_type, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


def error_for(exc: BaseException, *, code: str | None = None, param: str | None = None,
              event_id: str | None = None) -> dict[str, Any]:
    """The ``error`` event for one of our errors: its code in lower case unless the protocol has its own."""
    if isinstance(exc, RealtimeError):
        return error_payload(code or exc.realtime_code, exc.message, param=param or exc.param, event_id=event_id)
    from services.errors import to_vox_error

    err = to_vox_error(exc)
    kind = "invalid_request_error" if err.code in _CLIENT_CODES else "server_error"
    return error_payload(code or err.code.lower(), err.message, error_type=kind, param=param, event_id=event_id)


def parse_event(model: type[_WireT], obj: dict[str, Any], prefix: str = "") -> _WireT:
    """Validate a client event (or part of one); the first problem becomes a RealtimeError naming
    the parameter, with OpenAI's codes (unknown_parameter, missing_required_parameter, invalid_value)."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        param = f"{prefix}.{where}".strip(".") if where else (prefix or None)
        kind = first["type"]
        if kind == "extra_forbidden":
            raise RealtimeError(f"unknown parameter '{param}'", "unknown_parameter", param) from None
        if kind == "missing":
            raise RealtimeError(f"missing required parameter '{param}'", "missing_required_parameter", param) from None
        raise RealtimeError(f"invalid value for '{param}': {first['msg']}", "invalid_value", param) from None


# --- client event shapes ----------------------------------------------------------------------------


class _Wire(BaseModel):
    """A JSON object of the protocol: unknown fields are errors (as OpenAI answers them)."""

    model_config = ConfigDict(extra="forbid")


class WireFormat(_Wire):
    """``{"type": "audio/pcm", "rate": 24000}``, ``{"type": "audio/pcmu"}``, ``{"type": "audio/pcma"}``."""

    type: str = Field(description="audio/pcm, audio/pcmu or audio/pcma (beta names pcm16, g711_ulaw, g711_alaw too).")
    rate: int | None = Field(None, description="Sample rate; audio/pcm defaults to 24000, G.711 is 8000.")


class WireTurnDetection(_Wire):
    """server_vad or semantic_vad; ``null`` (turn detection off) is handled by the caller."""

    type: Literal["server_vad", "semantic_vad"] = Field(description="Kind of turn detection.")
    threshold: float | None = Field(None, ge=0.05, le=0.95, description="server_vad: VAD speech probability.")
    prefix_padding_ms: int | None = Field(None, ge=0, le=1000, description="server_vad: audio kept before speech.")
    silence_duration_ms: int | None = Field(None, ge=50, le=5000, description="server_vad: silence that ends a turn.")
    idle_timeout_ms: int | None = Field(None, description="Not supported: must be null.")
    create_response: bool | None = Field(None, description="Answer each turn at once.")
    interrupt_response: bool | None = Field(None, description="User speech interrupts the answer.")
    eagerness: Literal["low", "medium", "high", "auto"] | None = Field(None, description="semantic_vad only.")


class WireTranscription(_Wire):
    """Input transcription settings: our ASR runs anyway; these switch its events on."""

    model: str | None = Field(None, description="Ignored: the deployment's ASR model transcribes.")
    language: str | None = Field(None, description="ISO 639-1 language of the user's speech.")
    prompt: str | None = Field(None, description="Ignored.")
    delay: str | None = Field(None, description="Ignored.")
    keywords: list[str] | None = Field(None, description="Ignored.")
    languages: list[str] | None = Field(None, description="Ignored.")


class WireNoiseReduction(_Wire):
    type: str | None = Field(None, description="Accepted, not applied.")
    strength: float | None = Field(None, description="Accepted, not applied.")


class WireAudioInput(_Wire):
    format: WireFormat | None = Field(None, description="Input audio format.")
    transcription: WireTranscription | None = Field(None, description="null = no transcription events.")
    turn_detection: WireTurnDetection | None = Field(None, description="null = the client commits each turn.")
    noise_reduction: WireNoiseReduction | None = Field(None, description="Accepted, not applied.")


class WireAudioOutput(_Wire):
    format: WireFormat | None = Field(None, description="Output audio format.")
    voice: str | dict[str, Any] | None = Field(None, description="OpenAI voice names map to the deployment's voice.")
    speed: float | None = Field(None, description="Only 1.0 is supported.")


class WireAudio(_Wire):
    input: WireAudioInput | None = Field(None, description="Input audio settings.")
    output: WireAudioOutput | None = Field(None, description="Output audio settings.")


class WireSession(_Wire):
    """The ``session`` object of ``session.update`` (GA shape); absent fields keep their value."""

    type: Literal["realtime"] | None = Field(None, description="Always 'realtime' (transcription sessions: no).")
    model: str | None = Field(None, description="Echoed; the deployment's models answer.")
    instructions: str | None = Field(None, description="System prompt; '' = the server's default.")
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, description="['audio'] or ['text'].")
    max_output_tokens: int | Literal["inf"] | None = Field(None, description="Answer length cap.")
    audio: WireAudio | None = Field(None, description="Audio settings.")
    tools: list[Any] | None = Field(None, description="Not supported: must be empty.")
    tool_choice: Any = Field(None, description="Accepted, ignored (no tools).")
    tracing: Any = Field(None, description="Accepted, ignored.")
    truncation: Any = Field(None, description="Accepted, ignored (history is trimmed by tokens).")
    prompt: Any = Field(None, description="Not supported: must be null.")
    include: Any = Field(None, description="Accepted, ignored.")
    reasoning: Any = Field(None, description="Accepted, ignored.")
    parallel_tool_calls: Any = Field(None, description="Accepted, ignored.")


class SessionUpdate(_Wire):
    type: Literal["session.update"]
    event_id: str | None = None
    session: WireSession


class AudioAppend(_Wire):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str


class BareEvent(_Wire):
    """commit, clear: nothing but the type and an optional event id."""

    type: str
    event_id: str | None = None


class WireContent(_Wire):
    type: Literal["input_text", "input_audio", "input_image", "text", "output_text", "output_audio"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None
    image_url: str | None = None
    detail: str | None = None


class WireItem(_Wire):
    id: str | None = None
    type: Literal["message", "function_call", "function_call_output", "mcp_call", "mcp_list_tools",
                  "mcp_approval_request", "mcp_approval_response"] = "message"
    object: Literal["realtime.item"] | None = None
    status: str | None = None
    role: Literal["user", "assistant", "system"] | None = None
    content: list[WireContent] = Field(default_factory=list)
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ItemCreate(_Wire):
    type: Literal["conversation.item.create"]
    event_id: str | None = None
    previous_item_id: str | None = None
    item: WireItem


class ItemTruncate(_Wire):
    type: Literal["conversation.item.truncate"]
    event_id: str | None = None
    item_id: str
    content_index: int = Field(0, ge=0)
    audio_end_ms: int = Field(ge=0)


class WireResponseParams(_Wire):
    """``response.create``'s ``response``: the fields a voice pipeline can honour or ignore."""

    conversation: str | None = None
    input: list[Any] | None = None
    instructions: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    metadata: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    prompt: Any = None
    reasoning: Any = None
    parallel_tool_calls: Any = None


class ResponseCreate(_Wire):
    type: Literal["response.create"]
    event_id: str | None = None
    response: WireResponseParams | None = None


class ResponseCancel(_Wire):
    type: Literal["response.cancel"]
    event_id: str | None = None
    response_id: str | None = None


def check_item_id(value: str, param: str) -> str:
    if not value or len(value) > _MAX_ID_CHARS or not set(value) <= _ID_CHARS:
        raise RealtimeError(f"'{param}' must be 1-{_MAX_ID_CHARS} letters, digits, '_' or '-'", "invalid_value", param)
    return value


def user_text_of(item: WireItem) -> str:
    """The text of a user message item; RealtimeError for any item this pipeline cannot take."""
    if item.type != "message":
        raise RealtimeError(f"conversation items of type '{item.type}' are not supported (no tools); send a user "
                            "message with input_text content", "invalid_value", "item.type")
    if item.role != "user":
        raise RealtimeError(f"only user messages can be created (got role {item.role!r}); set the system prompt with "
                            "session.update instructions", "invalid_value", "item.role")
    if not item.content:
        raise RealtimeError("the message has no content; send [{\"type\": \"input_text\", \"text\": ...}]",
                            "missing_required_parameter", "item.content")
    texts = []
    for i, part in enumerate(item.content):
        if part.type != "input_text" or part.text is None:
            raise RealtimeError(f"content part {i} is '{part.type}': only input_text is supported in created items "
                                "(stream audio with input_audio_buffer.append)", "invalid_value",
                                f"item.content[{i}].type")
        texts.append(part.text)
    return " ".join(t.strip() for t in texts if t.strip())


# --- the session configuration ---------------------------------------------------------------------


@dataclass
class RealtimeConfig:
    """The effective OpenAI-facing configuration of one session, and the engine settings it makes."""

    args: AppArgs
    speech_native_available: bool = False
    model: str = "voxserve"
    instructions: str = ""
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    max_output_tokens: int | None = None
    input_encoding: AudioEncoding = AudioEncoding.PCM16
    input_rate: int = DEFAULT_RATE
    output_encoding: AudioEncoding = AudioEncoding.PCM16
    output_rate: int = DEFAULT_RATE
    voice: str = "default"
    turn_detection: dict[str, Any] | None = None
    transcription: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None

    @classmethod
    def initial(cls, args: AppArgs, *, model: str | None = None,
                speech_native_available: bool = False) -> RealtimeConfig:
        """A new session's configuration: OpenAI's audio defaults, the deployment's turn detection."""
        cfg = cls(args=args, speech_native_available=speech_native_available,
                  model=(model or "voxserve")[:128], instructions=args.llm.system_prompt)
        cfg.turn_detection = cfg._default_turn_detection("semantic_vad" if args.gateway.turn.mode == "semantic"
                                                         else "server_vad")
        if args.gateway.turn.mode == "manual":
            cfg.turn_detection = None
        return cfg

    def _default_turn_detection(self, kind: str) -> dict[str, Any]:
        g, vad = self.args.gateway, self.args.vad
        common = {"create_response": True, "interrupt_response": g.interruptions.mode != "off"}
        if kind == "server_vad":
            return {"type": "server_vad", "threshold": vad.threshold, "prefix_padding_ms": vad.pre_roll_ms,
                    "silence_duration_ms": g.turn.min_silence_ms, "idle_timeout_ms": None, **common}
        return {"type": "semantic_vad", "eagerness": "auto", **common}

    # --- session.update ------------------------------------------------------------------------------

    def updated(self, session: WireSession) -> RealtimeConfig:
        """A copy with the client's changes applied (RealtimeError on anything unsupported)."""
        new = RealtimeConfig(**{f: getattr(self, f) for f in self.__dataclass_fields__})
        given = session.model_fields_set
        if session.model is not None:
            new.model = session.model[:128]
        if session.instructions is not None:
            if len(session.instructions) > MAX_SYSTEM_PROMPT_CHARS:
                raise RealtimeError(f"instructions have {len(session.instructions)} characters; at most "
                                    f"{MAX_SYSTEM_PROMPT_CHARS} are accepted", "invalid_value", "session.instructions")
            new.instructions = session.instructions or self.args.llm.system_prompt
        if session.output_modalities is not None:
            new.output_modalities = _modalities(session.output_modalities, "session.output_modalities")
        if "max_output_tokens" in given:
            new.max_output_tokens = _max_tokens(session.max_output_tokens, "session.max_output_tokens")
        if session.tools:
            raise RealtimeError("tools are not supported by this voice pipeline; send an empty list", "invalid_value",
                                "session.tools")
        if session.prompt is not None:
            raise RealtimeError("prompt templates are not supported; send instructions", "invalid_value",
                                "session.prompt")
        audio = session.audio
        if audio is not None and audio.input is not None:
            new._apply_input(audio.input)
        if audio is not None and audio.output is not None:
            new._apply_output(audio.output)
        return new

    def _apply_input(self, inp: WireAudioInput) -> None:
        given = inp.model_fields_set
        if inp.format is not None:
            self.input_encoding, self.input_rate = _format(inp.format, "session.audio.input.format")
        if "transcription" in given:
            t = inp.transcription
            if t is not None and t.language:
                try:
                    check_language(t.language)
                except VoxError as exc:
                    raise RealtimeError(exc.message, "invalid_value", "session.audio.input.transcription.language") \
                        from None
            self.transcription = None if t is None else {
                "model": t.model or "voxserve-asr", "language": t.language, "prompt": t.prompt}
        if "noise_reduction" in given:
            nr = inp.noise_reduction
            self.noise_reduction = None if nr is None else nr.model_dump(exclude_none=True)
        if "turn_detection" in given:
            td = inp.turn_detection
            if td is None:
                self.turn_detection = None
                return
            if td.idle_timeout_ms is not None:
                raise RealtimeError("idle_timeout_ms is not supported; leave it null", "invalid_value",
                                    "session.audio.input.turn_detection.idle_timeout_ms")
            current = self.turn_detection
            base = dict(current) if current is not None and current["type"] == td.type \
                else self._default_turn_detection(td.type)
            values = td.model_dump(exclude_unset=True, exclude_none=True)
            if td.type == "semantic_vad":
                wrong = sorted(set(values) & {"threshold", "prefix_padding_ms", "silence_duration_ms"})
                if wrong:
                    raise RealtimeError(f"{wrong[0]} applies to server_vad only", "unknown_parameter",
                                        f"session.audio.input.turn_detection.{wrong[0]}")
            elif "eagerness" in values:
                raise RealtimeError("eagerness applies to semantic_vad only", "unknown_parameter",
                                    "session.audio.input.turn_detection.eagerness")
            base.update(values)
            self.turn_detection = base

    def _apply_output(self, out: WireAudioOutput) -> None:
        if out.format is not None:
            self.output_encoding, self.output_rate = _format(out.format, "session.audio.output.format")
        if out.voice is not None:
            voice = out.voice
            if not isinstance(voice, str):
                raise RealtimeError("custom voices are not supported; use a voice name", "invalid_value",
                                    "session.audio.output.voice")
            own = self.args.tts.voice
            if voice not in OPENAI_VOICES and voice not in ("", "default") and voice != own:
                raise RealtimeError(f"unknown voice {voice!r}: this deployment speaks with one voice; use 'default' "
                                    "or an OpenAI voice name (all map to it)", "invalid_value",
                                    "session.audio.output.voice")
            self.voice = voice or "default"
        if out.speed is not None and abs(out.speed - 1.0) > 1e-6:
            raise RealtimeError("speech speed cannot be changed (only 1.0)", "invalid_value",
                                "session.audio.output.speed")

    # --- engine settings -----------------------------------------------------------------------------

    @property
    def text_only(self) -> bool:
        return self.output_modalities == ["text"]

    def settings(self) -> SessionSettings:
        """The engine's settings for this configuration."""
        args, g = self.args, self.args.gateway
        vad = args.vad.model_copy()
        turn = g.turn.model_dump()
        interruptions = g.interruptions.model_copy()
        td = self.turn_detection
        auto_respond = False
        if td is None:
            turn["mode"] = "manual"
        else:
            auto_respond = bool(td.get("create_response", True))
            if not td.get("interrupt_response", True):
                interruptions.mode = "off"
            elif interruptions.mode == "off":
                interruptions.mode = "pause"
            if td["type"] == "server_vad":
                turn["mode"] = "silence"
                turn["min_silence_ms"] = int(td.get("silence_duration_ms") or turn["min_silence_ms"])
                vad.threshold = float(td.get("threshold") or vad.threshold)
                vad.pre_roll_ms = int(td.get("prefix_padding_ms", vad.pre_roll_ms))
            else:
                turn["mode"] = "semantic"
                longest = EAGERNESS_MAX_SILENCE_MS.get(str(td.get("eagerness") or "auto"))
                if longest is not None:
                    turn["max_silence_ms"] = longest
            turn["max_silence_ms"] = max(turn["max_silence_ms"], turn["min_silence_ms"])
        language = (self.transcription or {}).get("language") or None
        mode = SPEECH_NATIVE if g.speech_native and self.speech_native_available else CASCADE
        return SessionSettings(
            input_sample_rate=self.input_rate, language=language,
            system_prompt=self.instructions if self.instructions != args.llm.system_prompt else "",
            voice="", vad=vad, turn=TurnDetection.model_validate(turn), interruptions=interruptions, mode=mode,
            output_sample_rate=self.output_rate, partial_interval_ms=args.asr.partial_interval_ms,
            max_response_tokens=self.max_output_tokens, auto_respond=auto_respond,
            # text only: nothing is played, so everything sent counts as heard
            playback="none" if self.text_only else "estimate",
            history_turns=g.history_turns, output_chunk_ms=g.output_chunk_ms, chunker=args.tts.chunker,
            timeouts=g.timeouts)

    # --- the session object the client sees ----------------------------------------------------------

    def format_json(self, encoding: AudioEncoding, rate: int) -> dict[str, Any]:
        if encoding is AudioEncoding.MULAW:
            return {"type": "audio/pcmu"}
        if encoding is AudioEncoding.ALAW:
            return {"type": "audio/pcma"}
        return {"type": "audio/pcm", "rate": rate}

    def session_json(self, session_id: str) -> dict[str, Any]:
        """The ``session`` of session.created / session.updated."""
        return {
            "type": "realtime", "object": "realtime.session", "id": f"sess_{session_id}", "model": self.model,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens if self.max_output_tokens is not None else "inf",
            "audio": {
                "input": {"format": self.format_json(self.input_encoding, self.input_rate),
                          "transcription": self.transcription, "noise_reduction": self.noise_reduction,
                          "turn_detection": self.turn_detection},
                "output": {"format": self.format_json(self.output_encoding, self.output_rate),
                           "voice": self.voice, "speed": 1.0},
            },
            "tools": [], "tool_choice": "auto", "tracing": None, "truncation": "auto", "prompt": None,
            "include": None,
        }


def _format(fmt: WireFormat, param: str) -> tuple[AudioEncoding, int]:
    try:
        enc = parse_encoding(fmt.type)
        rate = fmt.rate or (8000 if enc in G711 else DEFAULT_RATE)
        return enc, check_encoding_rate(enc, rate)
    except VoxError as exc:
        raise RealtimeError(exc.message, "invalid_value", param) from None


def _modalities(value: Sequence[str], param: str) -> list[str]:
    if list(value) not in (["audio"], ["text"]):
        raise RealtimeError("output_modalities must be ['audio'] (speech plus its transcript) or ['text']",
                            "invalid_value", param)
    return list(value)


def _max_tokens(value: int | str | None, param: str) -> int | None:
    if value is None or value == "inf":
        return None
    assert isinstance(value, int)
    if not 1 <= value <= MAX_RESPONSE_TOKENS:
        raise RealtimeError(f"max_output_tokens must be within [1, {MAX_RESPONSE_TOKENS}] or 'inf'",
                            "invalid_value", param)
    return value


def check_response_params(params: WireResponseParams | None) -> None:
    """response.create's options: what would change the answer's meaning and cannot be honoured is refused."""
    if params is None:
        return
    if params.conversation not in (None, "auto"):
        raise RealtimeError("out-of-band responses (conversation 'none') are not supported", "invalid_value",
                            "response.conversation")
    if params.input:
        raise RealtimeError("response.input is not supported: add items with conversation.item.create",
                            "invalid_value", "response.input")
    if params.tools:
        raise RealtimeError("tools are not supported by this voice pipeline", "invalid_value", "response.tools")
    if params.output_modalities is not None:
        _modalities(params.output_modalities, "response.output_modalities")
    if params.max_output_tokens is not None:
        _max_tokens(params.max_output_tokens, "response.max_output_tokens")


# --- engine events -> server events -------------------------------------------------------------------


@dataclass
class WireEvent(ev.Event):
    """A server event the adapter itself sends (session.updated, error...), queued in the
    conversation's outbox so that it keeps its place among the engine's events."""

    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Response:
    """One engine response as the client knows it."""

    rid: int
    id: str
    item_id: str
    text_only: bool
    encoding: AudioEncoding
    rate: int
    voice: str
    max_output_tokens: int | None
    transcript: list[str] = field(default_factory=list)
    deltas: int = 0
    done: bool = False  # response.done was sent: final (a later cut is a conversation.item.truncated)
    audio_ms: float = 0.0
    error: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.transcript).strip()


class Ids:
    """Ids of one session: a random part (unique across sessions) and a counter."""

    def __init__(self) -> None:
        self._salt = secrets.token_hex(4)
        self._n = 0

    def new(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._salt}{self._n:04x}"


_CANCEL_REASONS = {"barge_in": "turn_detected"}
_LATENCY_FIELDS = ("vad_end_delay_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_ms",
                   "voice_to_voice_ms", "total_ms", "llm_tokens", "llm_tokens_per_s", "speculative")


class EventMapper:
    """Engine events -> OpenAI server events, with the ids the protocol needs.

    Stateful and used from the session's two tasks: the reader registers what the client asked
    for (ids of created text items), the sender maps events. Both run on one event loop.
    """

    def __init__(self, config: RealtimeConfig, session_id: str = "") -> None:
        self.config = config
        self.session_id = session_id
        self.ids = Ids()
        self.conversation_id = self.ids.new("conv")
        self._speech_item: str | None = None  # user item of the speech in progress
        self._text_items: deque[str] = deque()  # ids for typed items, in the order they were pushed
        self._by_input: OrderedDict[int, str] = OrderedDict()  # engine input id -> user item id
        self._last_audio_item: str | None = None
        self._last_item: str | None = None
        self._responses: OrderedDict[int, _Response] = OrderedDict()
        self._by_item: OrderedDict[str, int] = OrderedDict()  # assistant item id -> engine response id
        self._by_id: dict[str, int] = {}  # response id -> engine response id
        self.current: _Response | None = None  # started, not done

    # --- what the reader needs ----------------------------------------------------------------------

    def expect_text_item(self, item_id: str | None) -> str:
        """Reserve the id of a typed user item about to be pushed (its InputCommitted follows)."""
        item = item_id or self.ids.new("item")
        if item in self._by_item or item in self._by_input.values():
            raise RealtimeError(f"item id {item!r} is already used in this conversation", "invalid_value", "item.id")
        self._text_items.append(item)
        return item

    def forget_text_item(self, item_id: str) -> None:
        if self._text_items and self._text_items[-1] == item_id:
            self._text_items.pop()

    def response_of_item(self, item_id: str) -> int:
        """The engine response id of an assistant item (RealtimeError for an unknown item)."""
        if item_id in self._by_item:
            return self._by_item[item_id]
        if item_id in self._by_input.values():
            raise RealtimeError(f"item {item_id!r} is a user message; only assistant audio items can be truncated",
                                "invalid_value", "item_id")
        raise RealtimeError(f"no assistant item {item_id!r} in this conversation (or it is too old)", "invalid_value",
                            "item_id")

    def response_rid(self, response_id: str) -> int | None:
        return self._by_id.get(response_id)

    @property
    def last_item(self) -> str | None:
        return self._last_item

    # --- mapping --------------------------------------------------------------------------------------

    def map(self, e: ev.Event) -> list[dict[str, Any]]:
        """The server events for ``e`` (without event ids); [] for engine events the protocol lacks."""
        if isinstance(e, WireEvent):
            return [e.payload]
        if isinstance(e, ev.AudioOut):
            return self._audio(e)
        if isinstance(e, ev.TextDelta):
            return self._text(e)
        if isinstance(e, ev.SpeechStarted):
            self._speech_item = self._speech_item or self.ids.new("item")
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": e.audio_time_ms,
                     "item_id": self._speech_item}]
        if isinstance(e, ev.SpeechStopped):
            if self._speech_item is None:  # a manual commit: there was no speech_started either
                return []
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": e.audio_time_ms,
                     "item_id": self._speech_item}]
        if isinstance(e, ev.InputCommitted):
            return self._committed(e)
        if isinstance(e, ev.InputCleared):
            self._speech_item = None
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(e, ev.FinalTranscript):
            return self._transcript(e)
        if isinstance(e, ev.ResponseStarted):
            return self._started(e.response_id)
        if isinstance(e, ev.ResponseDone):
            return self._finish(e.response_id, "completed", latency=e.latency, tokens=e.latency.llm_tokens)
        if isinstance(e, ev.ResponseInterrupted):
            return self._interrupted(e)
        if isinstance(e, ev.Truncated):
            r = self._responses.get(e.response_id)
            if r is None:
                return []
            return [{"type": "conversation.item.truncated", "item_id": r.item_id, "content_index": 0,
                     "audio_end_ms": e.audio_end_ms}]
        if isinstance(e, ev.ErrorEvent):
            payload = error_for(_CodeOnly(e.code, e.message))
            r = self._responses.get(e.response_id) if e.response_id else None
            if r is not None:
                r.error = payload["error"]
            return [payload]
        if isinstance(e, ev.SessionStarted):
            self.session_id = e.session_id
            return [{"type": "session.created", "session": self.config.session_json(e.session_id)}]
        if isinstance(e, ev.ResponsePaused | ev.ResponseResumed | ev.PartialTranscript):
            # pause-then-decide has no OpenAI events: speech_started already told the client;
            # partial transcripts are not switched on by this adapter
            return []
        raise TypeError(f"no realtime mapping for {type(e).__name__}")  # pragma: no cover

    def session_updated(self) -> dict[str, Any]:
        return {"type": "session.updated", "session": self.config.session_json(self.session_id)}

    # --- input side -----------------------------------------------------------------------------------

    def _remember_input(self, input_id: int, item_id: str) -> None:
        self._by_input[input_id] = item_id
        while len(self._by_input) > REMEMBERED_IDS:
            self._by_input.popitem(last=False)

    def _added(self, item: dict[str, Any]) -> dict[str, Any]:
        event = {"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item}
        self._last_item = item["id"]
        return event

    def _committed(self, e: ev.InputCommitted) -> list[dict[str, Any]]:
        if e.text:  # a typed item (conversation.item.create)
            item_id = self._text_items.popleft() if self._text_items else self.ids.new("item")
            self._remember_input(e.input_id, item_id)
            item = {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": "user",
                    "content": [{"type": "input_text", "text": e.text}]}
            previous = self._last_item
            return [self._added(item), {"type": "conversation.item.done", "previous_item_id": previous, "item": item}]
        item_id = self._speech_item or self.ids.new("item")
        self._speech_item = None
        self._last_audio_item = item_id
        self._remember_input(e.input_id, item_id)
        previous = self._last_item
        item = {"id": item_id, "type": "message", "object": "realtime.item", "status": "in_progress", "role": "user",
                "content": [{"type": "input_audio", "transcript": None}]}
        return [{"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id},
                self._added(item)]

    def _transcript(self, e: ev.FinalTranscript) -> list[dict[str, Any]]:
        # A speculative answer's transcript is made before its turn is committed (input id 0 then):
        # it belongs to the newest committed audio item.
        item_id = self._by_input.get(e.input_id) if e.input_id else None
        item_id = item_id or self._last_audio_item
        if item_id is None:
            return []
        out: list[dict[str, Any]] = []
        enabled = self.config.transcription is not None
        if enabled:
            out.append({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                        "content_index": 0, "transcript": e.text,
                        "usage": {"type": "duration", "seconds": round(e.utterance_ms / 1000, 3)}})
        item = {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": "user",
                "content": [{"type": "input_audio", "transcript": e.text if enabled else None}]}
        out.append({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        return out

    # --- responses ------------------------------------------------------------------------------------

    def _started(self, rid: int) -> list[dict[str, Any]]:
        cfg = self.config
        r = _Response(rid=rid, id=self.ids.new("resp"), item_id=self.ids.new("item"), text_only=cfg.text_only,
                      encoding=cfg.output_encoding, rate=cfg.output_rate, voice=cfg.voice,
                      max_output_tokens=cfg.max_output_tokens)
        self._responses[rid] = r
        self._by_item[r.item_id] = rid
        self._by_id[r.id] = rid
        while len(self._responses) > REMEMBERED_IDS:
            old = self._responses.popitem(last=False)[1]
            self._by_item.pop(old.item_id, None)
            self._by_id.pop(old.id, None)
        self.current = r
        item = self._item(r, "in_progress", with_content=False)
        part = {"type": "text", "text": ""} if r.text_only else {"type": "audio", "transcript": ""}
        ref = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        return [
            {"type": "response.created", "response": self._response(r, "in_progress", output=[])},
            {"type": "response.output_item.added", "response_id": r.id, "output_index": 0, "item": item},
            self._added(item),
            {"type": "response.content_part.added", **ref, "part": part},
        ]

    def _item(self, r: _Response, status: str, *, with_content: bool = True) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if with_content:
            content = [{"type": "output_text", "text": r.text}] if r.text_only else \
                [{"type": "output_audio", "transcript": r.text}]
        return {"id": r.item_id, "type": "message", "object": "realtime.item", "status": status, "role": "assistant",
                "content": content}

    def _response(self, r: _Response, status: str, *, output: list[dict[str, Any]],
                  details: dict[str, Any] | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": r.id, "object": "realtime.response", "status": status, "status_details": details,
            "conversation_id": self.conversation_id, "output": output,
            "output_modalities": ["text"] if r.text_only else ["audio"],
            "audio": {"output": {"format": self.config.format_json(r.encoding, r.rate), "voice": r.voice}},
            "max_output_tokens": r.max_output_tokens if r.max_output_tokens is not None else "inf",
            "metadata": None, "usage": usage,
        }

    def _text(self, e: ev.TextDelta) -> list[dict[str, Any]]:
        r = self._responses.get(e.response_id)
        if r is None:
            return []
        r.transcript.append(e.text)
        r.deltas += 1
        kind = "response.output_text.delta" if r.text_only else "response.output_audio_transcript.delta"
        return [{"type": kind, "response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0,
                 "delta": e.text}]

    def _audio(self, e: ev.AudioOut) -> list[dict[str, Any]]:
        r = self._responses.get(e.response_id)
        if r is None or r.text_only:
            return []  # text only: the audio is not sent (nor counted as heard: playback 'none')
        r.audio_ms += 1000.0 * (len(e.pcm16) // 2) / e.sample_rate
        data = e.pcm16 if r.encoding is AudioEncoding.PCM16 else encoder(r.encoding)(pcm16_to_float(e.pcm16))
        return [{"type": "response.output_audio.delta", "response_id": r.id, "item_id": r.item_id, "output_index": 0,
                 "content_index": 0, "delta": base64.b64encode(data).decode("ascii")}]

    def _interrupted(self, e: ev.ResponseInterrupted) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if e.response_id not in self._responses:
            # ended before its first event reached the client: announce it, so that every
            # response.done follows its response.created
            out += self._started(e.response_id)
        r = self._responses[e.response_id]
        if r.done:
            # all of it was sent (response.done: completed) and the client cut the playback: the
            # item's truncation says so, as OpenAI does; a response has one response.done
            return out
        if e.reason == "error":
            details: dict[str, Any] = {"type": "failed", "error": r.error or {
                "type": "server_error", "code": "internal", "message": "the response failed"}}
            status = "failed"
        else:
            details = {"type": "cancelled", "reason": _CANCEL_REASONS.get(e.reason, "client_cancelled")}
            status = "cancelled"
        extra = {"heard_text": e.heard_text, "heard_ms": e.heard_ms, "reason": e.reason}
        return out + self._finish(e.response_id, status, details=details, tokens=r.deltas, extra=extra)

    def _finish(self, rid: int, status: str, *, details: dict[str, Any] | None = None,
                latency: ev.TurnLatency | None = None, tokens: int = 0,
                extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        r = self._responses.get(rid)
        if r is None or r.done:
            return []
        r.done = True
        if self.current is r:
            self.current = None
        ref = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        item_status = "completed" if status == "completed" else "incomplete"
        item = self._item(r, item_status)
        out: list[dict[str, Any]] = []
        if r.text_only:
            out.append({"type": "response.output_text.done", **ref, "text": r.text})
            part = {"type": "text", "text": r.text}
        else:
            out.append({"type": "response.output_audio.done", **ref})
            out.append({"type": "response.output_audio_transcript.done", **ref, "transcript": r.text})
            part = {"type": "audio", "transcript": r.text}
        out.append({"type": "response.content_part.done", **ref, "part": part})
        out.append({"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": item})
        out.append({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        usage = {"total_tokens": tokens, "input_tokens": 0, "output_tokens": tokens,
                 "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
                 "output_token_details": {"text_tokens": tokens, "audio_tokens": 0}}
        response = self._response(r, status, output=[item], details=details, usage=usage)
        # voxserve's own fields (clients ignore unknown ones): server-measured latency, audio sent
        vox: dict[str, Any] = {"audio_ms": int(r.audio_ms)}
        if latency is not None:
            vox["latency"] = {f: getattr(latency, f) for f in _LATENCY_FIELDS}
        vox.update(extra or {})
        response["voxserve"] = vox
        out.append({"type": "response.done", "response": response})
        return out


class _CodeOnly(VoxError):
    """An engine ErrorEvent's code and message as a VoxError (for ``error_for``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

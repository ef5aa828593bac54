"""The realtime protocol's client events and session object (OpenAI Realtime GA shapes) as pydantic
models: unknown fields are errors, as OpenAI answers them. ``parse_event`` turns the first problem
into a ``RealtimeError`` naming the parameter with OpenAI's codes."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.realtime.error_events import RealtimeError

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_ID_CHARS = 64
_WireT = TypeVar("_WireT", bound=BaseModel)


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


class WireAudioFormat(_Wire):
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
    format: WireAudioFormat | None = Field(None, description="Input audio format.")
    transcription: WireTranscription | None = Field(None, description="null = no transcription events.")
    turn_detection: WireTurnDetection | None = Field(None, description="null = the client commits each turn.")
    noise_reduction: WireNoiseReduction | None = Field(None, description="Accepted, not applied.")


class WireAudioOutput(_Wire):
    format: WireAudioFormat | None = Field(None, description="Output audio format.")
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
    tools: list[Any] | None = Field(None, description="Function tools the model may call.")
    tool_choice: Any = Field(None, description="auto, none, required, or {'type': 'function', 'name': ...}.")
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


def tool_output_of(item: WireItem) -> tuple[str, str]:
    """(call_id, output) of a function_call_output item."""
    if not item.call_id:
        raise RealtimeError("missing required parameter 'item.call_id'", "missing_required_parameter", "item.call_id")
    if item.output is None:
        raise RealtimeError("missing required parameter 'item.output'", "missing_required_parameter", "item.output")
    return item.call_id, item.output


def check_item_id(value: str, param: str) -> str:
    if not value or len(value) > _MAX_ID_CHARS or not set(value) <= _ID_CHARS:
        raise RealtimeError(f"'{param}' must be 1-{_MAX_ID_CHARS} letters, digits, '_' or '-'", "invalid_value", param)
    return value


def user_text_of(item: WireItem) -> str:
    """The text of a user message item; RealtimeError for any item this pipeline cannot take."""
    if item.type != "message":
        raise RealtimeError(f"conversation items of type '{item.type}' are not supported; send a user message "
                            "with input_text content, or a function_call_output", "invalid_value", "item.type")
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

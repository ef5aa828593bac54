"""The realtime session object <-> the engine's ``SessionSettings``.

``RealtimeConfig`` is what the client sees of its session (OpenAI's defaults and names); its
``settings()`` start from the server's defaults (``deployments.session_checks.session_defaults``),
the same as a gRPC session's, and the checks shared with gRPC come from there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from deployments.config import AppArgs
from deployments.realtime.error_events import RealtimeError
from deployments.realtime.schema import (
    WireAudioFormat,
    WireAudioInput,
    WireAudioOutput,
    WireResponseParams,
    WireSession,
)
from deployments.session_checks import (
    MAX_RESPONSE_TOKENS,
    check_language,
    check_system_prompt,
    check_voice,
    session_defaults,
    settings_with,
)
from services.codecs import G711, AudioEncoding, check_encoding_rate, parse_encoding
from services.conversation.settings import CASCADE, SPEECH_NATIVE, SessionSettings
from services.errors import VoxError
from services.tools import MAX_TOOLS, ToolChoice, ToolSpec, check_tools

#: The OpenAI default audio: 16-bit PCM at 24 kHz, in and out.
DEFAULT_RATE = 24000
#: OpenAI's built-in voice names: accepted and spoken with the deployment's voice.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"})
#: semantic_vad eagerness -> longest silence before an unfinished-looking turn ends (None = the default).
EAGERNESS_MAX_SILENCE_MS: dict[str, int | None] = {"low": 3000, "medium": None, "auto": None, "high": 800}


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
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: Any = "auto"

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

    def restore(self, stored: SessionSettings) -> None:
        """Take what a resumed session had set that is the conversation's, not the connection's:
        instructions, tools and the answer cap. Audio formats and turn detection come from this
        connection (clients send session.update on connect, as with a new session)."""
        self.instructions = stored.system_prompt or self.instructions
        self.tools = list(stored.tools)
        self.tool_choice = stored.tool_choice
        self.max_output_tokens = stored.max_response_tokens

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
            try:
                check_system_prompt(session.instructions, "instructions")
            except VoxError as exc:
                raise RealtimeError(exc.message, "invalid_value", "session.instructions") from None
            new.instructions = session.instructions or self.args.llm.system_prompt
        if session.output_modalities is not None:
            new.output_modalities = _modalities(session.output_modalities, "session.output_modalities")
        if "max_output_tokens" in given:
            new.max_output_tokens = _max_tokens(session.max_output_tokens, "session.max_output_tokens")
        if session.tools is not None:
            new.tools = _tools(session.tools)
        if session.tool_choice is not None:
            try:
                new.tool_choice = ToolChoice.parse(session.tool_choice).wire()
            except VoxError as exc:
                raise RealtimeError(exc.message, "invalid_value", "session.tool_choice") from None
        if session.tools is not None or session.tool_choice is not None:
            try:
                check_tools(new.tools, ToolChoice.parse(new.tool_choice))
            except VoxError as exc:
                where = "session.tool_choice" if "tool_choice" in exc.message else "session.tools"
                raise RealtimeError(exc.message, "invalid_value", where) from None
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
            try:
                check_voice(voice, self.args, aliases=OPENAI_VOICES,
                            hint="use 'default' or an OpenAI voice name (all map to it)")
            except VoxError as exc:
                raise RealtimeError(exc.message, "invalid_value", "session.audio.output.voice") from None
            self.voice = voice or "default"
        if out.speed is not None and abs(out.speed - 1.0) > 1e-6:
            raise RealtimeError("speech speed cannot be changed (only 1.0)", "invalid_value",
                                "session.audio.output.speed")

    # --- engine settings -----------------------------------------------------------------------------

    @property
    def text_only(self) -> bool:
        return self.output_modalities == ["text"]

    def settings(self) -> SessionSettings:
        """The engine's settings for this configuration: the server's defaults with what the
        client changed."""
        args = self.args
        base = session_defaults(args)
        vad: dict[str, Any] = {}
        turn: dict[str, Any] = {}
        interruptions: dict[str, Any] = {}
        td = self.turn_detection
        auto_respond = False
        if td is None:
            turn["mode"] = "manual"
        else:
            auto_respond = bool(td.get("create_response", True))
            if not td.get("interrupt_response", True):
                interruptions["mode"] = "off"
            elif base.interruptions.mode == "off":
                interruptions["mode"] = "pause"
            if td["type"] == "server_vad":
                turn["mode"] = "silence"
                turn["min_silence_ms"] = int(td.get("silence_duration_ms") or base.turn.min_silence_ms)
                vad["threshold"] = float(td.get("threshold") or base.vad.threshold)
                vad["pre_roll_ms"] = int(td.get("prefix_padding_ms", base.vad.pre_roll_ms))
            else:
                turn["mode"] = "semantic"
                longest = EAGERNESS_MAX_SILENCE_MS.get(str(td.get("eagerness") or "auto"))
                if longest is not None:
                    turn["max_silence_ms"] = longest
            turn["max_silence_ms"] = max(turn.get("max_silence_ms", base.turn.max_silence_ms),
                                         turn.get("min_silence_ms", base.turn.min_silence_ms))
        language = (self.transcription or {}).get("language") or None
        return settings_with(base, {
            "input_sample_rate": self.input_rate, "language": language,
            "system_prompt": self.instructions if self.instructions != args.llm.system_prompt else "",
            "vad": vad, "turn": turn, "interruptions": interruptions,
            "mode": SPEECH_NATIVE if base.mode == SPEECH_NATIVE and self.speech_native_available else CASCADE,
            "output_sample_rate": self.output_rate, "max_response_tokens": self.max_output_tokens,
            "auto_respond": auto_respond,
            # text only: nothing is played, so everything sent counts as heard
            "playback": "none" if self.text_only else "estimate",
            # as OpenAI: after function_call_output the client sends response.create
            "tools": self.tools, "tool_choice": self.tool_choice, "tool_calling": {"auto_continue": False}})

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
            "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}
                      for t in self.tools],
            "tool_choice": self.tool_choice, "tracing": None, "truncation": "auto", "prompt": None,
            "include": None,
        }


def _tools(wire: list[Any]) -> list[ToolSpec]:
    """session.tools: function tools ({"type": "function", "name", "description", "parameters"})."""
    if len(wire) > MAX_TOOLS:
        raise RealtimeError(f"at most {MAX_TOOLS} tools per session; got {len(wire)}", "invalid_value", "session.tools")
    out: list[ToolSpec] = []
    for i, tool in enumerate(wire):
        param = f"session.tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise RealtimeError(f"only function tools are supported (got {kind!r}); MCP tools are not",
                                "invalid_value", f"{param}.type")
        unknown = set(tool) - {"type", "name", "description", "parameters"}
        if unknown:
            raise RealtimeError(f"unknown parameter '{param}.{sorted(unknown)[0]}'", "unknown_parameter",
                                f"{param}.{sorted(unknown)[0]}")
        if not isinstance(tool.get("name"), str):
            raise RealtimeError(f"missing required parameter '{param}.name'", "missing_required_parameter",
                                f"{param}.name")
        try:
            out.append(ToolSpec(name=tool["name"], description=tool.get("description") or "",
                                parameters=tool.get("parameters") or {"type": "object", "properties": {}}))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RealtimeError(f"invalid value for '{param}.{where}': {first['msg']}", "invalid_value",
                                f"{param}.{where}") from None
    return out


def _format(fmt: WireAudioFormat, param: str) -> tuple[AudioEncoding, int]:
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
        raise RealtimeError("per-response tools are not supported: set session.tools with session.update",
                            "invalid_value", "response.tools")
    if params.tool_choice is not None:
        raise RealtimeError("per-response tool_choice is not supported: set session.tool_choice with session.update",
                            "invalid_value", "response.tool_choice")
    if params.output_modalities is not None:
        _modalities(params.output_modalities, "response.output_modalities")
    if params.max_output_tokens is not None:
        _max_tokens(params.max_output_tokens, "response.max_output_tokens")

"""What a session is, whichever protocol opens it: the server's defaults and the client checks.

gRPC ``Converse`` (``deployments.grpc``) and the realtime WebSocket (``deployments.realtime``)
each translate their own session config, and neither imports the other: both start from
``session_defaults(args)``, apply the client's changes with ``settings_with`` (the pydantic
models' bounds are the limits; a violation is OUT_OF_RANGE naming the client's field), and check
text, language, voice and prompt here, so both answer a mistake the same way.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.config import AppArgs, merged
from services.conversation.settings import CASCADE, SPEECH_NATIVE, SessionSettings
from services.errors import InvalidArgument, OutOfRange, VoxError

MAX_SYSTEM_PROMPT_CHARS = 8000
MAX_RESPONSE_TOKENS = 2048
_LANG = re.compile(r"^[a-z]{2,3}$")
_M = TypeVar("_M", bound=BaseModel)
_BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


class ClientVAD(BaseModel):
    """The VAD settings a client may change, in the ranges a client may use (narrower than the
    deployment's ``VADConfig``: an operator may go further than a caller). None = unchanged."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0.05, le=0.95, description="Speech probability that starts speech.")
    min_speech_ms: int | None = Field(None, ge=0, le=2000, description="Shorter speech bursts are dropped.")
    pre_roll_ms: int | None = Field(None, ge=0, le=1000, description="Audio kept before the start trigger.")


def session_defaults(args: AppArgs) -> SessionSettings:
    """The settings of a session whose client changes nothing: the deployment's VAD, turn
    detection, interruptions, chunking, history and deadlines (copies: a session may change them)."""
    g = args.gateway
    return SessionSettings(
        vad=args.vad.model_copy(deep=True), turn=g.turn.model_copy(deep=True),
        interruptions=g.interruptions.model_copy(deep=True), mode=SPEECH_NATIVE if g.speech_native else CASCADE,
        partial_interval_ms=args.asr.partial_interval_ms, history_turns=g.history_turns,
        output_chunk_ms=g.output_chunk_ms, chunker=args.tts.chunker.model_copy(deep=True),
        timeouts=g.timeouts.model_copy(deep=True), playout=g.playout.model_copy(deep=True),
        tool_calling=g.tool_calling.model_copy(deep=True))


def settings_with(base: SessionSettings, changes: Mapping[str, Any],
                  names: Mapping[str, str] | None = None) -> SessionSettings:
    """``base`` with ``changes`` (nested dicts for the nested settings) applied and validated.

    A value outside a field's bounds is OUT_OF_RANGE, any other invalid value INVALID_ARGUMENT;
    the message names the field as the client knows it (``names``: settings path, such as
    ``turn.min_silence_ms``, -> the client's name; the settings path where none is given).
    """
    return _validate(SessionSettings, merged(base.model_dump(), changes), names or {})


def check_client_vad(values: Mapping[str, Any], prefix: str = "vad") -> dict[str, Any]:
    """``values`` if they are VAD settings a client may change, in a client's ranges
    (``ClientVAD``); the message of a bad one names it as ``<prefix>.<field>``."""
    _validate(ClientVAD, values, {}, prefix=(prefix,))
    return dict(values)


def check_bounds(model: type[BaseModel], field: str, value: float, name: str) -> None:
    """OUT_OF_RANGE unless ``value`` is within the bounds ``model.field`` declares."""
    lo, hi, lo_open, hi_open = _bounds(model, (field,))
    if (lo is not None and (value <= lo if lo_open else value < lo)) or \
            (hi is not None and (value >= hi if hi_open else value > hi)):
        raise OutOfRange(_range_message(name, value, lo, hi))


def check_text(text: str, max_chars: int) -> str:
    """A typed turn's text without invisible characters; INVALID_ARGUMENT if nothing is left."""
    visible = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cc") or ch in "\n\t").strip()
    if not visible:
        raise InvalidArgument("text turn is empty (only whitespace or invisible characters)")
    if len(visible) > max_chars:
        raise OutOfRange(f"text turn has {len(visible)} characters; at most {max_chars}")
    return visible


def check_language(language: str) -> str | None:
    """'' = the server's default language (None), 'auto' = detect, else an ISO 639-1 code."""
    if not language:
        return None
    if language == "auto":
        return language
    if not _LANG.match(language):
        raise InvalidArgument(f"language must be an ISO 639-1 code such as 'en' (or 'auto'); got {language!r}")
    return language


def check_voice(voice: str, args: AppArgs, *, aliases: Collection[str] = (),
                hint: str = "leave voice empty") -> str:
    """The deployment speaks with one voice: '', 'default', its own name and ``aliases`` (names
    that map to it) are accepted; any other name is INVALID_ARGUMENT ending with ``hint``."""
    if voice in ("", "default") or voice == args.tts.voice or voice in aliases:
        return voice
    raise InvalidArgument(f"unknown voice {voice!r}: this deployment speaks with one voice; {hint}")


def check_system_prompt(prompt: str, name: str = "system_prompt") -> str:
    """OUT_OF_RANGE for a prompt over ``MAX_SYSTEM_PROMPT_CHARS`` (its tokens are checked when the
    session opens: ``SessionHub.check_system_prompt``)."""
    if len(prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise OutOfRange(f"{name} is {len(prompt)} characters long; at most {MAX_SYSTEM_PROMPT_CHARS} are accepted")
    return prompt


# --- pydantic errors in the client's words ---------------------------------------------------------


def _validate(model: type[_M], values: Mapping[str, Any], names: Mapping[str, str],
              prefix: tuple[str, ...] = ()) -> _M:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _client_error(model, exc, names, prefix) from None


def _client_error(model: type[BaseModel], exc: ValidationError, names: Mapping[str, str],
                  prefix: tuple[str, ...]) -> VoxError:
    first = exc.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    path = ".".join(prefix + loc)
    name = names.get(path, path or "session")
    if first["type"] in _BOUND_ERRORS:
        lo, hi, _, _ = _bounds(model, loc)
        return OutOfRange(_range_message(name, first["input"], lo, hi))
    return InvalidArgument(f"{name}: {first['msg']}")


def _bounds(model: type[BaseModel], loc: Sequence[str]) -> tuple[Any, Any, bool, bool]:
    """(low, high, low is exclusive, high is exclusive) that the field at ``loc`` declares."""
    lo: Any = None
    hi: Any = None
    lo_open = hi_open = False
    for i, part in enumerate(loc):
        info = model.model_fields.get(part)
        if info is None:
            break
        if i + 1 < len(loc):
            nested = info.annotation
            if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
                break
            model = nested
            continue
        for m in info.metadata:
            if isinstance(m, Ge | Gt):
                lo, lo_open = (m.ge, False) if isinstance(m, Ge) else (m.gt, True)
            elif isinstance(m, Le | Lt):
                hi, hi_open = (m.le, False) if isinstance(m, Le) else (m.lt, True)
    return lo, hi, lo_open, hi_open


def _range_message(name: str, value: Any, lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"{name} must be within [{lo}, {hi}]; got {value}"
    if hi is not None:
        return f"{name} must be at most {hi}; got {value}"
    return f"{name} must be at least {lo}; got {value}"



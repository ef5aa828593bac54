"""Function tools: their definitions, the tool choice, and the model's calls as a stream.

Framework-free and shared by the LLM engines (which parse or constrain the calls) and the
conversation (which waits for the client's results). A tool is a JSON-schema function as in the
OpenAI APIs; ``ToolChoice`` is auto (the model decides), none (no tools offered), required (a
call of any tool) or one named function.

Calls reach the conversation as ``ToolCallDelta`` items in the LLM's stream, between text deltas:
a call's name first, then its arguments in pieces, then a done item with the whole arguments.
With ``auto`` the model's own format is parsed (vLLM's Hermes parser: ``<tool_call>{json}</tool_call>``,
the format of Qwen 2.5, Hermes and most small open models; a bare ``{"name": ..., "arguments": ...}``
answer, which small models write without the tags, is taken as the same call). With ``required``
or a named function the engine constrains decoding to the call's JSON schema, so the arguments
always parse and match.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.errors import FailedPrecondition, InvalidArgument

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Where the model's own tool-call format starts (Hermes / Qwen 2.5).
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
#: Most tools one session may offer (each is written into every prompt).
MAX_TOOLS = 64
#: How a call written without its tags starts (spaces removed).
BARE_CALL = '{"name":'


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text[:32])


class ToolSpec(BaseModel):
    """One function the model may call: a name, what it does, and its JSON-schema parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Function name: letters, digits, '_' or '-', at most 64.")
    description: str = Field("", description="What the function does (the model reads it).")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments object.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"tool name {value!r} must be 1-64 letters, digits, '_' or '-'")
        return value

    @field_validator("name")
    @classmethod
    def _not_a_choice(cls, value: str) -> str:
        if value in ("auto", "none", "required"):
            raise ValueError(f"tool name {value!r} is a tool_choice keyword; name the tool otherwise")
        return value

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"parameters is not a valid JSON schema: {exc.message}") from None
        if value.get("type", "object") != "object":
            raise ValueError("parameters must describe an object (\"type\": \"object\")")
        for ref in _refs(value):
            if not ref.startswith("#"):
                raise ValueError(f"parameters may only refer inside themselves ($ref {ref!r} is not '#...')")
            if not _points_to(value, ref):
                raise ValueError(f"parameters' $ref {ref!r} points nowhere in the schema") from None
        return value

    def openai(self) -> dict[str, Any]:
        """The definition as chat templates and vLLM take it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolChoice:
    """auto, none, required, or ``function`` with ``name``."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str = ""

    @classmethod
    def parse(cls, value: Any) -> ToolChoice:
        """'auto' | 'none' | 'required' | a function name | {'type': 'function', 'name': ...}
        (also the chat-completions form {'type': 'function', 'function': {'name': ...}})."""
        if value is None or value == "":
            return cls()
        if isinstance(value, ToolChoice):
            return value
        if isinstance(value, str):
            if value in ("auto", "none", "required"):
                return cls(value)  # type: ignore[arg-type]
            if _NAME.match(value):
                return cls("function", value)
        if isinstance(value, dict) and value.get("type") == "function":
            name = value.get("name") or (value.get("function") or {}).get("name")
            if isinstance(name, str) and _NAME.match(name):
                return cls("function", name)
        raise InvalidArgument(f"tool_choice must be auto, none, required or a function, got {value!r}")

    @property
    def constrained(self) -> bool:
        """The answer must be a call (required or named): decoding is constrained to its schema."""
        return self.mode in ("required", "function")

    def wire(self) -> str | dict[str, str]:
        return {"type": "function", "name": self.name} if self.mode == "function" else self.mode


def check_tools(tools: Sequence[ToolSpec], choice: ToolChoice) -> None:
    """Names are unique and a named choice names one of them (InvalidArgument otherwise)."""
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"tool names must be unique: {names}")
    if choice.mode == "function" and choice.name not in names:
        raise InvalidArgument(f"tool_choice names {choice.name!r}, which is not among the tools {names}")
    if choice.constrained and not tools:
        raise InvalidArgument(f"tool_choice {choice.mode} needs at least one tool")


def call_schema(tools: Sequence[ToolSpec], choice: ToolChoice) -> dict[str, Any]:
    """JSON schema of one call object ``{"name": ..., "arguments": {...}}`` that ``choice`` allows:
    what constrained decoding generates."""
    allowed = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    options = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"], "additionalProperties": False} for t in allowed]
    return options[0] if len(options) == 1 else {"anyOf": options}


def check_arguments(tool: ToolSpec, arguments: str) -> dict[str, Any]:
    """The arguments JSON parsed and checked against the tool's schema (InvalidArgument if not)."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"arguments of {tool.name} are not JSON ({exc.msg}): {arguments[:200]!r}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"arguments of {tool.name} must be a JSON object, got {arguments[:200]!r}")
    try:
        errors = sorted(_validator(json.dumps(tool.parameters, sort_keys=True)).iter_errors(value), key=str)
    except Exception as exc:  # a schema jsonschema cannot apply (a bad regex, a broken reference)
        raise InvalidArgument(f"the schema of {tool.name} cannot check arguments: {exc}") from None
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
        raise InvalidArgument(f"arguments of {tool.name} do not match its schema at {where}: {errors[0].message}")
    return value


@lru_cache(maxsize=256)
def _validator(schema: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(schema))


def _points_to(schema: dict[str, Any], ref: str) -> bool:
    """``ref`` ('#' or a JSON pointer '#/a/b') names a part of ``schema``."""
    node: Any = schema
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False
    return ref == "#" or ref.startswith("#/")


def _refs(node: Any) -> list[str]:
    """Every ``$ref`` in a schema."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


@dataclass
class ToolCallDelta:
    """A tool call in an LLM stream: ``name`` on the first item of a call, then argument pieces;
    the last item has ``done`` and the whole ``arguments``. ``index`` numbers the calls of one
    answer (parallel calls)."""

    index: int
    name: str = ""
    arguments_delta: str = ""
    done: bool = False
    arguments: str = ""


class ToolCallReader:
    """Splits an answer's text into spoken content and tool calls, as the text streams.

    The parsing is vLLM's tool parser for the model's format (``llm.tool_parser``: ``hermes`` for
    Qwen 2.5 and Hermes, ``llama3_json``, ``mistral``...), the one vLLM's OpenAI server uses, run
    here for either engine: its streaming method finds the content and the argument pieces, its
    complete method the final calls. Text that may still become a call (a partial ``<tool_call>``
    tag, or, with hermes, an answer opening with ``{"name":``) is held back, and so is a closing
    brace that may belong to the call object rather than to the arguments. The done item's
    arguments are the parser's final reading (its JSON form); the pieces add up to them when the
    model wrote that same form, as the small models do, and otherwise the done item rules.
    """

    def __init__(self, tokenizer: Any, tools: Sequence[ToolSpec], *, parser: str = "hermes") -> None:
        try:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            from vllm.tool_parsers import ToolParserManager
        except ImportError as exc:
            raise FailedPrecondition(f"tool calls need vLLM's tool parsers ({exc}); install voxserve[cpu] or "
                                     "voxserve[gpu]") from None

        try:
            parser_class = ToolParserManager.get_tool_parser(parser)
        except KeyError:
            raise InvalidArgument(f"llm.tool_parser {parser!r} is not a vLLM tool parser; one of: "
                                  f"{', '.join(sorted(ToolParserManager.list_registered()))}") from None
        self._tokenizer = tokenizer
        self._hermes = parser == "hermes"  # the format whose bare JSON form small models write
        try:
            self._parser = parser_class(tokenizer, None)
        except (RuntimeError, ValueError) as exc:  # e.g. llama3_json on a tokenizer without its tokens
            raise FailedPrecondition(f"llm.tool_parser {parser!r} does not fit the tool model's tokenizer: {exc}") \
                from None
        self._request = ChatCompletionRequest(model="voxserve", messages=[{"role": "user", "content": "."}],
                                              tools=[t.openai() for t in tools] or None)
        self._raw = ""  # what the model wrote
        self._previous = ""  # the text last given to the parser
        self._seen: dict[int, str] = {}  # argument text the parser streamed, per call
        self._sent: dict[int, str] = {}  # argument text passed on, per call
        self._names: dict[int, str] = {}

    def _normalized(self) -> str:
        """The raw text, with a bare JSON call (``{"name": ...``) wrapped in the tags the parser knows."""
        head = self._raw.lstrip()
        if self._hermes and _compact(head).startswith(BARE_CALL) and CALL_START not in self._raw:
            return CALL_START + head
        return self._raw

    def feed(self, delta: str) -> list[str | ToolCallDelta]:
        self._raw += delta
        head = _compact(self._raw.lstrip())
        if self._hermes and not self._names and len(head) < len(BARE_CALL) and BARE_CALL.startswith(head):
            return []  # it may still open a bare call
        current = self._normalized()
        message = self._parser.extract_tool_calls_streaming(
            self._previous, current, current[len(self._previous):], [], [], [], self._request)
        self._previous = current
        out: list[str | ToolCallDelta] = []
        if message is None:
            return out
        if message.content:
            out.append(message.content)
        for call in message.tool_calls or []:
            fn = call.function
            name, args = (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else \
                (getattr(fn, "name", None), getattr(fn, "arguments", None))
            if name and call.index not in self._names:
                self._names[call.index] = name
                out.append(ToolCallDelta(call.index, name=name))
            if args:
                self._seen[call.index] = self._seen.get(call.index, "") + args
                sure = self._seen[call.index].rstrip().rstrip("}")  # a '}' may close the call object
                sent = self._sent.get(call.index, "")
                if len(sure) > len(sent) and sure.startswith(sent):
                    self._sent[call.index] = sure
                    out.append(ToolCallDelta(call.index, arguments_delta=sure[len(sent):]))
        return out

    def finish(self) -> list[str | ToolCallDelta]:
        """The answer ended: the rest of each call's arguments, and its done item."""
        out: list[str | ToolCallDelta] = []
        if not self._raw.strip():
            return out
        if self._hermes and CALL_START not in self._normalized() and not self._names:
            return out  # plain speech: all of it was passed on
        info = self._parser.extract_tool_calls(self._normalized(), self._request)
        calls = info.tool_calls if info.tools_called else []
        for index, call in enumerate(calls):
            final = call.function.arguments or "{}"
            if index not in self._names:
                self._names[index] = call.function.name
                out.append(ToolCallDelta(index, name=call.function.name))
            sent = self._sent.get(index, "")
            if final.startswith(sent) and len(final) > len(sent):
                out.append(ToolCallDelta(index, arguments_delta=final[len(sent):]))
            out.append(ToolCallDelta(index, self._names[index], done=True, arguments=final))
        for index in sorted(set(self._names) - set(range(len(calls)))):
            # a call that does not parse (cut short, bad JSON): done with what was written
            out.append(ToolCallDelta(index, self._names[index], done=True, arguments=self._seen.get(index, "")))
        return out


class ConstrainedCallReader:
    """The one call of a constrained answer: its text is a ``{"name": ..., "arguments": ...}``
    object by construction, so it is read as JSON, not searched for tags (a string argument may
    contain anything, even ``</tool_call>``). Pieces are passed on as for ``ToolCallReader``."""

    _NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*')

    def __init__(self) -> None:
        self._raw = ""
        self._name = ""
        self._sent = ""

    def feed(self, delta: str) -> list[str | ToolCallDelta]:
        self._raw += delta
        out: list[str | ToolCallDelta] = []
        match = self._NAME.match(self._raw)
        if match is None:
            return out
        if not self._name:
            self._name = match.group(1)
            out.append(ToolCallDelta(0, name=self._name))
        sure = self._raw[match.end():].rstrip().rstrip("}")  # a '}' may close the call object
        if len(sure) > len(self._sent) and sure.startswith(self._sent):
            out.append(ToolCallDelta(0, arguments_delta=sure[len(self._sent):]))
            self._sent = sure
        return out

    def finish(self) -> list[str | ToolCallDelta]:
        try:
            value = json.loads(self._raw)
            name, final = value["name"], json.dumps(value["arguments"], ensure_ascii=False)
        except (json.JSONDecodeError, KeyError, TypeError):
            match = self._NAME.match(self._raw)
            name, final = self._name or "?", self._raw[match.end():] if match else self._raw
        out: list[str | ToolCallDelta] = []
        if not self._name:
            self._name = name
            out.append(ToolCallDelta(0, name=name))
        if final.startswith(self._sent) and len(final) > len(self._sent):
            out.append(ToolCallDelta(0, arguments_delta=final[len(self._sent):]))
        out.append(ToolCallDelta(0, self._name, done=True, arguments=final))
        return out


async def parse_calls(deltas: AsyncIterator[str], reader: ToolCallReader | ConstrainedCallReader,
                      ) -> AsyncGenerator[str | ToolCallDelta, None]:
    """``deltas`` (text) as spoken text and tool-call items (see ``ToolCallReader``)."""
    async for delta in deltas:
        for item in reader.feed(delta):
            yield item
    for item in reader.finish():
        yield item

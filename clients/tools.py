"""Client-side function tools: a Python module of plain functions, exposed to the model and run here.

``LocalTools.load("examples/tools.py")`` takes every public function defined in the module and
describes it as a tool: its name, the first paragraph of its docstring, and a JSON schema of its
parameters made from the type hints (str, int, float, bool, ``Literal[...]``; a parameter with a
default is optional). ``run(name, arguments_json)`` calls the function with the model's arguments
in a worker thread and returns its result as JSON (an error as ``{"error": ...}``: the model is
told, the conversation goes on).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.errors import ClientError
from protos.voxserve.v1 import voice_pb2 as pb

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass
class LocalTool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]


class LocalTools:
    """The functions of one module, as tools."""

    def __init__(self, tools: list[LocalTool]) -> None:
        self.tools = {t.name: t for t in tools}

    @classmethod
    def load(cls, path: str) -> LocalTools:
        file = Path(path)
        if not file.is_file():
            raise ClientError(f"no tools module at {path}")
        spec = importlib.util.spec_from_file_location(f"voxserve_tools_{file.stem}", file)
        if spec is None or spec.loader is None:
            raise ClientError(f"{path} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's module: any error is theirs, reported plainly
            raise ClientError(f"importing {path} failed: {exc!r}") from exc
        fns = [f for name, f in vars(module).items() if inspect.isfunction(f) and not name.startswith("_")
               and f.__module__ == module.__name__]
        if not fns:
            raise ClientError(f"{path} defines no public function to offer as a tool")
        return cls([describe(f) for f in fns])

    def definitions(self) -> list[dict[str, Any]]:
        """The tools as OpenAI-style function definitions (name, description, parameters)."""
        return [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}
                for t in self.tools.values()]

    def protos(self) -> list[pb.Tool]:
        """The tools as gRPC ``SessionConfig.tools``."""
        return [pb.Tool(name=t.name, description=t.description, parameters_json=json.dumps(t.parameters))
                for t in self.tools.values()]

    async def run(self, name: str, arguments: str) -> str:
        """The result of ``name(**arguments)`` as JSON; an unknown tool or a failure is an error object."""
        tool = self.tools.get(name)
        if tool is None:
            return json.dumps({"error": f"no tool {name!r} here"})
        try:
            args = json.loads(arguments or "{}")
            result = await asyncio.to_thread(tool.fn, **args)
        except Exception as exc:  # the model is told what went wrong; the call goes on
            return json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        return json.dumps(result, default=str)


def describe(fn: Callable[..., Any]) -> LocalTool:
    """A function as a tool: the JSON schema of its parameters from its type hints."""
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        properties[name] = _schema(hints.get(name, str), f"{fn.__name__}({name})")
        if param.default is inspect.Parameter.empty:
            required.append(name)
    doc = inspect.getdoc(fn) or fn.__name__.replace("_", " ")
    return LocalTool(fn.__name__, doc.split("\n\n")[0].replace("\n", " "),
                     {"type": "object", "properties": properties, "required": required,
                      "additionalProperties": False}, fn)


def _schema(hint: Any, where: str) -> dict[str, Any]:
    if typing.get_origin(hint) is typing.Literal:
        return {"enum": list(typing.get_args(hint))}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise ClientError(f"{where}: type {hint!r} has no JSON schema here; use str, int, float, bool or Literal")

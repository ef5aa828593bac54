"""Chat history of one conversation: system prompt + alternating user/assistant turns.

The history is what the LLM sees next time, so it holds what was said and heard, nothing else:
the ``Turn`` that owns a response writes it exactly once, when the response ends (a committed
answer: the whole text; an interrupted one: the words the user heard; a discarded one: nothing).

No markers in the text: an interrupted answer is stored as the words that were heard, with the
interruption kept as metadata (``HistoryEntry.interrupted``, shown by ``records()``). Any marker in the
content ("…", "[interrupted]") becomes the answer style of a small model, which imitates the
history it is shown; an answer heard not at all leaves no assistant message.

Alternation: chat templates of several models reject two messages of the same role in a row. In a
voice session that happens naturally (the user speaks again before hearing any answer), so
consecutive messages of the same role are merged: "What is... | Actually, tell me about Rome."

Trimming: ``messages()`` keeps the newest turns within a turn cap and an optional budget measured
by ``count`` (characters by default; the LLM engine trims again by real tokens).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.errors import InvalidArgument

#: Rough per-message overhead of chat templates (role tags, separators), in budget units.
MESSAGE_OVERHEAD = 8


@dataclass
class ToolCallRecord:
    """A call the model made (an assistant message's ``tool_calls``)."""

    call_id: str
    name: str
    arguments: str  # JSON object

    def message(self) -> dict[str, Any]:
        try:
            args = json.loads(self.arguments or "{}")
        except json.JSONDecodeError:
            args = {}
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": args}}


@dataclass
class HistoryEntry:
    """One message of the history (the Turn of turn.py is a response in progress, not this)."""

    role: str  # "user", "assistant" or "tool" (a call's result)
    text: str
    interrupted: bool = False
    tool_calls: list[ToolCallRecord] = field(default_factory=list)  # assistant: the calls it made
    call_id: str = ""  # tool: the call this is the result of

    def message(self) -> dict[str, Any]:
        m: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.tool_calls:
            m["tool_calls"] = [c.message() for c in self.tool_calls]
        if self.call_id:
            m["tool_call_id"] = self.call_id
        return m


class ChatHistory:
    """System prompt plus alternating user/assistant turns."""

    def __init__(self, system_prompt: str = "", *, max_chars: int = 6000) -> None:
        if max_chars < 1:
            raise InvalidArgument("max_chars must be positive")
        self.system_prompt = system_prompt
        self.max_chars = max_chars
        self._turns: list[HistoryEntry] = []

    # --- recording -----------------------------------------------------------------------------

    def add_user(self, text: str) -> None:
        """Record what the user said (a final transcript or a typed turn)."""
        text = text.strip()
        if not text:
            raise InvalidArgument("user turn is empty")
        self._append(HistoryEntry("user", text))

    def add_assistant(self, text: str, *, interrupted: bool = False,
                      tool_calls: list[ToolCallRecord] | None = None) -> None:
        """Record what the user heard of an answer (all of it unless ``interrupted``), and the
        tool calls it made.

        Nothing heard and no call is no turn: the user's next words then join their previous ones.
        """
        text = text.strip()
        if text or tool_calls:
            self._append(HistoryEntry("assistant", text, interrupted, list(tool_calls or [])))

    def add_tool_result(self, call_id: str, output: str) -> None:
        """Record the result of a call, after the calls of its answer and the results before it;
        a second result for the same call (a late one, after a cancel) replaces the first. A call
        the history does not hold (its answer was never heard) gets no result: nothing to pair."""
        if not any(c.call_id == call_id for e in self._turns for c in e.tool_calls):
            return
        for entry in self._turns:
            if entry.role == "tool" and entry.call_id == call_id:
                entry.text = output
                return
        self._turns.append(HistoryEntry("tool", output, call_id=call_id))

    def _append(self, turn: HistoryEntry) -> None:
        last = self._turns[-1] if self._turns else None
        if last is not None and last.role == turn.role and turn.role != "tool" and not (
                last.tool_calls and turn.tool_calls):
            last.text = f"{last.text} {turn.text}".strip()
            last.interrupted = turn.interrupted
            last.tool_calls += turn.tool_calls
            return
        self._turns.append(turn)

    def truncate_last_assistant(self, heard: str) -> bool:
        """The newest answer was heard only up to ``heard`` (a late truncate); False if there is none."""
        if not self._turns or self._turns[-1].role != "assistant":
            return False
        calls = self._turns[-1].tool_calls
        if heard.strip() or calls:
            self._turns[-1] = HistoryEntry("assistant", heard.strip(), interrupted=True, tool_calls=calls)
        else:
            self._turns.pop()
        return True

    def restore(self, entries: list[HistoryEntry]) -> None:
        """Replace the turns with ``entries`` as they are (a resumed session's journal)."""
        self._turns = list(entries)

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self._turns.clear()

    def __len__(self) -> int:
        return len(self._turns)

    @property
    def turns(self) -> list[HistoryEntry]:
        """A copy of the recorded turns, oldest first."""
        return [HistoryEntry(t.role, t.text, t.interrupted, list(t.tool_calls), t.call_id) for t in self._turns]

    def records(self) -> list[dict[str, Any]]:
        """The history for operators and tests: messages plus the interruption flag."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{**t.message(), "interrupted": t.interrupted} for t in self._turns]

    # --- reading -------------------------------------------------------------------------------

    def messages(self, max_turns: int | None = None, *, budget: int | None = None,
                 count: Callable[[str], int] = len) -> list[dict[str, Any]]:
        """Chat messages for the LLM: system prompt, then the newest turns that fit.

        ``max_turns`` caps the number of messages (not pairs); ``budget`` (default ``max_chars``) is
        measured with ``count`` over every content plus a per-message overhead. The window starts
        with a user message and always keeps the newest one with everything after it (a tool call
        and its result are never cut from the question they answer).
        """
        if max_turns is not None and max_turns < 0:
            raise InvalidArgument("max_turns must not be negative")
        limit = self.max_chars if budget is None else budget
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        used = sum(count(m["content"]) + MESSAGE_OVERHEAD for m in system)
        # The newest user message and what follows it (the assistant's calls, their results) are one
        # exchange the model must see whole: kept whatever the caps say.
        last_user = max((i for i, t in enumerate(self._turns) if t.role == "user"), default=len(self._turns) - 1)
        tail = self._turns[max(0, last_user):]
        kept: list[HistoryEntry] = list(reversed(tail))
        used += sum(count(t.text) + MESSAGE_OVERHEAD for t in tail)
        for turn in reversed(self._turns[:max(0, last_user)]):
            if max_turns is not None and len(kept) >= max_turns:
                break
            cost = count(turn.text) + MESSAGE_OVERHEAD
            if used + cost > limit:
                break
            kept.append(turn)
            used += cost
        kept.reverse()
        while kept and kept[0].role != "user":
            kept.pop(0)
        return system + [t.message() for t in kept]

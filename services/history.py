"""Chat history for one conversation: system prompt + alternating user/assistant turns.

The history is what the LLM sees next time, so it must match what the user actually heard:
after a barge-in the session passes only the heard part of the answer
(``add_assistant(heard, interrupted=True)``).

Barge-in marker: an interrupted answer ends with ``INTERRUPTED_MARK`` ("…"). A plain ellipsis is
what a transcript of a cut-off speaker looks like, so the model reads it as "I was stopped here"
without any meta text; a bracketed note such as "[interrupted]" tends to be copied by small
models into their next answer, which TTS would then read aloud.

Alternation: chat templates of several models reject two user (or two assistant) messages in a
row. That happens naturally in a voice session (the user barges in before anything was heard, then
speaks again), so consecutive messages of the same role are merged into one.

Trimming: ``messages()`` drops the oldest turns first until the conversation fits a budget
(characters by default, or tokens with a ``count`` function such as a tokenizer's length). The
system prompt and the latest user message are always kept; if those alone do not fit, the engine
reports OutOfRange for the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.errors import InvalidArgument

#: Appended to an assistant turn that the user cut off.
INTERRUPTED_MARK = "…"

#: Rough per-message overhead of chat templates (role tags, separators), in budget units.
MESSAGE_OVERHEAD = 8


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str
    interrupted: bool = False

    def content(self) -> str:
        if self.interrupted:
            return (self.text.rstrip() + INTERRUPTED_MARK) if self.text.strip() else INTERRUPTED_MARK
        return self.text


class ChatHistory:
    """System prompt plus alternating user/assistant turns, trimmed oldest-first to a budget.

    ``max_chars`` is the default budget (system prompt and role overhead included); pass
    ``count=len(tokenizer.encode(...))``-style functions and ``budget`` to ``messages()`` to
    trim by tokens instead.
    """

    def __init__(self, system_prompt: str = "", *, max_chars: int = 6000) -> None:
        if max_chars < 1:
            raise InvalidArgument("max_chars must be positive")
        self.system_prompt = system_prompt
        self.max_chars = max_chars
        self._turns: list[Turn] = []

    # --- recording -----------------------------------------------------------------------------

    def add_user(self, text: str) -> None:
        """Record what the user said (a final transcript or a typed text turn)."""
        text = text.strip()
        if not text:
            raise InvalidArgument("user turn is empty")
        self._append(Turn("user", text))

    def add_assistant(self, text: str, *, interrupted: bool = False) -> None:
        """Record the assistant's answer; with ``interrupted`` pass only the part the user heard.

        An interrupted answer with nothing heard is recorded as a bare "…" so the model still
        knows it had started to answer and was stopped.
        """
        text = text.strip()
        if not text and not interrupted:
            return  # nothing was said: no turn
        self._append(Turn("assistant", text, interrupted))

    def _append(self, turn: Turn) -> None:
        last = self._turns[-1] if self._turns else None
        if last is not None and last.role == turn.role:
            if turn.role == "user":
                last.text = f"{last.text} {turn.text}"
            else:
                # a later assistant part continues what was heard before
                joined = " ".join(t for t in (last.text, turn.text) if t)
                self._turns[-1] = Turn("assistant", joined, turn.interrupted)
            return
        self._turns.append(turn)

    def truncate_last_assistant(self, heard: str) -> None:
        """The user cut off the last answer while it was still playing: keep only ``heard``."""
        if self._turns and self._turns[-1].role == "assistant":
            self._turns[-1] = Turn("assistant", heard.strip(), interrupted=True)

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self._turns.clear()

    def __len__(self) -> int:
        return len(self._turns)

    @property
    def turns(self) -> list[Turn]:
        """A copy of the recorded turns, oldest first."""
        return [Turn(t.role, t.text, t.interrupted) for t in self._turns]

    # --- reading -------------------------------------------------------------------------------

    def messages(
        self,
        max_turns: int | None = None,
        *,
        budget: int | None = None,
        count: Callable[[str], int] = len,
    ) -> list[dict[str, str]]:
        """Chat messages for the LLM: system prompt, then the newest turns that fit.

        ``max_turns`` caps the number of user/assistant messages (not pairs). ``budget`` (default
        ``max_chars``) is measured with ``count`` (default: characters) over every message content
        plus a small per-message overhead. Oldest turns go first; the window always starts with a
        user message, and the newest turn is always kept.
        """
        if max_turns is not None and max_turns < 1:
            raise InvalidArgument("max_turns must be at least 1")
        limit = self.max_chars if budget is None else budget
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        used = sum(count(m["content"]) + MESSAGE_OVERHEAD for m in system)

        kept: list[Turn] = []
        for turn in reversed(self._turns):
            if max_turns is not None and len(kept) >= max_turns:
                break
            cost = count(turn.content()) + MESSAGE_OVERHEAD
            if kept and used + cost > limit:
                break
            kept.append(turn)
            used += cost
        kept.reverse()
        while len(kept) > 1 and kept[0].role != "user":
            kept.pop(0)
        return system + [{"role": t.role, "content": t.content()} for t in kept]

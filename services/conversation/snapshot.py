"""A conversation as data: what the session journal stores, and how a replica picks it up again.

``capture`` is taken on the event loop after each change of turn (a few KB of JSON, well under a
millisecond); ``restore`` rebuilds the history and says which user turns still need an answer.
The history is stored as heard: an answer all sent counts as heard (the client plays what it
holds), one still being generated does not, and its user turn is answered again after the resume,
so a turn the user fully heard is never repeated and an unanswered one is never lost.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from services.conversation.history import ChatHistory, HistoryEntry, ToolCallRecord
from services.conversation.settings import SessionSettings
from services.conversation.turn import Turn, TurnState, UserInput

#: Format of an entry; an entry of another version is not restored (NOT_FOUND).
VERSION = 1
#: The result recorded for a call whose result was still awaited when the session moved.
MOVED_RESULT = '{"error": "cancelled: the call was interrupted when the session moved to another server"}'


def capture(*, session_id: str, settings: SessionSettings, history: ChatHistory, response: Turn | None,
            queued: list[UserInput], unanswered: list[UserInput], next_response: int,
            carried: UserInput | None = None) -> dict[str, Any]:
    """The conversation's state as a JSON-ready dict (see ``restore``). ``carried``: words whose
    answer was never heard (a discarded turn, e.g. cut by a hang-up): they still need one."""
    turns = [asdict(t) for t in history.turns]
    pending: list[str] = [t for t in [carried.full_text() if carried is not None else ""] if t]
    r = response
    if r is not None and not r.ended and not r.filler:
        user = r.user.full_text()
        if r.state is TurnState.SENT or r.calls:
            # every word is out (the user hears it, it will be committed), or the turn made calls
            # the client may be running: as Turn.end does, the calls are kept, never made again
            if user:
                turns.append(asdict(HistoryEntry("user", user)))
            heard = r.generated if r.state is TurnState.SENT else ""
            turns.append(asdict(HistoryEntry("assistant", heard, interrupted=r.state is not TurnState.SENT,
                                             tool_calls=list(r.calls))))
            turns += [asdict(HistoryEntry("tool", out, call_id=cid)) for cid, out in r.tool_outputs.items()
                      if any(c.call_id == cid for c in r.calls)]
        elif r.state in (TurnState.ACTIVE, TurnState.PAUSED) and user:
            pending = [user]  # (its words include any carried ones)
    pending += [t for u in queued if (t := u.full_text())]
    return {
        "version": VERSION,
        "session_id": session_id,
        "settings": settings.model_dump(mode="json"),
        "system_prompt": history.system_prompt,
        "turns": turns,
        "pending": pending,
        "unanswered": [t for u in unanswered if (t := u.full_text())],
        "next_response": next_response,
    }


def restore_history(state: dict[str, Any], max_chars: int = 6000) -> ChatHistory:
    """The history of a captured state; a call left without a result gets ``MOVED_RESULT``."""
    history = ChatHistory(state.get("system_prompt", ""), max_chars=max_chars)
    entries = [HistoryEntry(t["role"], t["text"], t.get("interrupted", False),
                            [ToolCallRecord(**c) for c in t.get("tool_calls", [])], t.get("call_id", ""))
               for t in state.get("turns", [])]
    history.restore(entries)
    answered = {e.call_id for e in entries if e.role == "tool"}
    for entry in entries:
        for call in entry.tool_calls:
            if call.call_id not in answered:
                history.add_tool_result(call.call_id, MOVED_RESULT)
    return history


def restore_settings(state: dict[str, Any]) -> SessionSettings:
    return SessionSettings.model_validate(state["settings"])

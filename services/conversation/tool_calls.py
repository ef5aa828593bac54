"""The calls a conversation's model made and waits on: results, filler, deadline, cancellation.

A call is made when its ``ToolCallDone`` leaves the turn that generated it (``made``). From then
on the conversation waits for the client's result (``submit``), without blocking anything else:
listening goes on, other sessions go on. While it waits:

- if the model said nothing before its call, a short filler is spoken after
  ``tool_calling.filler_after_ms`` (no dead air), unless the user or another answer has the floor;
- after ``tool_calling.result_timeout_s`` the call ends with an error event and the model is told
  it failed (with ``auto_continue``, it then says so);
- the model answers again once every call of its response has a result, and not before the
  response has sent everything (a parallel call may still be on its way);
- a new user turn, ``cancel_response`` or the end of the session cancels the wait
  (``ToolCallCancelled``). A result that comes later is recorded in the history (it replaces the
  cancellation), not spoken, unless the client asks for a response.

Results enter the history paired with their call, in the order of the calls: the turn that made
them writes those known when it ends, later ones go to the history directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from services.conversation import events as ev
from services.conversation.aio import TaskGroup, cancel_and_wait
from services.conversation.history import ChatHistory, ToolCallRecord
from services.conversation.observer import Observer
from services.conversation.settings import SessionSettings
from services.conversation.turn import Turn
from services.errors import FailedPrecondition, InvalidArgument, NotFound

#: Calls remembered after they ended (late results, duplicate results).
RECENT_CALLS = 64
#: Largest result accepted, in characters (it goes into the model's prompt, within the history's
#: budget: ChatHistory.max_chars is 6000).
MAX_OUTPUT_CHARS = 4_000

State = Literal["pending", "done", "cancelled", "timed_out"]


@dataclass
class PendingCall:
    """One call and where it stands."""

    record: ToolCallRecord
    turn: Turn
    made_at: float
    state: State = "pending"


@dataclass
class _Wait:
    """The watcher of one response's calls (filler, deadline)."""

    response_id: int
    task: asyncio.Task[None] | None = None
    calls: list[str] = field(default_factory=list)
    finished: bool = False  # the response sent everything: no call of it is still to come


class ToolCalls:
    """Calls of one conversation (see the module docstring)."""

    def __init__(self, settings: Callable[[], SessionSettings], history: ChatHistory,
                 emit: Callable[[ev.Event], Awaitable[None]], tasks: TaskGroup, observer: Observer,
                 *, say: Callable[[str], Awaitable[None]], floor_taken: Callable[[], bool],
                 respond: Callable[[float], Awaitable[None]], lock: asyncio.Lock,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._history = history
        self._emit = emit
        self._tasks = tasks
        self._observer = observer
        self._say = say  # speak a filler
        self._floor_taken = floor_taken  # an answer is playing, or the user is talking
        self._respond = respond  # the model continues (auto_continue), given when the last result came
        self._lock = lock  # the conversation's: the watcher changes its state like an input does
        self._clock = clock
        self._calls: OrderedDict[str, PendingCall] = OrderedDict()
        self._waits: dict[int, _Wait] = {}
        self._answer_due: float | None = None  # every result is in, the answer waits for create_response

    # --- the model's side ------------------------------------------------------------------------

    def made(self, turn: Turn, record: ToolCallRecord) -> None:
        """``turn`` sent a complete call: wait for its result."""
        self._calls[record.call_id] = PendingCall(record, turn, self._clock())
        self._trim()
        self._observer.tool_call("made")
        wait = self._waits.get(turn.response_id)
        if wait is None:
            wait = self._waits[turn.response_id] = _Wait(turn.response_id)
            wait.task = self._tasks.spawn(self._watch(turn, wait), name=f"tools-{turn.response_id}")
        wait.calls.append(record.call_id)

    @property
    def pending(self) -> list[str]:
        """Ids of the calls whose result is still awaited."""
        return [cid for cid, c in self._calls.items() if c.state == "pending"]

    async def _watch(self, turn: Turn, wait: _Wait) -> None:
        cfg = self._settings().tool_calling
        start = self._clock()
        if cfg.filler and not turn.generated.strip():
            await asyncio.sleep(cfg.filler_after_ms / 1000)
            async with self._lock:
                if self._still_waiting(wait) and not self._floor_taken():
                    self._observer.tool_call("filler")
                    await self._say(cfg.filler_text)
        remaining = cfg.result_timeout_s - (self._clock() - start)
        if remaining > 0:
            await asyncio.sleep(remaining)
        async with self._lock:
            await self._time_out(turn, wait)

    async def _time_out(self, turn: Turn, wait: _Wait) -> None:
        cfg = self._settings().tool_calling
        late = [cid for cid in wait.calls if self._calls.get(cid) and self._calls[cid].state == "pending"]
        if not late:
            return
        for cid in late:
            call = self._calls[cid]
            await self._end(call, "timed_out", "timeout",
                            f"no result within {cfg.result_timeout_s:g} s: the tool did not answer")
            await self._emit(ev.ErrorEvent(code="DEADLINE_EXCEEDED", response_id=turn.response_id, message=(
                f"tool call {cid} ({call.record.name}) got no result within {cfg.result_timeout_s:g} s; "
                "the conversation goes on without it"), tool_call_id=cid))
        self._waits.pop(wait.response_id, None)
        await self._all_in()  # the model tells the user it could not be done (after what is playing)

    def _still_waiting(self, wait: _Wait) -> bool:
        return any(self._calls.get(cid) and self._calls[cid].state == "pending" for cid in wait.calls)

    # --- the client's side ---------------------------------------------------------------------

    async def submit(self, call_id: str, output: str) -> None:
        """The client's result of ``call_id`` (any string; JSON by convention). The caller holds
        the conversation's lock."""
        if not isinstance(output, str):
            raise InvalidArgument("a tool result's output must be a string (JSON by convention)")
        if len(output) > MAX_OUTPUT_CHARS:
            raise InvalidArgument(f"tool result of {call_id} is {len(output)} characters; at most "
                                  f"{MAX_OUTPUT_CHARS} go into the model's context")
        call = self._calls.get(call_id)
        if call is None:
            raise NotFound(f"no tool call {call_id!r} in this conversation (known: "
                           f"{', '.join(self._calls) or 'none'})")
        if call.state == "done":
            raise FailedPrecondition(f"tool call {call_id} already has its result")
        late = call.state != "pending"
        call.state = "done"
        self._record(call, output)
        self._observer.tool_call("result_after_cancel" if late else "result",
                                 self._clock() - call.made_at)
        await self._emit(ev.ToolResultAccepted(call_id=call_id, late=late))
        if late:
            return  # recorded, not spoken: the client may ask for a response
        wait = self._waits.get(call.turn.response_id)
        if wait is not None:
            await self._maybe_done(wait)

    async def turn_finished(self, turn: Turn) -> None:
        """``turn`` sent everything: its calls are all known (the caller holds the lock). Results
        that came before this are not all of them until now (parallel calls)."""
        wait = self._waits.get(turn.response_id)
        if wait is not None:
            wait.finished = True
            await self._maybe_done(wait)

    async def _maybe_done(self, wait: _Wait) -> None:
        if not wait.finished or self._still_waiting(wait):
            return
        self._waits.pop(wait.response_id, None)
        await cancel_and_wait(wait.task)
        await self._all_in()

    async def _all_in(self) -> None:
        """Every result (or failure) of a response is in: the model answers, now or when asked."""
        if self._settings().tool_calling.auto_continue:
            await self._respond(self._clock())
        else:
            self._answer_due = self._clock()

    def take_answer_due(self) -> float | None:
        """When the last result came, if the answer that uses it is still to be asked for (realtime
        ``response.create``); None otherwise. Taking it clears it."""
        due, self._answer_due = self._answer_due, None
        return due

    async def cancel_all(self, reason: str) -> None:
        """Stop waiting for every pending call (a user turn, cancel_response, the end)."""
        self._answer_due = None
        for cid in self.pending:
            await self._end(self._calls[cid], "cancelled", reason, f"cancelled ({reason}) before a result came")
        waits, self._waits = list(self._waits.values()), {}
        await cancel_and_wait(*(w.task for w in waits))

    async def _end(self, call: PendingCall, state: State, reason: str, why: str) -> None:
        call.state = state
        self._record(call, json.dumps({"error": why}))
        self._observer.tool_call(state)
        await self._emit(ev.ToolCallCancelled(call_id=call.record.call_id, reason=reason))

    def _record(self, call: PendingCall, output: str) -> None:
        """Into the history after the call (by the turn when it ends, or now if it has)."""
        if call.turn.ended:
            self._history.add_tool_result(call.record.call_id, output)
        else:
            call.turn.tool_outputs[call.record.call_id] = output

    def _trim(self) -> None:
        while len(self._calls) > RECENT_CALLS:
            oldest = next(iter(self._calls))
            if self._calls[oldest].state == "pending":
                break
            self._calls.popitem(last=False)

"""What every protocol adapter of the gateway shares: admission, stage info and health, opening
a conversation (with its checks), the registry of live and recent sessions, metrics.

The gRPC ``Converse`` adapter and the realtime WebSocket adapter are thin: they translate their
protocol to ``Conversation`` calls and events, and open sessions here, so there is one copy of
the session logic. No Ray import: the stage handles come in as ``GatewayStages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from deployments.config import AppArgs
from services.conversation import Conversation, Observer, SessionSettings
from services.conversation.events import TurnLatency
from services.conversation.history import ChatHistory
from services.conversation.stages import Stages
from services.errors import OutOfRange, ResourceExhausted, Unavailable, to_vox_error

log = logging.getLogger("ray.serve")

#: Histories of recently ended sessions kept for operators and tests.
RECENT_SESSIONS = 64
#: How long a health verdict is reused (probes come every few seconds from several places).
HEALTH_TTL_S = 0.5
#: How long every stage has to answer a health probe. A live stage answers in milliseconds (under
#: full load, after one synthesis chunk at most); a stage whose replica Ray is restarting holds the
#: call until it is back (~5 s measured for TTS here), and Serve's status shows RUNNING all along:
#: this timeout is what says NOT_SERVING meanwhile.
HEALTH_TIMEOUT_S = 2.0


class GatewayStages(Stages, Protocol):
    """The stages plus what only the gateway asks of them."""

    async def info(self) -> dict[str, Any]:
        """Models and voice rate of the stages (each stage answers: a liveness check too)."""
        ...

    async def count_tokens(self, text: str) -> int:
        """LLM tokens of ``text``."""
        ...

    async def replicas_running(self) -> None:
        """Raise when a stage has no running replica (a call would wait for one to come back)."""
        ...


@dataclass
class _Admission:
    """A session let in by ``SessionHub.slot``: when, and whether it really opened."""

    previous: float  # the hub's last admission before this one
    at: float  # this one
    opened: bool


class LatencyWindow:
    """First-audio latencies of the answers of the last ``window_s`` seconds (admission control)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=4096)

    def add(self, ms: float) -> None:
        self._samples.append((self.clock(), ms))

    def p95(self, min_samples: int = 5) -> float | None:
        """p95 of the window; None with fewer than ``min_samples`` (too few to judge)."""
        cutoff = self.clock() - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        values = [ms for _, ms in self._samples]
        if len(values) < min_samples:
            return None
        # numpy's linear interpolation: the load tester and the bench scripts use the same definition
        return float(np.percentile(values, 95))


class _HubObserver:
    """Forwards a conversation's reports to the metrics, and keeps the hub's latency window."""

    def __init__(self, hub: SessionHub, inner: Observer | None) -> None:
        self.hub, self.inner = hub, inner

    def speculation(self, outcome: str) -> None:
        if self.inner is not None:
            self.inner.speculation(outcome)

    def interruption(self, outcome: str) -> None:
        if self.inner is not None:
            self.inner.interruption(outcome)

    def turn_ended(self, state: str, reason: str) -> None:
        if self.inner is not None:
            self.inner.turn_ended(state, reason)

    def answered(self, latency: TurnLatency) -> None:
        if latency.first_audio_ms > 0:
            self.hub.first_audio.add(latency.first_audio_ms)
        if self.inner is not None:
            self.inner.answered(latency)

    def tool_call(self, outcome: str, seconds: float | None = None) -> None:
        if self.inner is not None:
            self.inner.tool_call(outcome, seconds)


class SessionHub:
    """Sessions of one gateway replica."""

    def __init__(self, args: AppArgs, stages: GatewayStages, observer: Observer | None = None) -> None:
        self.args = args
        self.stages = stages
        self.observer: Observer = _HubObserver(self, observer)
        self.first_audio = LatencyWindow(args.gateway.admission_window_s)
        self.active = 0
        self._shed_at: float | None = None  # when admission last refused for slow answers
        self._last_admit = float("-inf")  # when the last session was let in
        self.live: dict[str, Conversation] = {}
        self._recent: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._info: dict[str, Any] | None = None
        self._health: tuple[float, bool] = (0.0, False)

    # --- stages ----------------------------------------------------------------------------------

    async def stage_info(self, timeout_s: float | None = HEALTH_TIMEOUT_S) -> dict[str, Any]:
        """Voice rate and model names (asked once; they do not change while a replica lives).
        ``timeout_s`` None waits for stages still starting (the gateway's warm-up)."""
        if self._info is None:
            try:
                self._info = await asyncio.wait_for(self.stages.info(), timeout_s)
            except Exception as exc:
                raise Unavailable("the voice pipeline's stages are not ready yet; retry shortly") from exc
        return self._info

    async def healthy(self) -> bool:
        """Every stage answers now (asked again after ``HEALTH_TTL_S``: a dead stage turns it false)."""
        at, ok = self._health
        if time.monotonic() - at < HEALTH_TTL_S:
            return ok
        try:
            await asyncio.wait_for(self.stages.replicas_running(), HEALTH_TIMEOUT_S)
            self._info = await asyncio.wait_for(self.stages.info(), HEALTH_TIMEOUT_S)
            ok = True
        except Exception as exc:
            log.warning("health check: a stage did not answer: %s", to_vox_error(exc).message)
            ok = False
        self._health = (time.monotonic(), ok)
        return ok

    # --- sessions --------------------------------------------------------------------------------

    def admit(self, *, record: bool = False) -> None:
        """RESOURCE_EXHAUSTED at once (with a retry hint) when this replica cannot take one more
        session without slowing the ones it has: at ``max_sessions``, while its answers' p95
        time to first audio is over ``admission_first_audio_ms``, and, after such a refusal, to
        more than one new session per ``retry_after_s`` until the window can judge again.
        A pure check unless ``record`` (``slot`` records the session it lets in)."""
        g = self.args.gateway
        if self.active >= g.max_sessions:
            raise ResourceExhausted(f"server busy: {g.max_sessions} sessions already active on this replica; "
                                    f"retry in {g.retry_after_s:g} s", retry_after_s=g.retry_after_s)
        now = self.first_audio.clock()
        p95 = self.first_audio.p95()
        if self.active and p95 is not None and p95 > g.admission_first_audio_ms:
            self._shed_at = now
            raise ResourceExhausted(f"server at capacity: answers take {p95:.0f} ms to start (p95, target "
                                    f"{g.admission_first_audio_ms} ms); retry in {g.retry_after_s:g} s",
                                    retry_after_s=g.retry_after_s)
        recovering = self._shed_at is not None and now - self._shed_at < g.admission_window_s
        if self.active and p95 is None and recovering and now - self._last_admit < g.retry_after_s:
            # After shedding, the slow answers age out of the window before new ones come in: the
            # window is then too thin to judge, and every caller redialling at once would get in
            # together and overload the replica again (seen in the autoscaling run). Let them in
            # one per retry interval until the window has enough answers to judge again.
            raise ResourceExhausted(f"server recovering from overload: new sessions are let in one every "
                                    f"{g.retry_after_s:g} s; retry in {g.retry_after_s:g} s",
                                    retry_after_s=g.retry_after_s)
        if record:
            self._last_admit = now

    def stats(self) -> dict[str, Any]:
        """What an operator or an autoscaler wants to know about this replica now."""
        return {"active_sessions": self.active, "max_sessions": self.args.gateway.max_sessions,
                "first_audio_p95_ms": self.first_audio.p95(min_samples=1)}

    async def check_system_prompt(self, prompt: str) -> None:
        """OUT_OF_RANGE for a system prompt over the token limit (it would stall every session's
        prefill and leave no room for the conversation in the context)."""
        if not prompt:
            return
        limit = self.args.gateway.max_system_prompt_tokens
        tokens = await asyncio.wait_for(self.stages.count_tokens(prompt), self.args.gateway.timeouts.asr_s)
        if tokens > limit:
            raise OutOfRange(f"system_prompt is {tokens} tokens; at most {limit} are accepted (shorten it)")

    @contextlib.asynccontextmanager
    async def slot(self, *, opens_later: bool = False) -> AsyncIterator[_Admission]:
        """One admitted stream (RESOURCE_EXHAUSTED at once when the replica is full). With
        ``opens_later`` the caller marks the admission ``opened`` once its session really
        started; one that never did gives its recovery slot back (see ``admit``)."""
        previous = self._last_admit
        self.admit(record=True)
        admission = _Admission(previous=previous, at=self._last_admit, opened=not opens_later)
        self.active += 1
        try:
            yield admission
        finally:
            self.active -= 1
            if not admission.opened and self._last_admit == admission.at:
                self._last_admit = admission.previous

    @contextlib.asynccontextmanager
    async def session(self, settings: SessionSettings) -> AsyncIterator[Conversation]:
        """A started conversation, registered while it lives, closed (everything stopped) after."""
        async with self.slot(opens_later=True) as admission, self._conversation(settings) as conv:
            admission.opened = True
            yield conv

    @contextlib.asynccontextmanager
    async def _conversation(self, settings: SessionSettings) -> AsyncIterator[Conversation]:
        conv: Conversation | None = None
        try:
            info = await self.stage_info()
            await self.check_system_prompt(settings.system_prompt)
            history = ChatHistory(settings.system_prompt or self.args.llm.system_prompt)
            conv = Conversation(self.stages, settings, history=history, info=info, observer=self.observer)
            self.live[conv.session_id] = conv
            await conv.start()
            yield conv
        finally:
            if conv is not None:
                await conv.aclose()
                self.live.pop(conv.session_id, None)
                self._recent[conv.session_id] = conv.records()
                while len(self._recent) > RECENT_SESSIONS:
                    self._recent.popitem(last=False)

    def history(self, session_id: str) -> list[dict[str, Any]] | None:
        """The recorded history of a live or recently ended session."""
        conv = self.live.get(session_id)
        return conv.records() if conv is not None else self._recent.get(session_id)

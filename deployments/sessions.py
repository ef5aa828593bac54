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
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from deployments.autoscaling import ScalingView
from deployments.config import ASR, GATEWAY, LLM, TTS, AppArgs
from services.conversation import Conversation, Observer, SessionSettings
from services.conversation.events import SessionMoved, TurnLatency
from services.conversation.history import ChatHistory
from services.conversation.snapshot import VERSION, restore_history
from services.conversation.stages import Stages
from services.errors import (
    FailedPrecondition,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    to_vox_error,
)
from services.journal import JournalStore, JournalWriter
from services.resume_tokens import NO_SESSION, ResumeTokens

log = logging.getLogger("ray.serve")

#: Journal write times kept for ``stats()``.
JOURNAL_SAMPLES = 2048
#: Histories of recently ended sessions kept for operators and tests.
RECENT_SESSIONS = 64
#: How long a health verdict is reused (probes come every few seconds from several places).
HEALTH_TTL_S = 0.5
#: How long every stage has to answer a health probe. A live stage answers in milliseconds (under
#: full load, after one synthesis chunk at most); a stage whose replica Ray is restarting holds the
#: call until it is back (~5 s measured for TTS here), and Serve's status shows RUNNING all along:
#: this timeout is what says NOT_SERVING meanwhile.
HEALTH_TIMEOUT_S = 2.0
#: Consecutive failed probes that make an outage (admission refuses, latencies are not counted).
OUTAGE_PROBES = 2
#: A monitor verdict older than this is not trusted (a probe is hanging): NOT_SERVING.
HEALTH_STALE_S = 3.0


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


#: The stages whose replicas make answers faster (admission asks whether one is still growing).
MODEL_STAGES = (ASR, LLM, TTS)


class LatencyWindow:
    """Figures (ms) of the answers of the last ``window_s`` seconds (admission control): their first
    audio latencies, or the silence inside them."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=4096)

    def add(self, ms: float) -> None:
        self._samples.append((self.clock(), ms))

    def _values(self) -> list[float]:
        cutoff = self.clock() - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        return [ms for _, ms in self._samples]

    def p95(self, min_samples: int = 5) -> float | None:
        """p95 of the window; None with fewer than ``min_samples`` (too few to judge)."""
        values = self._values()
        if len(values) < min_samples:
            return None
        # numpy's linear interpolation: the load tester and the bench scripts use the same definition
        return float(np.percentile(values, 95))

    def share_over(self, limit: float, min_samples: int = 5) -> float | None:
        """Share of the window's values over ``limit``; None with fewer than ``min_samples``."""
        values = self._values()
        if len(values) < min_samples:
            return None
        return sum(v > limit for v in values) / len(values)


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
        if latency.first_audio_ms > 0 and not self.hub.outage_within(latency.first_audio_ms / 1000 + 1.0):
            # (an answer slowed by a stage outage says nothing about load: admission must not
            # read the outage as overload)
            self.hub.first_audio.add(latency.first_audio_ms)
        if self.inner is not None:
            self.inner.answered(latency)

    def played(self, underruns: int, underrun_ms: float) -> None:
        if not self.hub.outage_within(10.0):  # (a gap from a stage restart is no sign of load either)
            self.hub.stall_ms.add(underrun_ms if underruns else 0.0)
        if self.inner is not None:
            self.inner.played(underruns, underrun_ms)

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
        self.stall_ms = LatencyWindow(args.gateway.admission_window_s)  # silence inside each ended answer
        self.active = 0
        self._shed_at: float | None = None  # when admission last refused for slow answers
        self._last_admit = float("-inf")  # when the last session was let in
        self.live: dict[str, Conversation] = {}
        self._recent: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._info: dict[str, Any] | None = None
        self._health: tuple[float, bool] = (0.0, False)
        self.journal: JournalStore | None = None
        self.tokens: ResumeTokens | None = None
        self.journal_write_ms: deque[float] = deque(maxlen=JOURNAL_SAMPLES)
        self.journal_failures = 0
        self.draining = False
        self._down_since: float | None = None  # the stages' outage in progress (health monitor)
        self._outage_ended = float("-inf")
        self._monitored = False
        # per live conversation (keyed by the object: a session resumed on this same replica has
        # two, briefly): set once SessionMoved was sent; its journal writer and owner
        self._moved: dict[Conversation, asyncio.Event] = {}
        self._writers: dict[Conversation, tuple[JournalWriter, str]] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: the autoscaler's published decisions (``watch_scaling``); None: no autoscaling known
        self.scaling: ScalingView | None = None

    async def open_journal(self, store: JournalStore | None, secret: bytes | None = None) -> None:
        """Journal sessions in ``store`` (None: no journal, no resume). ``secret`` signs resume
        tokens; None: the store's shared random secret."""
        if store is None:
            return
        self.tokens = ResumeTokens(secret or await store.shared_secret(), self.args.sessions.resume_token_ttl_s)
        self.journal = store

    def _journal_written(self, ms: float, ok: bool) -> None:
        if ok:
            self.journal_write_ms.append(ms)
        else:
            self.journal_failures += 1
        report = getattr(self.observer.inner, "journal_write", None)  # type: ignore[attr-defined]
        if report is not None:
            report(ms, ok)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _moves(self, kind: str) -> None:
        report = getattr(self.observer.inner, "session_moved", None)  # type: ignore[attr-defined]
        if report is not None:
            report(kind)

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

    async def monitor_health(self, period_s: float = HEALTH_TTL_S) -> None:
        """Probe the stages every ``period_s`` for ever (the gateway runs it): health answers from
        the newest verdict at once, admission refuses during an outage (UNAVAILABLE, not
        RESOURCE_EXHAUSTED) and admits again as soon as the stages are back."""
        self._monitored = True
        failures = 0
        while True:
            ok = await self._probe()
            now = time.monotonic()
            failures = 0 if ok else failures + 1
            if failures >= OUTAGE_PROBES and self._down_since is None:  # one slow probe is no outage
                self._down_since = now
            elif ok and self._down_since is not None:
                self._down_since, self._outage_ended = None, now
                self._shed_at = None  # refusals for slow answers were the outage's, not load's
            await asyncio.sleep(period_s)

    async def watch_scaling(self, view: ScalingView, period_s: float = 1.0) -> None:
        """Keep ``view`` fresh for ever (the gateway runs it): admission asks it whether the
        deployments can still grow before refusing a caller."""
        self.scaling = view
        while True:
            try:
                await asyncio.to_thread(view.refresh)
            except Exception as exc:  # a stale view only makes admission stricter (see ScalingView)
                log.debug("scaling view not refreshed: %s", exc)
            await asyncio.sleep(period_s)

    def outage_within(self, seconds: float) -> bool:
        """A stage outage is going on, or ended less than ``seconds`` ago."""
        return self._down_since is not None or time.monotonic() - self._outage_ended < seconds

    async def _probe(self) -> bool:
        try:
            await asyncio.wait_for(self.stages.replicas_running(), HEALTH_TIMEOUT_S)
            probe = getattr(self.stages, "probe", None)  # per stage, naming the ones down
            self._info = await (probe(HEALTH_TIMEOUT_S) if probe is not None
                                else asyncio.wait_for(self.stages.info(), HEALTH_TIMEOUT_S))
            ok = True
        except Exception as exc:
            log.warning("health check: a stage did not answer: %s", to_vox_error(exc).message)
            ok = False
        self._health = (time.monotonic(), ok)
        return ok

    async def healthy(self) -> bool:
        """Every stage answers now. With the monitor running: its newest verdict, at once (one
        older than ``HEALTH_STALE_S`` means a probe hangs: not healthy); else probed here, reused
        for ``HEALTH_TTL_S``."""
        at, ok = self._health
        if self._monitored:
            return ok and time.monotonic() - at < HEALTH_STALE_S
        if time.monotonic() - at < HEALTH_TTL_S:
            return ok
        return await self._probe()

    # --- sessions --------------------------------------------------------------------------------

    def admit(self, *, record: bool = False, resuming: bool = False) -> None:
        """RESOURCE_EXHAUSTED at once (with a retry hint) when this replica cannot take one more
        session without slowing the ones it has. With the autoscaler's view (``scaling``):

        - at ``max_sessions`` it still lets ``burst_sessions`` more in while the Gateway is
          growing (or its sessions are at target over every replica, so it is about to): the
          router sends later calls to the new replica; else it refuses, and the retry lands on a
          replica with room;
        - while its answers' p95 time to first audio is over ``admission_first_audio_ms``, or
          over ``admission_stalled_share`` of them stalled at the caller for more than
          ``admission_stall_ms``, it lets callers in one per ``retry_after_s`` as long as a model
          stage can still add replicas (their policies see the same latency), and sheds only when
          none can.

        - while its sessions' audio arrives over ``admission_input_lag_s`` behind real time
          (median), it refuses: that backlog is before the gateway, where no replica helps.

        Without the view, the first two limits are hard. After a refusal for slow answers, it also lets
        new sessions in one per ``retry_after_s`` until the window can judge again. A pure check
        unless ``record`` (``slot`` records the session it lets in).

        ``resuming``: a call moved here (drain, scale-down) or back after its replica died. It is
        load the app already carries, not a new caller, and refusing it would cut a live call: it
        is let in up to ``max_sessions + burst_sessions`` whatever the latency."""
        g = self.args.gateway
        if self.draining:
            raise Unavailable("this gateway replica is shutting down; retry and another replica takes the session")
        if self._down_since is not None:
            down = ", ".join(sorted(getattr(self.stages, "down", set()))) or "a"
            raise Unavailable(f"the {down} stage of the voice pipeline is down (restarting); retry in "
                              f"{g.retry_after_s:g} s")
        scaling = self.scaling
        if resuming:
            if self.active >= g.max_sessions + g.burst_sessions:
                raise ResourceExhausted(f"server busy: {self.active} sessions already active on this replica "
                                        f"(max {g.max_sessions} + {g.burst_sessions} for resumed calls); retry in "
                                        f"{g.retry_after_s:g} s", retry_after_s=g.retry_after_s)
            return
        if self.active >= g.max_sessions:
            burst = (scaling is not None and self.active < g.max_sessions + g.burst_sessions
                     and (scaling.growing(GATEWAY) or (scaling.can_grow(GATEWAY)
                                                       and scaling.at_target(GATEWAY, "sessions"))))
            if not burst:
                at_max = scaling is not None and scaling.fresh(GATEWAY) is not None and not scaling.can_grow(GATEWAY)
                where = " and the Gateway deployment is at its max replicas" if at_max else ""
                raise ResourceExhausted(f"server busy: {self.active} sessions already active on this replica "
                                        f"(max {g.max_sessions}){where}; retry in {g.retry_after_s:g} s",
                                        retry_after_s=g.retry_after_s)
        now = self.first_audio.clock()
        lag = self.input_lag_s()
        if self.active and lag is not None and lag > g.admission_input_lag_s:
            # the callers' audio queues before this replica (Serve's proxy relays each message
            # with a round trip): more replicas of the model stages would not shorten that queue
            self._shed_at = now
            raise ResourceExhausted(f"server at capacity: callers' audio reaches this replica {lag:.1f} s behind "
                                    f"real time (median of its sessions, limit {g.admission_input_lag_s:g} s); "
                                    f"retry in {g.retry_after_s:g} s", retry_after_s=g.retry_after_s)
        p95 = self.first_audio.p95()
        stalled = self.stall_ms.share_over(g.admission_stall_ms)
        trouble = ""
        if p95 is not None and p95 > g.admission_first_audio_ms:
            trouble = f"answers take {p95:.0f} ms to start (p95, target {g.admission_first_audio_ms:g} ms)"
        elif stalled is not None and stalled > g.admission_stalled_share:
            # first audio can be fast while the rest of each answer comes too slowly to play
            # smoothly: the callers already in hear it, and one more would make it worse
            trouble = (f"{stalled:.0%} of recent answers stalled over {g.admission_stall_ms:g} ms at the caller "
                       f"(limit {g.admission_stalled_share:.0%})")
        if self.active and trouble:
            growing = [s for s in MODEL_STAGES if scaling is not None and scaling.grows_for_latency(s)]
            if not growing:
                self._shed_at = now
                why = ""
                if scaling is not None and any(scaling.can_grow(s) for s in MODEL_STAGES):
                    why = (f" and {', '.join(MODEL_STAGES)} add no replicas for slow answers here (on one machine "
                           "more replicas add no compute)")
                elif scaling is not None:
                    why = f" and {', '.join(MODEL_STAGES)} are at their max replicas"
                raise ResourceExhausted(f"server at capacity: {trouble}{why}; retry in {g.retry_after_s:g} s",
                                        retry_after_s=g.retry_after_s)
            # Slow answers while a model stage can still add replicas: callers come in, but one
            # per retry interval, so that the sessions already running are not swamped before
            # the new replicas take load.
            if now - self._last_admit < g.retry_after_s:
                raise ResourceExhausted(f"server scaling up: {trouble} while {', '.join(growing)} can add "
                                        f"replicas; new sessions are let in one every {g.retry_after_s:g} s; "
                                        f"retry in {g.retry_after_s:g} s", retry_after_s=g.retry_after_s)
            self._shed_at = None
        recovering = self._shed_at is not None and now - self._shed_at < g.admission_window_s
        if self.active and (p95 is None or stalled is None) and recovering and now - self._last_admit < g.retry_after_s:
            # After shedding, the slow answers age out of the window before new ones come in: the
            # window is then too thin to judge, and every caller redialling at once would get in
            # together and overload the replica again (seen in the autoscaling run). Let them in
            # one per retry interval until the window has enough answers to judge again.
            raise ResourceExhausted(f"server recovering from overload: new sessions are let in one every "
                                    f"{g.retry_after_s:g} s; retry in {g.retry_after_s:g} s",
                                    retry_after_s=g.retry_after_s)
        if record:
            self._last_admit = now

    def input_lag_s(self) -> float | None:
        """Median backlog of the live sessions' audio input; None with fewer than two sessions
        (one caller's own slow network is not the replica's). The lower median: with two, both
        must lag."""
        lags = sorted(conv.input_lag.current() for conv in self.live.values())
        return lags[(len(lags) - 1) // 2] if len(lags) >= 2 else None

    def stats(self) -> dict[str, Any]:
        """What an operator or an autoscaler wants to know about this replica now."""
        writes = list(self.journal_write_ms)
        journal = {"store": self.journal.name if self.journal is not None else "off", "writes": len(writes),
                   "failures": self.journal_failures,
                   "write_p50_ms": float(np.percentile(writes, 50)) if writes else None,
                   "write_p95_ms": float(np.percentile(writes, 95)) if writes else None}
        return {"active_sessions": self.active, "max_sessions": self.args.gateway.max_sessions,
                "scaling": self.scaling.summary() if self.scaling is not None else None,
                "first_audio_p95_ms": self.first_audio.p95(min_samples=1),
                "stalled_share": self.stall_ms.share_over(self.args.gateway.admission_stall_ms, min_samples=1),
                "input_lag_s": self.input_lag_s(),
                "draining": self.draining,
                "journal": journal}

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
    async def slot(self, *, opens_later: bool = False, resuming: bool = False) -> AsyncIterator[_Admission]:
        """One admitted stream (RESOURCE_EXHAUSTED at once when the replica is full). With
        ``opens_later`` the caller marks the admission ``opened`` once its session really
        started; one that never did gives its recovery slot back (see ``admit``)."""
        previous = self._last_admit
        self.admit(record=True, resuming=resuming)
        admission = _Admission(previous=previous, at=self._last_admit, opened=not opens_later)
        self.active += 1
        try:
            yield admission
        finally:
            self.active -= 1
            if not admission.opened and self._last_admit == admission.at:
                self._last_admit = admission.previous

    async def resume(self, token: str, owner: str) -> dict[str, Any]:
        """The journal entry a resume token continues, for the caller ``owner``:
        PERMISSION_DENIED for a token that is not ours or not this caller's, NOT_FOUND for an
        expired token or a session the journal no longer holds. Restores nothing by itself."""
        if self.tokens is None or self.journal is None:
            raise FailedPrecondition("this server keeps no session journal (sessions.journal is off): sessions "
                                     "cannot be resumed; start a new session")
        grant = self.tokens.check(token, owner)
        try:
            entry = await self.journal.get(grant.session_id)
        except Exception as exc:
            raise Unavailable(f"the session journal ({self.journal.name}) did not answer; retry shortly") from exc
        if entry is None or entry.get("owner") != owner or entry.get("version") != VERSION:
            raise NotFound(NO_SESSION)
        return entry

    @contextlib.asynccontextmanager
    async def session(self, settings: SessionSettings, *, owner: str = "",
                      restored: dict[str, Any] | None = None) -> AsyncIterator[Conversation]:
        """A started conversation, registered while it lives, closed (everything stopped) after.
        ``owner``: who opened it (resume tokens are bound to it); ``restored``: the journal entry
        it continues (``resume``)."""
        async with self.slot(opens_later=True, resuming=restored is not None) as admission, \
                self._conversation(settings, owner, restored) as conv:
            admission.opened = True
            yield conv

    @contextlib.asynccontextmanager
    async def _conversation(self, settings: SessionSettings, owner: str,
                            restored: dict[str, Any] | None) -> AsyncIterator[Conversation]:
        conv: Conversation | None = None
        writer: JournalWriter | None = None
        writing: asyncio.Task[None] | None = None
        try:
            info = await self.stage_info()
            await self.check_system_prompt(settings.system_prompt)
            if restored is not None:
                history = restore_history(restored)
                if settings.system_prompt:
                    history.system_prompt = settings.system_prompt
                session_id: str | None = str(restored["session_id"])
                epoch = int(restored.get("epoch", 0)) + 1  # fences off the replica it came from
                live = self.live.get(str(session_id))
                if live is not None:  # the client came back to this very replica: the old stream goes
                    await live.aclose()
            else:
                history = ChatHistory(settings.system_prompt or self.args.llm.system_prompt)
                session_id, epoch = None, 0
            conv = Conversation(self.stages, settings, history=history, info=info, observer=self.observer,
                                session_id=session_id)
            token = ""
            if self.journal is not None and self.tokens is not None:
                c, me = conv, uuid.uuid4().hex

                def state() -> dict[str, Any]:
                    return {**c.state(), "owner": owner, "epoch": epoch, "writer": me}

                writer = JournalWriter(self.journal, conv.session_id, state, self.args.sessions.ttl_s,
                                       on_write=self._journal_written)
                # before SessionStarted: its token must resume at once; for a resume, this write
                # claims the session (a second resume of the same token at once is refused)
                if not await writer.flush() and restored is not None:
                    raise (FailedPrecondition("this session was just resumed by another connection")
                           if writer.lost else Unavailable(f"the session journal ({self.journal.name}) did not "
                                                            "answer; retry shortly"))
                conv.on_change = writer.mark
                writing = asyncio.create_task(writer.run(), name=f"journal-{conv.session_id}")
                self._writers[conv] = (writer, owner)
                token = self.tokens.issue(conv.session_id, owner)
            self.live[conv.session_id] = conv
            self._moved[conv] = asyncio.Event()
            if restored is not None:
                self._moves("resumed")
            await conv.start(resume_token=token, restored=restored)
            if self.draining:  # it opened while the replica began to drain: it moves too
                self._spawn(self._move(conv, "draining"))
            yield conv
        finally:
            if writing is not None:
                writing.cancel()
            if conv is not None:
                self._moved.pop(conv, None)
                self._writers.pop(conv, None)
                await conv.aclose()
                if writer is not None:
                    # the last write runs after the stream's end, never delaying it (a frozen
                    # writer of a moved session writes nothing)
                    self._spawn(self._last_write(writer, writing))
                if self.live.get(conv.session_id) is conv:
                    self.live.pop(conv.session_id, None)
                self._recent[conv.session_id] = conv.records()
                while len(self._recent) > RECENT_SESSIONS:
                    self._recent.popitem(last=False)

    @staticmethod
    async def _last_write(writer: JournalWriter, writing: asyncio.Task[None] | None) -> None:
        if writing is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writing
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.flush(), 2.0)

    # --- drain -----------------------------------------------------------------------------------

    async def drain(self, reason: str = "draining") -> None:
        """This replica is stopping: admit no one, and move every session at its next turn
        boundary (or after ``sessions.drain_timeout_s``): its newest state is journaled, it is
        sent ``SessionMoved`` with a fresh resume token, and its adapter ends the stream."""
        self.draining = True
        if self.journal is None or not self.journal.shared:
            # no journal another replica can read: moving would only cut the calls sooner;
            # admit no one and let them run until Serve's graceful shutdown ends
            log.warning("drain: sessions are not journaled where another replica can resume them "
                        "(sessions.journal %s): they run on until the replica stops",
                        self.journal.name if self.journal is not None else "off")
            return
        moves = [self._move(conv, reason) for conv in list(self.live.values())]
        await asyncio.gather(*moves, return_exceptions=True)

    async def _move(self, conv: Conversation, reason: str) -> None:
        await conv.wait_turn_boundary(self.args.sessions.drain_timeout_s)
        journaled = self._writers.get(conv)
        token = ""
        if journaled is not None and self.tokens is not None:
            writer, owner = journaled
            for _ in range(3):  # the entry a resume continues from must be this one
                if await writer.flush():
                    break
                await asyncio.sleep(0.2)
            writer.freeze()
            token = self.tokens.issue(conv.session_id, owner)
        moved = self._moved.get(conv)
        if conv.closed or moved is None:
            return
        await conv.emit(SessionMoved(resume_token=token, reason=reason))
        moved.set()
        self._moves("moved")

    async def wait_moved(self, conv: Conversation) -> None:
        """Returns once ``conv`` was sent ``SessionMoved`` (its adapter then ends the stream)."""
        moved = self._moved.get(conv)
        if moved is None:
            await asyncio.Event().wait()  # never moves (already closing)
        else:
            await moved.wait()

    def history(self, session_id: str) -> list[dict[str, Any]] | None:
        """The recorded history of a live or recently ended session."""
        conv = self.live.get(session_id)
        return conv.records() if conv is not None else self._recent.get(session_id)

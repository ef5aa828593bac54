"""``voxserve loadtest``: simulated callers speaking to a voxserve server over real Converse streams.

Each caller dials (one gRPC channel per call), speaks cached spoken questions at real-time pace
through ``VoiceClient.converse`` (silence between turns, optional barge-ins), listens to the
answer in simulated real time, hangs up and calls again while the schedule wants it: a ramp
(1 -> N -> 0) or steps of any shape (``LoadTestConfig.schedule``), so the load can rise and fall
while autoscaling follows. Everything is measured on the client clock: voice-to-voice latency
(end of the speech in the audio sent, found by its energy, -> first answer audio received), time
to first transcript and first text, playback underruns, and errors by gRPC status code. Replica
counts per deployment, and the autoscaler's latest decision per deployment
(``deployments.autoscaling.ScalingView``: replicas wanted, load signals), are polled when this
process is (or can become) a driver of the cluster, so autoscaling shows in the summary and the
plot.

Traffic goes only to loopback addresses unless ``allow_remote`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from clients.errors import InvalidInput
from clients.loadtest_config import LoadTestConfig
from clients.loadtest_report import CallRecord, LoadTestReport, Sample, TurnRecord
from clients.stats import percentile

__all__ = [
    "ReplicaPoller", "attach_replica_poller", "caller_window", "check_address", "classify_error", "next_active",
    "run_loadtest", "target_callers",
]

#: Server errors reach TurnResult.error as "CODE: message"; anything else there is a client note
#: (e.g. a barge-in that came after the previous answer had finished), not an error.
_SERVER_ERROR = re.compile(r"^([A-Z_]+): (.*)$", re.S)


# --- pure helpers ---------------------------------------------------------------------------------


def check_address(address: str, allow_remote: bool = False) -> str:
    """``address`` if it is a loopback ``host:port`` (or any host when ``allow_remote``).

    Host names other than ``localhost`` are refused without ``allow_remote``: resolving them
    could send traffic anywhere.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"address {address!r} must be host:port, e.g. 127.0.0.1:9000 or [::1]:9000")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if allow_remote:
        return address
    if host.lower() == "localhost":
        return address
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidInput(
            f"address {address!r} is not a loopback address; the load tester only calls 127.0.0.0/8, "
            f"::1 or localhost unless --allow-remote is given (only load-test servers you own)")
    return address


def classify_error(text: str) -> tuple[str, str, str]:
    """(status code, message, note) of a TurnResult.error: "CODE: message" is a server error,
    any other text a client-side note (not an error)."""
    if (m := _SERVER_ERROR.match(text)) is not None:
        return m.group(1), m.group(2), ""
    return "", "", text


def caller_window(index: int, cfg: LoadTestConfig) -> tuple[float, float]:
    """(start, stop) seconds of caller ``index``: starts spread over the ramp-up, stops over the
    ramp-down in reverse order, so the number of active callers follows 1 -> N -> 0."""
    n = cfg.callers
    start = cfg.ramp_up_s * index / n
    stop = cfg.ramp_up_s + cfg.hold_s + cfg.ramp_down_s * (n - 1 - index) / n
    return start, max(start, stop)


def target_callers(t: float, cfg: LoadTestConfig) -> int:
    """How many callers the schedule wants active at ``t`` seconds: the step in force at ``t``
    (``cfg.schedule``), or the callers whose ramp window holds ``t``. Caller ``i`` is active
    while this is > ``i`` (both kinds keep the active callers a prefix 0..k-1)."""
    if cfg.schedule is not None:
        return next((n for ts, n in reversed(cfg.schedule) if ts <= t), 0)
    return sum(1 for i in range(cfg.callers) if (w := caller_window(i, cfg))[0] <= t < w[1])


def next_active(index: int, t: float, cfg: LoadTestConfig) -> float | None:
    """The first time >= ``t`` at which caller ``index`` is active (``t`` itself if it is now), or
    None when it never is again (the caller is done)."""
    if cfg.schedule is None:
        start, stop = caller_window(index, cfg)
        return max(t, start) if t < stop and start < stop else None
    if target_callers(t, cfg) > index:
        return t
    return next((ts for ts, n in cfg.schedule if ts > t and n > index), None)


# --- replica polling ------------------------------------------------------------------------------


class ReplicaPoller:
    """Reads RUNNING replicas per deployment from ``serve.status()``, and the autoscaler's latest
    decisions from Ray's GCS key-value store (blocking; call in a thread)."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.scaling_note = ""
        """Why the autoscaler's decisions are not read ("" while they are, or not tried yet)."""
        self._view: Any = None
        self._no_view = False

    def poll(self) -> dict[str, int] | None:
        from ray import serve
        from ray.serve._private.common import ReplicaState

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return None
        return {name: int(d.replica_states.get(ReplicaState.RUNNING, 0)) for name, d in app.deployments.items()}

    def poll_scaling(self, deployments: Iterable[str]) -> dict[str, dict[str, Any]] | None:
        """The autoscaler's fresh decision per deployment (``ScalingView.summary()``: running,
        target, desired, max, signals; plus ``demands``, the replicas each signal asks for), or
        None when none was published lately (or it cannot be read: see ``scaling_note``)."""
        names = tuple(sorted(deployments))
        if self._no_view or not names:
            return None
        if self._view is None or self._view.deployments != names:
            try:
                from deployments.autoscaling import ScalingView
            except ImportError as exc:  # a load tester without the server's package: replicas only
                self._no_view = True
                self.scaling_note = f"autoscaler decisions not read: {type(exc).__name__}: {exc}"[:300]
                return None
            self._view = ScalingView(self.app_name, names)
        try:
            records = self._view.refresh()
            summary: dict[str, dict[str, Any]] = self._view.summary()
        except Exception as exc:  # a GCS hiccup, a record of another version: this sample has none
            self.scaling_note = f"autoscaler decisions not read: {type(exc).__name__}: {exc}"[:300]
            return None
        if not summary:
            self.scaling_note = (f"the autoscaler published no fresh decisions for {self.app_name!r} (not a "
                                 f"VoicePolicy deployment, or its controller is not publishing)")
            return None
        self.scaling_note = ""
        for name, entry in summary.items():
            entry["demands"] = dict(records.get(name, {}).get("demands") or {})
        return summary

    def sample(self) -> tuple[dict[str, int] | None, dict[str, dict[str, Any]] | None]:
        """(RUNNING replicas per deployment, the autoscaler's decisions) now."""
        replicas = self.poll()
        return replicas, (self.poll_scaling(replicas) if replicas else None)


def _serve_grpc_port() -> int | None:
    """gRPC port of the Serve instance this process is connected to (None if unknown)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return None
        details = client.get_serve_details()
        return int((details.get("grpc_options") or {}).get("port") or 0) or None
    except Exception:  # private API: an unknown port only skips the cross-check
        return None


def attach_replica_poller(mode: str, app_name: str, address: str | None = None) -> tuple[ReplicaPoller | None, str]:
    """A poller if Serve's status can be read from this process, else None and the reason.

    With ``address``, the cluster found must serve gRPC on that address's port: on a shared
    machine ``ray.init(address="auto")`` may find another user's (more recent) cluster.
    """
    if mode == "off":
        return None, "replica polling is off"
    try:
        import ray
    except ImportError:
        return None, "ray is not installed in this process"
    attached_here = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            ray.init(address="auto" if mode == "auto" else mode, log_to_driver=False, logging_level=logging.ERROR)
            attached_here = True
        except Exception as exc:  # ConnectionError and friends: no cluster to attach to
            return None, f"no Ray cluster to read replicas from ({type(exc).__name__}: {exc})"[:300]

    def give_up(note: str) -> tuple[None, str]:
        if attached_here:
            ray.shutdown()
        return None, note

    poller = ReplicaPoller(app_name)
    try:
        if poller.poll() is None:
            return give_up(f"Serve has no application named {app_name!r} in the Ray cluster found")
    except Exception as exc:
        return give_up(f"cannot read serve.status(): {type(exc).__name__}: {exc}"[:300])
    port = _serve_grpc_port()
    wanted = int(address.rpartition(":")[2]) if address else None
    if port is not None and wanted is not None and port != wanted:
        return give_up(f"the Ray cluster found serves gRPC on port {port}, not {wanted}: "
                       f"give --ray-address of the cluster behind {address}")
    return poller, f"polled from serve.status() every sample ({app_name})"


# --- the run --------------------------------------------------------------------------------------


class _Live:
    """Counters shared by callers, the sampler and the progress line."""

    def __init__(self) -> None:
        self.active = 0
        self.turns_done = 0
        self.errors = 0
        self.v2v: list[float] = []
        self.replicas: dict[str, int] | None = None
        self.scaling: dict[str, dict[str, Any]] | None = None


def _plan_turns(cfg: LoadTestConfig, questions: list[Any], rng: random.Random) -> list[tuple[Any, float | None]]:
    """(question, barge_in_after_ms or None) for each turn of one call."""
    picks = rng.sample(questions, k=min(cfg.turns_per_call, len(questions)))
    while len(picks) < cfg.turns_per_call:
        picks.append(rng.choice(questions))
    plan: list[tuple[Any, float | None]] = []
    for i, q in enumerate(picks):
        barge = i > 0 and rng.random() < cfg.barge_in_rate
        plan.append((q, rng.uniform(*cfg.barge_in_after_ms) if barge else None))
    return plan


async def _one_call(cfg: LoadTestConfig, caller: int, call: int, questions: list[Any], rng: random.Random,
                    t0: float, report: LoadTestReport, live: _Live) -> None:
    from clients.resume import converse_resuming
    from clients.voice_client import UserTurn, VoiceClient
    from protos.voxserve.v1 import voice_pb2 as pb

    plan = _plan_turns(cfg, questions, rng)
    turns = [UserTurn(audio=q.audio, label=q.text, barge_in_after_ms=b) for q, b in plan]
    rec = CallRecord(caller, call, time.monotonic() - t0, 0.0, "CUT", turns_planned=len(turns))
    report.calls.append(rec)
    session_cfg = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=questions[0].sample_rate,
                                   language=cfg.language)

    def on_event(event: Any) -> None:
        kind = event.WhichOneof("event")
        if kind in ("response_done", "response_interrupted"):
            live.turns_done += 1
        elif kind == "error":
            live.errors += 1

    client = VoiceClient(cfg.address)
    live.active += 1
    try:
        if cfg.resume:
            result, resumed = await converse_resuming(client, turns, session_cfg, pause_ms=1000 * cfg.pause_s,
                                                      turn_timeout_s=cfg.turn_timeout_s, on_event=on_event,
                                                      chunk_ms=cfg.chunk_ms)
            rec.resumes, rec.resume_ms, rec.turns_lost, rec.lost = (
                resumed.resumes, resumed.resume_ms, resumed.turns_lost, resumed.lost)
            rec.answered_twice = result.extra_answers
        else:
            result = await client.converse(turns, session_cfg, pause_ms=1000 * cfg.pause_s,
                                           turn_timeout_s=cfg.turn_timeout_s, on_event=on_event,
                                           chunk_ms=cfg.chunk_ms)
    except asyncio.CancelledError:
        rec.t_end_s = time.monotonic() - t0
        rec.details = "cut by max_duration_s"
        raise
    except Exception as exc:  # a client-side failure is a result, not a crash of the whole test
        rec.status, rec.details, rec.t_end_s = "CLIENT_ERROR", f"{type(exc).__name__}: {exc}", time.monotonic() - t0
        live.errors += 1
        return
    finally:
        live.active -= 1
        with contextlib.suppress(Exception):
            await client.close()
    rec.t_end_s = time.monotonic() - t0
    rec.status, rec.details, rec.turns_done = result.status, result.details, len(result.turns)
    rec.admitted = bool(result.session_id or result.t_started)
    if result.status != "OK":
        live.errors += 1
    for i, (tr, (q, barge)) in enumerate(zip(result.turns, plan, strict=False)):
        code, err, note = classify_error(tr.error)
        if tr.restored:  # answered by the server after a resume: no voice-to-voice time of its own
            tr.voice_to_voice_ms = None
        answered = tr.voice_to_voice_ms is not None or (tr.restored and tr.answered)
        if not answered and not code:
            code, err = "NO_ANSWER", f"no answer audio within {cfg.turn_timeout_s:.0f} s"
        report.turns.append(TurnRecord(
            # a turn never spoken (a refused or lost call) is placed at the call's end
            caller=caller, call=call, turn=i, question=q.text,
            t_s=tr.t_speech_end - t0 if tr.t_speech_end else rec.t_end_s,
            barge_in=barge is not None, answered=answered, interrupted=tr.interrupted,
            voice_to_voice_ms=tr.voice_to_voice_ms, first_transcript_ms=tr.first_transcript_ms,
            first_text_ms=tr.first_text_ms, underrun_ms=tr.underrun_ms, underruns=tr.underruns,
            audio_ms=tr.audio_ms, transcript=tr.transcript, response_text=tr.response_text,
            speculative=tr.speculative, paused=tr.paused, resumed=tr.resumed, early_answers=tr.early_answers,
            error_code=code, error=err, note=note, server_latency=dict(tr.server_latency)))
        if tr.voice_to_voice_ms is not None:
            live.v2v.append(tr.voice_to_voice_ms)


async def _caller(cfg: LoadTestConfig, index: int, questions: list[Any], t0: float,
                  report: LoadTestReport, live: _Live) -> None:
    """Caller ``index``: calls while the schedule wants it (a call in progress finishes its turns),
    idles while it does not, and returns when it never will again (or after ``calls_per_caller``)."""
    rng = random.Random(cfg.seed * 1000 + index)
    call = 0
    while True:
        at = next_active(index, time.monotonic() - t0, cfg)
        if at is None:
            if call:
                return
            at = 0.0  # every caller makes at least one call (a ramp without a hold: one call each)
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        await _one_call(cfg, index, call, questions, rng, t0, report, live)
        call += 1
        if cfg.calls_per_caller and call >= cfg.calls_per_caller:
            return
        # jitter keeps redialing callers from falling into lockstep
        pause = cfg.pause_s * rng.uniform(0.5, 1.5)
        if next_active(index, time.monotonic() - t0 + pause, cfg) is None:
            return
        await asyncio.sleep(pause)


def _progress_line(elapsed: float, live: _Live, cfg: LoadTestConfig, target: int) -> str:
    p50, p95 = percentile(live.v2v, 50), percentile(live.v2v, 95)
    lat = f"v2v p50 {p50:.0f} p95 {p95:.0f} ms" if p50 is not None and p95 is not None else "v2v -"
    scaling = live.scaling or {}

    def wanted(dep: str, running: int) -> str:
        d = scaling.get(dep)
        more = max(d.get("target", running), d.get("desired", running)) if d is not None else running
        return f"->{more}" if more != running else ""

    reps = " ".join(f"{k}={v}{wanted(k, v)}" for k, v in sorted((live.replicas or {}).items()))
    return (f"[{elapsed:6.1f}s] callers {live.active}/{target} (peak {cfg.callers}) | answers {live.turns_done} | "
            f"errors {live.errors} | {lat}" + (f" | replicas {reps}" if reps else ""))


async def run_loadtest(cfg: LoadTestConfig, *, questions: list[Any] | None = None,
                       on_sample: Callable[[Sample], None] | None = None) -> LoadTestReport:
    """Run the test described by ``cfg`` and return every turn, call and timeline sample.

    ``questions`` (``clients.speech_cache.SpokenQuestion``) default to ``cfg.questions`` spoken
    by Piper (cached). Raises InvalidInput (a ValueError) for a non-loopback address without allow_remote.
    """
    check_address(cfg.address, cfg.allow_remote)
    if questions is None:
        from clients.speech_cache import QUESTIONS, load_questions

        questions = await asyncio.to_thread(load_questions, tuple(cfg.questions or QUESTIONS))
    if not questions:
        raise InvalidInput("no questions to ask")
    poller, note = await asyncio.to_thread(attach_replica_poller, cfg.replicas, cfg.app_name, cfg.address)
    report = LoadTestReport(config=cfg.to_dict(), replica_note=note,
                            started_at=datetime.now(UTC).isoformat(timespec="seconds"))
    live = _Live()
    t0 = time.monotonic()
    tty = cfg.progress and sys.stderr.isatty()
    stop_sampling = asyncio.Event()

    async def sampler() -> None:
        last_print = -1e9
        while True:
            now = time.monotonic() - t0
            if poller is not None:
                try:
                    live.replicas, live.scaling = await asyncio.to_thread(poller.sample)
                except Exception as exc:  # the cluster went away mid-test: keep measuring the load
                    report.replica_note = f"replica polling stopped at {now:.0f} s: {type(exc).__name__}"
                    live.replicas = live.scaling = None
            target = target_callers(now, cfg)
            sample = Sample(now, live.active, target, live.turns_done,
                            dict(live.replicas) if live.replicas is not None else None, live.scaling)
            report.timeline.append(sample)
            if on_sample is not None:
                on_sample(sample)
            if cfg.progress and (tty or now - last_print >= 5.0):
                line = _progress_line(now, live, cfg, target)
                print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
                last_print = now
            if stop_sampling.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), cfg.sample_interval_s)

    sampling = asyncio.create_task(sampler())
    callers = [asyncio.create_task(_caller(cfg, i, questions, t0, report, live)) for i in range(cfg.callers)]
    try:
        done, pending = await asyncio.wait(callers, timeout=cfg.max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the caller loop itself must not pass silently
        if cfg.cooldown_s:
            await asyncio.sleep(cfg.cooldown_s)
    finally:
        for task in callers:
            task.cancel()
        stop_sampling.set()
        await sampling
        if tty:
            print(file=sys.stderr)
    report.duration_s = time.monotonic() - t0
    if poller is not None:
        got = sum(s.scaling is not None for s in report.timeline)
        report.scaling_note = (f"read from Ray's GCS key-value store ({got} of {len(report.timeline)} samples)" if got
                               else poller.scaling_note or "no autoscaler decisions were read")
    report.turns.sort(key=lambda t: t.t_s)
    report.calls.sort(key=lambda c: c.t_start_s)
    return report

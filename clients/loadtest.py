"""``voxserve loadtest``: simulated callers speaking to a voxserve server over real Converse streams.

Each caller dials (one gRPC channel per call), speaks cached spoken questions at real-time pace
through ``VoiceClient.converse`` (silence between turns, optional barge-ins), listens to the
answer in simulated real time, hangs up and calls again until its slot in the ramp schedule
ends. Everything is measured on the client clock: voice-to-voice latency (end of the speech in the
audio sent, found by its energy, -> first answer audio received), time to first transcript and
first text, playback underruns, and errors by gRPC status code. Replica counts per deployment
are polled from Serve when this process is (or can become) a driver of the cluster, so
autoscaling shows in the plot.

Traffic goes only to loopback addresses unless ``allow_remote`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clients.errors import InvalidInput, MissingPackage
from clients.loadtest_config import InvalidLoadTestConfig, LoadTestConfig, add_parser, config_from_args

__all__ = [
    "CallRecord", "InvalidLoadTestConfig", "LoadTestConfig", "LoadTestReport", "Sample", "TurnRecord",
    "add_parser", "caller_window", "check_address", "classify_error", "cmd_loadtest", "config_from_args",
    "percentile", "plot", "run_loadtest", "summarize", "summary_dict", "target_callers", "write_outputs",
]

#: Percentiles reported in the summary.
PERCENTILES = (50, 95, 99)
#: Client-measured per-turn metrics summarized (all in ms).
CLIENT_METRICS = ("voice_to_voice_ms", "first_transcript_ms", "first_text_ms", "underrun_ms")
#: Server-measured latency parts (ResponseDone.latency) summarized beside them.
SERVER_METRICS = ("vad_end_delay_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms")
#: Server errors reach TurnResult.error as "CODE: message"; anything else there is a client note
#: (e.g. a barge-in that came after the previous answer had finished), not an error.
_SERVER_ERROR = re.compile(r"^([A-Z_]+): (.*)$", re.S)


# --- records --------------------------------------------------------------------------------------


@dataclass
class TurnRecord:
    """One spoken turn as the caller experienced it (times in ms, ``t_s`` from the test start)."""

    caller: int
    call: int
    turn: int
    question: str
    t_s: float  # when the end of the speech was sent
    barge_in: bool = False
    answered: bool = False
    interrupted: bool = False
    speculative: bool = False  # the server started the answer before the turn was over (TurnLatency)
    paused: int = 0  # times the answer was paused by speech over it (ResponsePaused)
    resumed: int = 0  # times it resumed after noise or a backchannel (ResponseResumed)
    early_answers: int = 0  # answers to part of the turn, cut by the rest of it (a false end of turn)
    voice_to_voice_ms: float | None = None
    first_transcript_ms: float | None = None
    first_text_ms: float | None = None
    underrun_ms: float = 0.0
    underruns: int = 0
    audio_ms: float = 0.0
    transcript: str = ""
    response_text: str = ""
    error_code: str = ""
    error: str = ""
    note: str = ""
    server_latency: dict[str, float] = field(default_factory=dict)


@dataclass
class CallRecord:
    """One Converse stream: its final gRPC status and how many of its turns were spoken."""

    caller: int
    call: int
    t_start_s: float
    t_end_s: float
    status: str  # gRPC status name, or CUT (stopped by max_duration_s) / CLIENT_ERROR
    details: str = ""
    turns_planned: int = 0
    turns_done: int = 0


@dataclass
class Sample:
    """The test's state at one moment: active calls, the schedule's target, replicas per deployment."""

    t_s: float
    active_calls: int
    target_callers: int
    turns_done: int
    replicas: dict[str, int] | None = None


@dataclass
class LoadTestReport:
    config: dict[str, Any]
    started_at: str
    duration_s: float = 0.0
    turns: list[TurnRecord] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    timeline: list[Sample] = field(default_factory=list)
    replica_note: str = ""

    def errors(self) -> dict[str, int]:
        """Errors by status code: failed streams, error events in turns, and unanswered turns."""
        counts: Counter[str] = Counter()
        for c in self.calls:
            if c.status not in ("OK", "CUT"):
                counts[c.status] += 1
        for t in self.turns:
            if t.error_code:
                counts[t.error_code] += 1
        return dict(sorted(counts.items()))

    def unanswered(self) -> int:
        """Turns spoken (or planned in an uncut call) that got no answer audio."""
        spoken = sum(1 for t in self.turns if not t.answered)
        never_spoken = sum(c.turns_planned - c.turns_done for c in self.calls if c.status != "CUT")
        return spoken + never_spoken

    @property
    def ok(self) -> bool:
        """Every turn answered, no errors, and no call cut by the time bound."""
        return (bool(self.turns) and not self.errors() and self.unanswered() == 0
                and all(c.status == "OK" for c in self.calls))

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "started_at": self.started_at, "duration_s": self.duration_s,
            "replica_note": self.replica_note, "summary": summary_dict(self),
            "turns": [asdict(t) for t in self.turns], "calls": [asdict(c) for c in self.calls],
            "timeline": [asdict(s) for s in self.timeline],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadTestReport:
        return cls(config=d["config"], started_at=d["started_at"], duration_s=d["duration_s"],
                   turns=[TurnRecord(**t) for t in d["turns"]], calls=[CallRecord(**c) for c in d["calls"]],
                   timeline=[Sample(**s) for s in d["timeline"]], replica_note=d.get("replica_note", ""))


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise InvalidInput(f"percentile {q} is outside [0, 100]")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def caller_window(index: int, cfg: LoadTestConfig) -> tuple[float, float]:
    """(start, stop) seconds of caller ``index``: starts spread over the ramp-up, stops over the
    ramp-down in reverse order, so the number of active callers follows 1 -> N -> 0."""
    n = cfg.callers
    start = cfg.ramp_up_s * index / n
    stop = cfg.ramp_up_s + cfg.hold_s + cfg.ramp_down_s * (n - 1 - index) / n
    return start, max(start, stop)


def target_callers(t: float, cfg: LoadTestConfig) -> int:
    """How many callers the schedule wants active at ``t`` seconds."""
    return sum(1 for i in range(cfg.callers) if (w := caller_window(i, cfg))[0] <= t < w[1])


def _stats(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"n": float(len(values))}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["max"] = max(values) if values else None
    return out


def summary_dict(report: LoadTestReport) -> dict[str, Any]:
    """Counts and p50/p95/p99 of every client metric and server latency part."""
    turns = report.turns
    metrics: dict[str, Any] = {}
    for name in CLIENT_METRICS:
        metrics[name] = _stats([v for t in turns if (v := getattr(t, name)) is not None
                                and (name != "underrun_ms" or t.answered)])
    for name in SERVER_METRICS:
        metrics[f"server_{name}"] = _stats([t.server_latency[name] for t in turns if name in t.server_latency])
    peak = max((s.active_calls for s in report.timeline), default=0)
    replicas_max: dict[str, int] = {}
    for s in report.timeline:
        for dep, n in (s.replicas or {}).items():
            replicas_max[dep] = max(replicas_max.get(dep, 0), n)
    return {
        "calls": len(report.calls), "calls_cut": sum(c.status == "CUT" for c in report.calls),
        "turns": len(turns), "answered": sum(t.answered for t in turns),
        "unanswered": report.unanswered(), "interrupted": sum(t.interrupted for t in turns),
        "barge_ins": sum(t.barge_in for t in turns), "underrun_turns": sum(t.underruns > 0 for t in turns),
        "speculative": sum(t.speculative for t in turns), "paused": sum(t.paused for t in turns),
        "resumed": sum(t.resumed for t in turns), "early_answers": sum(t.early_answers for t in turns),
        "errors": report.errors(), "notes": dict(Counter(t.note for t in turns if t.note)),
        "peak_active_calls": peak, "max_replicas": replicas_max,
        "duration_s": report.duration_s, "ok": report.ok, "metrics": metrics,
    }


def summarize(report: LoadTestReport, markdown: bool = False) -> str:
    """A table of p50/p95/p99/max per metric, and the counts (plain text or markdown)."""
    s = summary_dict(report)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    header = ["metric (ms)", "n", *(f"p{q}" for q in PERCENTILES), "max"]
    rows = [[name, str(int(st["n"])), *(fmt(st[f"p{q}"]) for q in PERCENTILES), fmt(st["max"])]
            for name, st in s["metrics"].items() if st["n"]]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
        lines = ["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
                 for r in [header, *rows]]
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    replicas = ", ".join(f"{k} {v}" for k, v in s["max_replicas"].items()) or (report.replica_note or "not recorded")
    counts = (f"calls {s['calls']} (cut {s['calls_cut']}), turns {s['turns']}, answered {s['answered']}, "
              f"unanswered {s['unanswered']}, barge-ins {s['barge_ins']}, interrupted answers "
              f"{s['interrupted']}, turns with underruns {s['underrun_turns']}, speculative answers "
              f"{s['speculative']}, paused/resumed {s['paused']}/{s['resumed']}, early answers "
              f"{s['early_answers']}, peak active calls {s['peak_active_calls']}, duration {s['duration_s']:.0f} s")
    sep = "\n\n" if markdown else "\n"
    parts = ["\n".join(lines), counts, f"errors: {errors}"]
    if s["notes"]:
        parts.append("notes: " + ", ".join(f"{k} ({v})" for k, v in s["notes"].items()))
    return sep.join([*parts, f"max replicas: {replicas}"])


# --- plot -----------------------------------------------------------------------------------------


def rolling_p95(report: LoadTestReport, window_s: float = 15.0) -> list[tuple[float, float]]:
    """(t, p95 voice-to-voice of the turns in the last ``window_s``) at each timeline sample."""
    pts = [(t.t_s, t.voice_to_voice_ms) for t in report.turns if t.voice_to_voice_ms is not None]
    out = []
    for s in report.timeline:
        vals = [v for (t, v) in pts if s.t_s - window_s < t <= s.t_s]
        p = percentile(vals, 95)
        if p is not None:
            out.append((s.t_s, p))
    return out


def plot(report: LoadTestReport, path: str | Path, target_ms: float | None = 1500.0) -> Path:
    """PNG: voice-to-voice latency per turn, active calls, and replicas per deployment over time."""
    try:
        import matplotlib
    except ImportError as exc:  # a dev/bench dependency, not needed to run the load itself
        raise MissingPackage("the plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1.3, 1.3]})
    normal = [(t.t_s, t.voice_to_voice_ms) for t in report.turns
              if t.voice_to_voice_ms is not None and not t.barge_in]
    barge = [(t.t_s, t.voice_to_voice_ms) for t in report.turns if t.voice_to_voice_ms is not None and t.barge_in]
    if normal:
        ax1.scatter(*zip(*normal, strict=True), s=14, alpha=0.6, label="turn")
    if barge:
        ax1.scatter(*zip(*barge, strict=True), s=20, marker="x", label="barge-in turn")
    roll = rolling_p95(report)
    if roll:
        ax1.plot(*zip(*roll, strict=True), color="C3", label="p95 (15 s window)")
    if target_ms:
        ax1.axhline(target_ms, color="gray", ls="--", lw=1, label=f"{target_ms:.0f} ms")
    failed = [t.t_s for t in report.turns if not t.answered]
    if failed:
        ax1.scatter(failed, [0] * len(failed), marker="v", color="k", label="no answer")
    ax1.set_ylabel("voice-to-voice (ms)")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.grid(alpha=0.3)
    ts = [s.t_s for s in report.timeline]
    ax2.step(ts, [s.active_calls for s in report.timeline], where="post", label="active calls")
    ax2.step(ts, [s.target_callers for s in report.timeline], where="post", ls="--", label="schedule")
    ax2.set_ylabel("callers")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.grid(alpha=0.3)
    deps = sorted({d for s in report.timeline for d in (s.replicas or {})})
    for i, dep in enumerate(deps):
        pts = [(s.t_s, s.replicas[dep]) for s in report.timeline if s.replicas and dep in s.replicas]
        # a small offset per deployment keeps equal counts from hiding each other
        ax3.step([p[0] for p in pts], [p[1] + 0.04 * i for p in pts], where="post", label=dep)
    if deps:
        top = max(n for s in report.timeline for n in (s.replicas or {}).values())
        ax3.set_ylim(0, top + 1)
        ax3.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax3.legend(loc="lower left", fontsize=8, ncol=len(deps))
    else:
        ax3.text(0.5, 0.5, f"replica counts not recorded: {report.replica_note}", ha="center",
                 va="center", transform=ax3.transAxes, fontsize=8, wrap=True)
    ax3.set_ylabel("replicas")
    ax3.set_xlabel("time since start (s)")
    ax3.grid(alpha=0.3)
    s = summary_dict(report)
    v2v = s["metrics"]["voice_to_voice_ms"]
    p50, p95 = v2v["p50"], v2v["p95"]
    title = (f"voxserve load test: {report.config.get('callers')} callers, {s['turns']} turns, "
             f"p50 {p50 or 0:.0f} ms, p95 {p95 or 0:.0f} ms, errors {sum(s['errors'].values())}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: LoadTestReport, out_dir: str | Path, plot_png: bool = True) -> dict[str, Path]:
    """``loadtest.json`` (every turn, call and sample), ``summary.md`` and ``loadtest.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "loadtest.json", "summary": out / "summary.md"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1))
    paths["summary"].write_text(summarize(report, markdown=True) + "\n")
    if plot_png:
        paths["png"] = plot(report, out / "loadtest.png")
    return paths


# --- replica polling ------------------------------------------------------------------------------


class ReplicaPoller:
    """Reads RUNNING replicas per deployment from ``serve.status()`` (blocking; call in a thread)."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name

    def poll(self) -> dict[str, int] | None:
        from ray import serve
        from ray.serve._private.common import ReplicaState

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return None
        return {name: int(d.replica_states.get(ReplicaState.RUNNING, 0)) for name, d in app.deployments.items()}


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
        result = await client.converse(turns, session_cfg, pause_ms=1000 * cfg.pause_s,
                                       turn_timeout_s=cfg.turn_timeout_s, on_event=on_event)
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
    if result.status != "OK":
        live.errors += 1
    for i, (tr, (q, barge)) in enumerate(zip(result.turns, plan, strict=False)):
        code, err, note = classify_error(tr.error)
        answered = tr.voice_to_voice_ms is not None
        if not answered and not code:
            code, err = "NO_ANSWER", f"no answer audio within {cfg.turn_timeout_s:.0f} s"
        report.turns.append(TurnRecord(
            caller=caller, call=call, turn=i, question=q.text, t_s=tr.t_speech_end - t0,
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
    rng = random.Random(cfg.seed * 1000 + index)
    start, stop = caller_window(index, cfg)
    await asyncio.sleep(max(0.0, t0 + start - time.monotonic()))
    call = 0
    while True:
        await _one_call(cfg, index, call, questions, rng, t0, report, live)
        call += 1
        if cfg.calls_per_caller and call >= cfg.calls_per_caller:
            return
        # jitter keeps redialing callers from falling into lockstep
        pause = cfg.pause_s * rng.uniform(0.5, 1.5)
        if time.monotonic() - t0 + pause >= stop:
            return
        await asyncio.sleep(pause)


def _progress_line(elapsed: float, live: _Live, cfg: LoadTestConfig, target: int) -> str:
    p50, p95 = percentile(live.v2v, 50), percentile(live.v2v, 95)
    lat = f"v2v p50 {p50:.0f} p95 {p95:.0f} ms" if p50 is not None and p95 is not None else "v2v -"
    reps = " ".join(f"{k}={v}" for k, v in sorted((live.replicas or {}).items()))
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
                    live.replicas = await asyncio.to_thread(poller.poll)
                except Exception as exc:  # the cluster went away mid-test: keep measuring the load
                    report.replica_note = f"replica polling stopped at {now:.0f} s: {type(exc).__name__}"
                    live.replicas = None
            target = target_callers(now, cfg)
            sample = Sample(now, live.active, target, live.turns_done,
                            dict(live.replicas) if live.replicas is not None else None)
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
    report.turns.sort(key=lambda t: t.t_s)
    report.calls.sort(key=lambda c: c.t_start_s)
    return report


# --- command line ---------------------------------------------------------------------------------


def cmd_loadtest(args: argparse.Namespace) -> int:
    """Handler of ``voxserve loadtest``: 0 when every turn was answered without errors."""
    try:
        cfg = config_from_args(args)
        check_address(cfg.address, cfg.allow_remote)
    except InvalidInput as exc:
        print(f"voxserve loadtest: {exc}", file=sys.stderr)
        return 2
    print(f"voxserve loadtest: {cfg.callers} callers against {cfg.address} (ramp {cfg.ramp_up_s:.0f} s, "
          f"hold {cfg.hold_s:.0f} s, ramp down {cfg.ramp_down_s:.0f} s, at most {cfg.max_duration_s:.0f} s)",
          file=sys.stderr, flush=True)
    report = asyncio.run(run_loadtest(cfg))
    print(summarize(report))
    if cfg.out_dir:
        try:
            paths = write_outputs(report, cfg.out_dir, plot_png=not args.no_plot)
        except MissingPackage as exc:  # no matplotlib: keep the measurements anyway
            print(f"voxserve loadtest: no plot: {exc}", file=sys.stderr)
            paths = write_outputs(report, cfg.out_dir, plot_png=False)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.ok else 1

"""What a ``voxserve loadtest`` run measured, and how it is reported: the records of every turn,
call and timeline sample (``LoadTestReport``), the p50/p95/p99 summary with a row per phase of
the schedule (plain text or markdown), the PNG plot, and the files written to ``--out``.

Standard library only at import time; the plot imports matplotlib when it is drawn.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clients.errors import MissingPackage
from clients.loadtest_config import LoadTestConfig
from clients.stats import percentile

__all__ = [
    "CLIENT_METRICS", "PERCENTILES", "REFUSALS", "SERVER_METRICS", "CallRecord", "LoadTestReport", "Sample",
    "TurnRecord", "call_cut", "call_refused", "phase_summary", "plot", "refused_and_cut", "rolling_p95", "summarize",
    "summary_dict", "write_outputs",
]

#: Percentiles reported in the summary.
PERCENTILES = (50, 95, 99)
#: Client-measured per-turn metrics summarized (all in ms).
CLIENT_METRICS = ("voice_to_voice_ms", "first_transcript_ms", "first_text_ms", "underrun_ms")
#: Server-measured latency parts (ResponseDone.latency) summarized beside them.
SERVER_METRICS = ("vad_end_delay_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms")
#: Statuses of a call the server turned away before its session started (admission control).
REFUSALS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")
#: Refusals closer together than this are one span in the summary.
REFUSAL_GAP_S = 5.0
#: Deployments in pipeline order (others follow, sorted), and their colour in the plot.
STAGES = ("VAD", "ASR", "LLM", "TTS", "Gateway")
_COLOURS = {"VAD": "C0", "ASR": "C1", "LLM": "C2", "TTS": "C4", "Gateway": "C5"}


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
    resumes: int = 0  # times the call was resumed with its token (after a break or SessionMoved)
    resume_ms: list[float] = field(default_factory=list)  # break -> resumed SessionStarted, each resume
    turns_lost: int = 0  # turns that never got their answer across resumes
    answered_twice: int = 0  # answers that came for a turn already answered
    lost: bool = False  # the call could not be continued
    admitted: bool | None = None  # its session started (SessionStarted came); None: unknown (older reports)


@dataclass
class Sample:
    """The test's state at one moment: active calls, the schedule's target, RUNNING replicas per
    deployment, and the autoscaler's latest decision per deployment (``running``, ``target``,
    ``desired`` and ``max`` replicas, ``signals``, and ``demands``: replicas each signal asks for)."""

    t_s: float
    active_calls: int
    target_callers: int
    turns_done: int
    replicas: dict[str, int] | None = None
    scaling: dict[str, dict[str, Any]] | None = None


@dataclass
class LoadTestReport:
    config: dict[str, Any]
    started_at: str
    duration_s: float = 0.0
    turns: list[TurnRecord] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    timeline: list[Sample] = field(default_factory=list)
    replica_note: str = ""
    scaling_note: str = ""  # how the autoscaler's decisions were read, or why not

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
            "replica_note": self.replica_note, "scaling_note": self.scaling_note, "summary": summary_dict(self),
            "turns": [asdict(t) for t in self.turns], "calls": [asdict(c) for c in self.calls],
            "timeline": [asdict(s) for s in self.timeline],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadTestReport:
        return cls(config=d["config"], started_at=d["started_at"], duration_s=d["duration_s"],
                   turns=[TurnRecord(**t) for t in d["turns"]], calls=[CallRecord(**c) for c in d["calls"]],
                   timeline=[Sample(**s) for s in d["timeline"]], replica_note=d.get("replica_note", ""),
                   scaling_note=d.get("scaling_note", ""))


# --- summary --------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"n": float(len(values))}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["max"] = max(values) if values else None
    return out


def call_refused(call: CallRecord, answered: bool = False) -> bool:
    """The server turned the call away before its session started (RESOURCE_EXHAUSTED or
    UNAVAILABLE). Older reports do not say whether the session started: there, a call without
    resumes and without an ``answered`` turn counts."""
    if call.status not in REFUSALS:
        return False
    if call.admitted is not None:
        return not call.admitted
    return call.resumes == 0 and not answered


def call_cut(call: CallRecord, refused: bool = False) -> bool:
    """Admitted, then ended by the server side: its session was lost, or it ended with a non-OK
    status that is not a refusal (replicas removed by a scale-down, or failing). Calls the test
    itself stopped (CUT by max_duration_s) or that failed in the client do not count."""
    if refused or call.admitted is False or call.status in ("CUT", "CLIENT_ERROR"):
        return False
    return call.lost or call.status != "OK"


def _stage_order(names: Any) -> list[str]:
    return sorted(set(names), key=lambda n: (STAGES.index(n) if n in STAGES else len(STAGES), n))


def _phases(report: LoadTestReport) -> list[tuple[str, float, float, str]]:
    """(name, start_s, end_s, callers wanted) of the report's phases; the last one ends with the test."""
    try:
        phases = LoadTestConfig(**report.config).phases()
    except (TypeError, ValueError):  # a config of another version: one phase
        phases = [("whole test", 0.0, None, str(report.config.get("callers", "?")))]
    return [(name, start, end if end is not None else max(report.duration_s, start), wanted)
            for name, start, end, wanted in phases]


def _refusal_spans(times: list[float]) -> list[list[float]]:
    """[first_s, last_s, count] of each run of refusals less than REFUSAL_GAP_S apart."""
    spans: list[list[float]] = []
    for t in sorted(times):
        if spans and t - spans[-1][1] < REFUSAL_GAP_S:
            spans[-1][1] = t
            spans[-1][2] += 1
        else:
            spans.append([t, t, 1])
    return [[round(a, 1), round(b, 1), int(n)] for a, b, n in spans]


def refused_and_cut(report: LoadTestReport) -> tuple[list[CallRecord], list[CallRecord]]:
    """The calls refused at session start, and the calls cut (``call_refused``, ``call_cut``)."""
    answered_calls = {(t.caller, t.call) for t in report.turns if t.answered}
    refused = [c for c in report.calls if call_refused(c, (c.caller, c.call) in answered_calls)]
    refused_ids = {id(c) for c in refused}
    return refused, [c for c in report.calls if call_cut(c, id(c) in refused_ids)]


def phase_summary(report: LoadTestReport) -> dict[str, Any]:
    """Per phase of the schedule (each step, or ramp-up/hold/ramp-down, then the cooldown): callers
    wanted, calls started (dialled, refusals included; by start time), calls refused at session
    start, calls cut (by end time), p50/p95 voice-to-voice of admitted calls' turns (by the end of
    their speech) and the most RUNNING replicas per deployment. Also every refusal and cut call."""
    phases = _phases(report)
    starts = [p[1] for p in phases]

    def index(t: float) -> int:
        return max(0, bisect.bisect_right(starts, t) - 1)

    refused_calls, cut = refused_and_cut(report)
    refused = {id(c) for c in refused_calls}
    refused_keys = {(c.caller, c.call) for c in refused_calls}
    rows: list[dict[str, Any]] = [
        {"phase": name, "start_s": start, "end_s": end, "wanted": wanted, "calls_started": 0, "calls_refused": 0,
         "calls_cut": 0, "v2v": [], "max_replicas": {}} for name, start, end, wanted in phases]
    for c in report.calls:
        rows[index(c.t_start_s)]["calls_started"] += 1
        if id(c) in refused:
            rows[index(c.t_start_s)]["calls_refused"] += 1
    for c in cut:
        rows[index(c.t_end_s)]["calls_cut"] += 1
    for t in report.turns:
        if t.voice_to_voice_ms is not None and (t.caller, t.call) not in refused_keys:
            rows[index(t.t_s)]["v2v"].append(t.voice_to_voice_ms)
    for s in report.timeline:
        top = rows[index(s.t_s)]["max_replicas"]
        for dep, n in _running(s).items():
            top[dep] = max(top.get(dep, 0), n)
    for row in rows:
        v2v = row.pop("v2v")
        row["turns_timed"] = len(v2v)
        row["v2v_p50_ms"], row["v2v_p95_ms"] = percentile(v2v, 50), percentile(v2v, 95)
        row["max_replicas"] = {dep: row["max_replicas"][dep] for dep in _stage_order(row["max_replicas"])}
    times = [c.t_start_s for c in refused_calls]
    return {
        "phases": rows,
        "refusals": {"n": len(refused_calls), "by_code": dict(sorted(Counter(c.status for c in refused_calls).items())),
                     "first_s": min(times, default=None), "last_s": max(times, default=None),
                     "spans": _refusal_spans(times)},
        "calls_cut_by_scale_down": len(cut),
        "cut_times_s": sorted(round(c.t_end_s, 1) for c in cut),
    }


def summary_dict(report: LoadTestReport) -> dict[str, Any]:
    """Counts and p50/p95/p99 of every client metric and server latency part, and the phases."""
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
        "calls_resumed": sum(c.resumes > 0 for c in report.calls), "resumes": sum(c.resumes for c in report.calls),
        "calls_lost": sum(c.lost for c in report.calls), "turns_lost": sum(c.turns_lost for c in report.calls),
        "turns_answered_twice": sum(c.answered_twice for c in report.calls),
        "time_to_resume_ms": _stats([ms for c in report.calls for ms in c.resume_ms]),
        **phase_summary(report),
    }


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    return ["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
            for r in [header, *rows]]


def _phase_lines(s: dict[str, Any], markdown: bool) -> list[str]:
    """The phase table, then the refusals and the calls cut."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    deps = _stage_order(d for row in s["phases"] for d in row["max_replicas"])
    header = ["phase", "time (s)", "callers wanted", "calls started", "refused", "cut", "v2v p50", "v2v p95",
              *(f"max {d}" for d in deps)]
    rows = [[row["phase"], f"{row['start_s']:.0f}-{row['end_s']:.0f}", row["wanted"], str(row["calls_started"]),
             str(row["calls_refused"]), str(row["calls_cut"]), fmt(row["v2v_p50_ms"]), fmt(row["v2v_p95_ms"]),
             *(str(row["max_replicas"].get(d, "-")) for d in deps)] for row in s["phases"]]
    r = s["refusals"]
    if r["n"]:
        codes = ", ".join(f"{k} {v}" for k, v in r["by_code"].items())
        spans = ", ".join(f"{a:.0f} s ({n})" if b - a < 0.5 else f"{a:.0f}-{b:.0f} s ({n})" for a, b, n in r["spans"])
        refusals = (f"calls refused at session start: {r['n']} ({codes}); first at {r['first_s']:.1f} s, last at "
                    f"{r['last_s']:.1f} s; at {spans}")
    else:
        refusals = "calls refused at session start: 0"
    cut = f"calls cut by scale-down (admitted, then lost or ended with an error): {s['calls_cut_by_scale_down']}"
    if s["cut_times_s"]:
        cut += " at " + ", ".join(f"{t:.0f}" for t in s["cut_times_s"]) + " s"
    intro = ("phases (calls by start time, turns by end of speech; v2v in ms of admitted calls' turns; max: RUNNING "
             "replicas):")
    return [intro + ("\n" if markdown else ""), *_table(header, rows, markdown), "", refusals, "", cut]


def summarize(report: LoadTestReport, markdown: bool = False) -> str:
    """A table of p50/p95/p99/max per metric, and the counts (plain text or markdown)."""
    s = summary_dict(report)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    header = ["metric (ms)", "n", *(f"p{q}" for q in PERCENTILES), "max"]
    rows = [[name, str(int(st["n"])), *(fmt(st[f"p{q}"]) for q in PERCENTILES), fmt(st["max"])]
            for name, st in s["metrics"].items() if st["n"]]
    lines = _table(header, rows, markdown)
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    replicas = ", ".join(f"{k} {v}" for k, v in s["max_replicas"].items()) or (report.replica_note or "not recorded")
    counts = (f"calls {s['calls']} (cut by max_duration_s {s['calls_cut']}), turns {s['turns']}, answered "
              f"{s['answered']}, unanswered {s['unanswered']}, barge-ins {s['barge_ins']}, interrupted answers "
              f"{s['interrupted']}, turns with underruns {s['underrun_turns']}, speculative answers "
              f"{s['speculative']}, paused/resumed {s['paused']}/{s['resumed']}, early answers "
              f"{s['early_answers']}, peak active calls {s['peak_active_calls']}, duration {s['duration_s']:.0f} s")
    if s["resumes"] or s["calls_lost"]:
        r = s["time_to_resume_ms"]
        counts += (f"; calls resumed {s['calls_resumed']} ({s['resumes']} resumes, time to resume p50 "
                   f"{fmt(r['p50'])} / p95 {fmt(r['p95'])} ms), calls lost {s['calls_lost']}, turns lost "
                   f"{s['turns_lost']}, turns answered twice {s['turns_answered_twice']}")
    sep = "\n\n" if markdown else "\n"
    parts = ["\n".join(lines), counts, f"errors: {errors}"]
    if s["notes"]:
        parts.append("notes: " + ", ".join(f"{k} ({v})" for k, v in s["notes"].items()))
    phase_text = "\n".join(line for line in _phase_lines(s, markdown) if line or markdown)
    return sep.join([*parts, f"max replicas: {replicas}", phase_text])


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


def _running(s: Sample) -> dict[str, int]:
    """RUNNING replicas per deployment at a sample: Serve's status, else the autoscaler's record."""
    out = {dep: int(d["running"]) for dep, d in (s.scaling or {}).items() if "running" in d}
    out.update(s.replicas or {})
    return out


def load_over_target(d: dict[str, Any]) -> float | None:
    """A deployment's load relative to its autoscaling targets, from one autoscaler record: the
    largest number of replicas a signal asks for (``demands``; else the policy's ``desired``) over
    the replicas running. 1 = exactly at target; above it the policy wants more replicas."""
    demands = [v for v in (d.get("demands") or {}).values() if isinstance(v, (int, float))]
    wanted = max(demands) if demands else d.get("desired")
    if wanted is None:
        return None
    return float(wanted) / max(1, int(d.get("running") or 0))


def plot(report: LoadTestReport, path: str | Path, target_ms: float | None = 1500.0) -> Path:
    """PNG on one time axis: (a) voice-to-voice latency per turn with its rolling p95, (b) callers
    wanted vs active with refused and cut calls marked, (c) RUNNING replicas per deployment (dotted:
    replicas the autoscaler wants), (d) each deployment's load over its autoscaling targets."""
    try:
        import matplotlib
    except ImportError as exc:  # a dev/bench dependency, not needed to run the load itself
        raise MissingPackage("the plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = summary_dict(report)
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(4, 1, figsize=(12, 11.5), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1.4, 1.4, 1.4]})
    # (a) latency
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
    outside: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "borderaxespad": 0}
    ax1.legend(**outside)
    # (b) callers, refusals and cut calls
    ts = [x.t_s for x in report.timeline]
    ax2.step(ts, [x.active_calls for x in report.timeline], where="post", color="C0", label="active calls")
    ax2.step(ts, [x.target_callers for x in report.timeline], where="post", ls="--", color="k", lw=1,
             label="callers wanted")
    refused, cut_calls = refused_and_cut(report)
    cut = [c.t_end_s for c in cut_calls]
    edge = ax2.get_xaxis_transform()  # x in seconds, y in axes fractions: marks along the bottom
    if refused:
        ax2.plot([c.t_start_s for c in refused], [0.06] * len(refused), ls="none", marker="|", ms=12, mew=1.5,
                 color="red", transform=edge, label=f"refused ({len(refused)})")
    if cut:
        ax2.plot(cut, [0.06] * len(cut), ls="none", marker="x", ms=7, color="k", transform=edge,
                 label=f"cut by scale-down ({len(cut)})")
    ax2.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_ylabel("callers")
    ax2.legend(**outside)
    # (c) replicas: running (solid), wanted by the autoscaler (dotted)
    running = [_running(x) for x in report.timeline]
    deps = _stage_order(d for r in running for d in r)
    extra = iter(f"C{i}" for i in range(6, 10))
    colours = {d: _COLOURS.get(d) or next(extra, "k") for d in deps}
    top = 0
    for i, dep in enumerate(deps):
        pts = [(x.t_s, r[dep]) for x, r in zip(report.timeline, running, strict=True) if dep in r]
        # a small offset per deployment keeps equal counts from hiding each other
        ax3.step([p[0] for p in pts], [p[1] + 0.04 * i for p in pts], where="post", color=colours[dep], label=dep)
        want = [(x.t_s, int(x.scaling[dep]["desired"])) for x in report.timeline
                if x.scaling and dep in x.scaling and "desired" in x.scaling[dep]]
        if want:
            ax3.step([p[0] for p in want], [p[1] + 0.04 * i for p in want], where="post", color=colours[dep],
                     ls=":", lw=1.2)
        top = max([top, *(p[1] for p in pts), *(p[1] for p in want)])
    if deps:
        ax3.set_ylim(0, top + 1)
        ax3.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        handles, _ = ax3.get_legend_handles_labels()
        if any(x.scaling for x in report.timeline):
            handles.append(Line2D([], [], color="gray", ls=":", label="desired (autoscaler)"))
        ax3.legend(handles=handles, **outside)
    else:
        ax3.text(0.5, 0.5, f"replica counts not recorded: {report.replica_note}", ha="center",
                 va="center", transform=ax3.transAxes, fontsize=8, wrap=True)
    ax3.set_ylabel("replicas")
    # (d) load over the autoscaling targets
    scaled = _stage_order(d for x in report.timeline for d in (x.scaling or {}))
    for dep in scaled:
        load = [(x.t_s, v) for x in report.timeline if x.scaling and dep in x.scaling
                and (v := load_over_target(x.scaling[dep])) is not None]
        if load:
            ax4.step([p[0] for p in load], [p[1] for p in load], where="post",
                     color=colours.get(dep) or _COLOURS.get(dep, "k"), label=dep)
    if scaled:
        ax4.axhline(1.0, color="gray", ls="--", lw=1, label="at target")
        ax4.set_ylim(bottom=0)
        ax4.legend(**outside)
    else:
        why = report.scaling_note or report.replica_note or "not recorded"
        ax4.text(0.5, 0.5, f"autoscaler decisions not recorded: {why}", ha="center", va="center",
                 transform=ax4.transAxes, fontsize=8, wrap=True)
    ax4.set_ylabel("load / target\n(replicas asked / running)", fontsize=9)
    ax4.set_xlabel("time since start (s)")
    # phases: a faint line at each boundary, named along the top where there is room for the name
    span = max((row["end_s"] for row in s["phases"]), default=0.0) or 1.0
    for row in s["phases"]:
        for ax in (ax1, ax2, ax3, ax4):
            if row["start_s"] > 0:
                ax.axvline(row["start_s"], color="gray", lw=0.6, alpha=0.5)
        if row["end_s"] - row["start_s"] >= 0.08 * span:
            ax1.text(row["start_s"], 1.0, f" {row['phase']} ({row['wanted']})", transform=ax1.get_xaxis_transform(),
                     fontsize=7, va="bottom", ha="left", color="dimgray", clip_on=False)
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(alpha=0.3)
    v2v = s["metrics"]["voice_to_voice_ms"]
    p50, p95 = v2v["p50"], v2v["p95"]
    schedule = report.config.get("schedule")
    what = (f"{len(schedule)}-step schedule up to {max(n for _, n in schedule)} callers" if schedule
            else f"{report.config.get('callers')} callers")
    title = (f"voxserve load test: {what}, {s['turns']} turns, p50 {p50 or 0:.0f} ms, p95 {p95 or 0:.0f} ms, "
             f"errors {sum(s['errors'].values())}, refused {s['refusals']['n']}")
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

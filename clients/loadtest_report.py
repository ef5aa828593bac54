"""What a ``voxserve loadtest`` run measured, and how it is reported: the records of every turn,
call and timeline sample (``LoadTestReport``), the p50/p95/p99 summary (plain text or markdown),
the PNG plot, and the files written to ``--out``.

Standard library only at import time; the plot imports matplotlib when it is drawn.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clients.errors import MissingPackage
from clients.stats import percentile

__all__ = [
    "CLIENT_METRICS", "PERCENTILES", "SERVER_METRICS", "CallRecord", "LoadTestReport", "Sample", "TurnRecord",
    "plot", "rolling_p95", "summarize", "summary_dict", "write_outputs",
]

#: Percentiles reported in the summary.
PERCENTILES = (50, 95, 99)
#: Client-measured per-turn metrics summarized (all in ms).
CLIENT_METRICS = ("voice_to_voice_ms", "first_transcript_ms", "first_text_ms", "underrun_ms")
#: Server-measured latency parts (ResponseDone.latency) summarized beside them.
SERVER_METRICS = ("vad_end_delay_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms")


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


# --- summary --------------------------------------------------------------------------------------


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
        "calls_resumed": sum(c.resumes > 0 for c in report.calls), "resumes": sum(c.resumes for c in report.calls),
        "calls_lost": sum(c.lost for c in report.calls), "turns_lost": sum(c.turns_lost for c in report.calls),
        "turns_answered_twice": sum(c.answered_twice for c in report.calls),
        "time_to_resume_ms": _stats([ms for c in report.calls for ms in c.resume_ms]),
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
    if s["resumes"] or s["calls_lost"]:
        r = s["time_to_resume_ms"]
        counts += (f"; calls resumed {s['calls_resumed']} ({s['resumes']} resumes, time to resume p50 "
                   f"{fmt(r['p50'])} / p95 {fmt(r['p95'])} ms), calls lost {s['calls_lost']}, turns lost "
                   f"{s['turns_lost']}, turns answered twice {s['turns_answered_twice']}")
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

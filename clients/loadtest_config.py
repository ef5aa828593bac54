"""Settings of ``voxserve loadtest`` (``LoadTestConfig``), with nothing but the standard library.

Its command-line options are in ``clients.loadtest_cli``; the load tester itself
(``clients.loadtest``) runs a config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from clients.errors import InvalidInput


class InvalidLoadTestConfig(InvalidInput):
    """A LoadTestConfig field is out of range or of the wrong type (a ``ValueError``)."""


def _num(name: str, value: Any, *, integer: bool = False, ge: float | None = None, gt: float | None = None,
         le: float | None = None) -> Any:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise InvalidLoadTestConfig(f"{name} must be {kind}; got {value!r}")
    if not integer and not math.isfinite(value):
        raise InvalidLoadTestConfig(f"{name} must be a finite number; got {value!r}")
    if ge is not None and value < ge:
        raise InvalidLoadTestConfig(f"{name} must be >= {ge:g}; got {value!r}")
    if gt is not None and value <= gt:
        raise InvalidLoadTestConfig(f"{name} must be > {gt:g}; got {value!r}")
    if le is not None and value > le:
        raise InvalidLoadTestConfig(f"{name} must be <= {le:g}; got {value!r}")
    return int(value) if integer else float(value)


#: Most callers a schedule step (or ``callers``) may ask for.
MAX_CALLERS = 256


def check_schedule(steps: Any) -> list[tuple[float, int]]:
    """``steps`` as ``[(t_s, callers), ...]`` if it is a valid schedule, else InvalidLoadTestConfig.

    From each step's ``t_s`` on, ``callers`` callers are wanted, until the next step. The first
    step is at 0 s, times strictly increase, each step asks for [0, 256] callers, at least one
    asks for some, and the last asks for 0: the schedule (not counting calls still finishing and
    the cooldown) ends when it starts."""
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        raise InvalidLoadTestConfig(f"schedule must be a list of (t_s, callers) steps (or None); got {steps!r}")
    out: list[tuple[float, int]] = []
    for i, step in enumerate(steps):
        if isinstance(step, (str, bytes)) or not hasattr(step, "__len__") or len(step) != 2:
            raise InvalidLoadTestConfig(f"schedule[{i}] must be a (t_s, callers) pair; got {step!r}")
        t = _num(f"schedule[{i}] time", step[0], ge=0)
        n = _num(f"schedule[{i}] callers", step[1], integer=True, ge=0, le=MAX_CALLERS)
        if not out and t != 0:
            raise InvalidLoadTestConfig(f"schedule must start at 0 s (its first step's time); got {t:g} s")
        if out and t <= out[-1][0]:
            raise InvalidLoadTestConfig(f"schedule times must increase: schedule[{i}] is at {t:g} s, not after "
                                        f"the previous step's {out[-1][0]:g} s")
        out.append((t, n))
    if len(out) < 2:
        raise InvalidLoadTestConfig(f"schedule needs at least two steps (the last one with 0 callers); got {out!r}")
    if out[-1][1] != 0:
        raise InvalidLoadTestConfig(f"schedule must end with a step of 0 callers (when the test stops calling); "
                                    f"its last step asks for {out[-1][1]}")
    if max(n for _, n in out) < 1:
        raise InvalidLoadTestConfig("schedule must ask for at least 1 caller in some step")
    return out


def parse_schedule(text: str) -> list[tuple[float, int]]:
    """``"0:1,30:4,60:10,150:4,180:1,210:0"`` -> ``[(0.0, 1), (30.0, 4), ...]`` (checked like
    ``LoadTestConfig.schedule``; raises InvalidLoadTestConfig)."""
    steps: list[tuple[float, int]] = []
    for part in text.replace(" ", "").split(","):
        t, sep, n = part.partition(":")
        try:
            if not sep:
                raise ValueError(part)
            steps.append((float(t), int(n)))
        except ValueError:
            raise InvalidLoadTestConfig(
                f"schedule step {part!r} must be SECONDS:CALLERS, e.g. 0:1,30:4,60:0 (callers from that time "
                f"on; the last step has 0)") from None
    return check_schedule(steps)


def format_schedule(steps: list[tuple[float, int]]) -> str:
    """The ``--schedule`` text of ``steps``."""
    return ",".join(f"{t:g}:{n}" for t, n in steps)


@dataclass
class LoadTestConfig:
    """A load test: how many callers, their ramp schedule, what they say, where results go.

    Every field is checked on construction; a bad value raises ``InvalidLoadTestConfig`` (a
    ``ValueError``) naming the field and its allowed range. Unknown fields are a ``TypeError``.
    """

    address: str = "127.0.0.1:9000"
    """gRPC address (host:port) of the voxserve server."""
    allow_remote: bool = False
    """Allow a non-loopback address. Off by default: only 127.0.0.0/8, ::1 and localhost."""
    callers: int = 4
    """Peak number of concurrent simulated callers, [1, 256]. With a ``schedule``: its largest step
    (set from it; any other value than the default is an error)."""
    ramp_up_s: float = 0.0
    """Callers start evenly spread over this time (1 -> N), >= 0."""
    hold_s: float = 30.0
    """Time all N callers keep calling after the ramp-up, >= 0."""
    ramp_down_s: float = 0.0
    """Callers stop evenly spread over this time after the hold (last started stops first), >= 0."""
    schedule: list[tuple[float, int]] | None = None
    """Steps ``(t_s, callers)``: from ``t_s`` on, this many callers are wanted, until the next step;
    e.g. ``[(0, 1), (30, 4), (60, 10), (150, 4), (180, 1), (210, 0)]``. The first step is at 0, times
    increase, callers are in [0, 256], and the last step has 0 callers: the callers stop calling when it
    starts (calls in progress finish), then the cooldown runs. It must end within ``max_duration_s``.
    None = the ramp (``ramp_up_s``, ``hold_s``, ``ramp_down_s``, which must then be left at their defaults)."""
    turns_per_call: int = 2
    """Spoken questions per call (one Converse stream), [1, 50]."""
    calls_per_caller: int = 0
    """Calls each caller makes at most; 0 = keep calling until its slot in the schedule ends.
    Every caller makes at least one call."""
    pause_s: float = 1.0
    """Silence after an answer finished playing before the next turn, and between calls, >= 0."""
    barge_in_rate: float = 0.0
    """Probability that a turn (not a call's first) interrupts the previous answer while it plays, [0, 1]."""
    barge_in_after_ms: tuple[float, float] = (400.0, 1200.0)
    """An interrupting turn starts after a random [min, max] ms of the previous answer was played."""
    max_duration_s: float = 600.0
    """Hard bound on the whole test, (0, 3600]: calls still running then are cancelled (reported as cut)."""
    turn_timeout_s: float = 60.0
    """A turn without an answer after this long is unanswered, > 0."""
    chunk_ms: int = 20
    """Audio per AudioInput message, [10, 1000] ms (20: a WebRTC frame; behind Ray Serve's gRPC
    proxy each message is one actor round trip, so larger messages load a small machine less)."""
    resume: bool = True
    """A call whose stream breaks or is moved (SessionMoved) reconnects with its resume token and goes
    on; off: it ends there (reported with its status)."""
    language: str = "en"
    """Language hint sent in the SessionConfig ('' = the server's default, 'auto' = detect)."""
    questions: list[str] | None = None
    """Texts of the spoken questions (synthesized once with Piper and cached); None = the built-in set."""
    seed: int = 0
    """Seed of the random choices (questions, barge-ins, jitter)."""
    out_dir: str | None = None
    """Folder for loadtest.json, summary.md and loadtest.png; None = none written."""
    app_name: str = "voxserve"
    """Serve application whose replicas are polled."""
    replicas: str = "auto"
    """Replica polling: 'auto' (use this process's Ray connection, else attach to a local cluster if
    one runs), 'off', or a Ray address to connect to."""
    cooldown_s: float = 0.0
    """Keep sampling the timeline (replica counts) this long after the last call ended, to show
    scale-down; not counted in max_duration_s. [0, 3600]."""
    sample_interval_s: float = 1.0
    """Period of the timeline samples (callers, replicas), > 0."""
    progress: bool = True
    """Print a progress line to stderr while the test runs."""

    def __post_init__(self) -> None:
        for name in ("address", "language", "app_name", "replicas"):
            if not isinstance(getattr(self, name), str):
                raise InvalidLoadTestConfig(f"{name} must be a string; got {getattr(self, name)!r}")
        for name in ("allow_remote", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidLoadTestConfig(f"{name} must be true or false; got {getattr(self, name)!r}")
        self.callers = _num("callers", self.callers, integer=True, ge=1, le=256)
        self.ramp_up_s = _num("ramp_up_s", self.ramp_up_s, ge=0)
        self.hold_s = _num("hold_s", self.hold_s, ge=0)
        self.ramp_down_s = _num("ramp_down_s", self.ramp_down_s, ge=0)
        self.turns_per_call = _num("turns_per_call", self.turns_per_call, integer=True, ge=1, le=50)
        self.calls_per_caller = _num("calls_per_caller", self.calls_per_caller, integer=True, ge=0)
        self.pause_s = _num("pause_s", self.pause_s, ge=0)
        self.barge_in_rate = _num("barge_in_rate", self.barge_in_rate, ge=0, le=1)
        window = self.barge_in_after_ms
        if isinstance(window, str) or not hasattr(window, "__len__") or len(window) != 2:
            raise InvalidLoadTestConfig(f"barge_in_after_ms must be two numbers [min, max] in ms; got {window!r}")
        lo, hi = (_num("barge_in_after_ms", v, ge=0) for v in window)
        self.barge_in_after_ms = (lo, hi)
        self.max_duration_s = _num("max_duration_s", self.max_duration_s, gt=0, le=3600)
        self.turn_timeout_s = _num("turn_timeout_s", self.turn_timeout_s, gt=0)
        self.chunk_ms = _num("chunk_ms", self.chunk_ms, integer=True, ge=10, le=1000)
        if self.questions is not None:
            if isinstance(self.questions, str) or not all(isinstance(q, str) for q in self.questions):
                raise InvalidLoadTestConfig(f"questions must be a list of texts (or None); got {self.questions!r}")
            if not all(q.strip() for q in self.questions):
                raise InvalidLoadTestConfig("questions must not hold empty texts")
            self.questions = list(self.questions)
        self.seed = _num("seed", self.seed, integer=True)
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            raise InvalidLoadTestConfig(f"out_dir must be a folder path (or None); got {self.out_dir!r}")
        self.cooldown_s = _num("cooldown_s", self.cooldown_s, ge=0, le=3600)
        self.sample_interval_s = _num("sample_interval_s", self.sample_interval_s, gt=0)
        if self.schedule is not None:
            self._take_schedule()

    def _take_schedule(self) -> None:
        steps = check_schedule(self.schedule)
        defaults = {f.name: f.default for f in fields(self)}
        changed = [f"{name}={getattr(self, name):g}" for name in ("ramp_up_s", "hold_s", "ramp_down_s")
                   if getattr(self, name) != defaults[name]]
        if changed:
            raise InvalidLoadTestConfig(f"ramp_up_s, hold_s and ramp_down_s must be left at their defaults with a "
                                        f"schedule (it sets the whole timing); got {', '.join(changed)}")
        peak = max(n for _, n in steps)
        if self.callers not in (defaults["callers"], peak):
            raise InvalidLoadTestConfig(f"callers is the schedule's largest step ({peak}) when a schedule is given: "
                                        f"leave it out; got {self.callers}")
        if steps[-1][0] > self.max_duration_s:
            raise InvalidLoadTestConfig(f"schedule ends at {steps[-1][0]:g} s, after max_duration_s "
                                        f"({self.max_duration_s:g} s): raise max_duration_s")
        self.schedule, self.callers = steps, peak

    def end_s(self) -> float:
        """When the callers stop calling: the schedule's last step, or the end of the ramp-down
        (calls in progress then finish, and the cooldown follows)."""
        if self.schedule is not None:
            return self.schedule[-1][0]
        return self.ramp_up_s + self.hold_s + self.ramp_down_s

    def phases(self) -> list[tuple[str, float, float | None, str]]:
        """(name, start_s, end_s, callers wanted) of each part of the test, in order: each schedule
        step, or the ramp-up, hold and ramp-down (those that last), then the cooldown (end None:
        calls still finishing, and ``cooldown_s``)."""
        out: list[tuple[str, float, float | None, str]] = []
        if self.schedule is not None:
            for i, ((t, n), (t_next, _)) in enumerate(zip(self.schedule, self.schedule[1:], strict=False)):
                out.append((f"step {i + 1}", t, t_next, str(n)))
        else:
            n, up_end = self.callers, self.ramp_up_s
            hold_end = up_end + self.hold_s
            parts = [("ramp-up", 0.0, up_end, f"1->{n}"), ("hold", up_end, hold_end, str(n)),
                     ("ramp-down", hold_end, hold_end + self.ramp_down_s, f"{n}->1")]
            out += [p for p in parts if p[2] > p[1]]
        out.append(("cooldown", self.end_s(), None, "0"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (the report's ``config``)."""
        d = asdict(self)
        d["barge_in_after_ms"] = list(self.barge_in_after_ms)
        d["schedule"] = None if self.schedule is None else [[t, n] for t, n in self.schedule]
        return d

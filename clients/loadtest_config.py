"""Settings of ``voxserve loadtest`` (``LoadTestConfig``), with nothing but the standard library.

Its command-line options are in ``clients.loadtest_cli``; the load tester itself
(``clients.loadtest``) runs a config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    """Peak number of concurrent simulated callers, [1, 256]."""
    ramp_up_s: float = 0.0
    """Callers start evenly spread over this time (1 -> N), >= 0."""
    hold_s: float = 30.0
    """Time all N callers keep calling after the ramp-up, >= 0."""
    ramp_down_s: float = 0.0
    """Callers stop evenly spread over this time after the hold (last started stops first), >= 0."""
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

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (the report's ``config``)."""
        d = asdict(self)
        d["barge_in_after_ms"] = list(self.barge_in_after_ms)
        return d

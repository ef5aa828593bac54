"""Autoscaling on each stage's own load: the signals replicas report, the policy that reads them,
and the view of it that the gateway's admission control and the load tester read.

Serve's default policy scales on ongoing requests per replica. For a voice pipeline that is the
wrong count for every stage: a Gateway request is a whole call (minutes), an ASR request is one
utterance (tens of ms), an LLM stream's cost is its time to first token, and a TTS stream's
is how far synthesis runs behind real time. So each replica reports its own signals
(``record_autoscaling_stats``, Ray Serve's custom metrics) and one per-deployment policy,
``VoicePolicy``, turns them into a replica count:

- a *count* signal (sessions, utterances, requests, syntheses) is additive: the deployment needs
  ``sum over replicas / target per replica`` replicas;
- a *ratio* signal (time to first token, real-time factor, batch fill) is not: while its mean is
  over target the deployment wants one replica more than it has (one step at a time, because on
  one machine a replica adds concurrency, not compute, and the latency may not fall).

Latency demands (ratios, and the app's budget) only count where another replica can add compute:
with ``latency_scaling="auto"`` (the default), on a Ray cluster of more than one node. On a
single machine a new replica brings no core, and loading its model takes the cores the live calls
need: on 2 cores, two callers whose answers were just over the budget pulled three model stages
up at once, and answers then took 10 s. There, counts still scale (concurrency).

The policy takes the largest demand (Serve's own ongoing-requests count is one of them, so
requests queued in front of the replicas count too); Serve then applies min/max replicas and the
upscale/downscale delays (fast up, patient down: set per profile). Each decision is also
published to Ray's GCS key-value store (``publish``), from where ``ScalingView`` lets a gateway
replica ask "can this deployment still grow?" before it refuses a caller, and the load tester
plots replicas and signals over time.

This module is imported by Serve's controller: it must stay light (no engines, no numpy).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from deployments import scaling_state

log = logging.getLogger("ray.serve")

#: GCS key-value namespace and key prefix of the published decisions.
KV_NAMESPACE = scaling_state.KV_NAMESPACE
KV_PREFIX = "scaling/"
#: A published decision older than this is not trusted (the controller stopped publishing).
STALE_S = 15.0
#: Each deployment's decision is published at most this often.
PUBLISH_PERIOD_S = 1.0
#: Replicas Serve has been starting for longer than this are taken as not placeable (no room in
#: the cluster): the deployment then cannot grow, as far as admission is concerned.
PENDING_LIMIT_S = 120.0
#: How long the number of alive Ray nodes (``latency_scaling="auto"``) is trusted.
NODES_TTL_S = 30.0
#: ``latency_scaling`` values (not on/off: YAML 1.1, as PyYAML and Helm read it, makes those booleans).
LATENCY_SCALING = ("auto", "always", "never")


def alive_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to (1 when it cannot tell)."""
    try:
        import ray

        return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    except Exception:  # no Ray here, or the GCS did not answer: assume the smaller cluster
        return 1


#: The signals each deployment's replicas report (``record_autoscaling_stats``).
SIGNALS: dict[str, set[str]] = {
    "Gateway": {"sessions", "first_audio_ms"},
    "ASR": {"utterances", "wait_ms", "batch_fill"},
    "LLM": {"requests", "ttft_ms"},
    "TTS": {"syntheses", "rtf"},
}


def kv_key(app: str, deployment: str) -> bytes:
    return f"{KV_PREFIX}{app}/{deployment}".encode()


# --- what replicas measure ------------------------------------------------------------------------


class InFlight:
    """Calls running (or waiting) in this replica now: ``with tracker: ...``."""

    def __init__(self) -> None:
        self.now = 0

    def __enter__(self) -> InFlight:
        self.now += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.now -= 1


class RecentValues:
    """Values of the last ``window_s`` seconds (a time to first token, a real-time factor)."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._values: deque[tuple[float, float]] = deque(maxlen=2048)

    def add(self, value: float) -> None:
        self._values.append((self.clock(), value))

    def _recent(self) -> list[float]:
        cutoff = self.clock() - self.window_s
        while self._values and self._values[0][0] < cutoff:
            self._values.popleft()
        return [v for _, v in self._values]

    def p95(self) -> float:
        """p95 of the window (nearest rank), 0.0 with no values: no pressure to report."""
        values = sorted(self._recent())
        if not values:
            return 0.0
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]

    def mean(self) -> float:
        values = self._recent()
        return sum(values) / len(values) if values else 0.0


# --- the policy -----------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def _finite(per_replica: dict[Any, float]) -> dict[Any, float]:
    """A replica's NaN or infinity is no measurement (and would make Serve's ceil raise)."""
    return {r: float(v) for r, v in per_replica.items() if isinstance(v, int | float) and math.isfinite(v)}


#: The deployment whose replicas report the app-wide latency a budget is checked against.
BUDGET_SOURCE = "Gateway"
#: After a scale-up, latency demands wait this long before asking again: the windows they are
#: measured over still hold the answers from before the new replica (else a stage would climb
#: to its max on one slow minute).
SETTLE_S = 15.0


class VoicePolicy:
    """Per-deployment Serve autoscaling policy on the signals its replicas report.

    ``counts``: signal name -> target per replica (additive signals);
    ``ratios``: signal name -> target of its mean over replicas (latency-like signals; a replica
    that reports 0 has no samples and does not pull the mean down);
    ``budget``: signal name -> limit of an app-wide latency the Gateway's replicas report (time
    to first audio): over it, this stage wants one replica more, so that the model stages grow
    before the gateway sheds callers for slow answers.
    ``latency_scaling``: when ratios and the budget may ask for replicas: "always", "never", or "auto"
    (only on a cluster of more than one node: see the module's docstring); ``nodes`` counts the
    cluster's alive nodes (a test passes its own).
    Serve instantiates it once per deployment with the profile's ``policy_kwargs``. A policy
    that raised would stop Serve's control loop for every app: any error keeps the current
    target instead (logged)."""

    def __init__(self, counts: dict[str, float] | None = None, ratios: dict[str, float] | None = None,
                 budget: dict[str, float] | None = None, publish: bool = True,
                 settle_s: float = SETTLE_S, latency_scaling: str = "auto",
                 nodes: Callable[[], int] = alive_nodes) -> None:
        self.counts = {k: float(v) for k, v in (counts or {}).items()}
        self.ratios = {k: float(v) for k, v in (ratios or {}).items()}
        self.budget = {k: float(v) for k, v in (budget or {}).items()}
        self.publish = publish
        self.settle_s = settle_s
        for name, target in {**self.counts, **self.ratios, **self.budget}.items():
            if not (math.isfinite(target) and target > 0):
                raise ValueError(f"autoscaling target of {name} must be a number > 0, got {target}")
        if latency_scaling not in LATENCY_SCALING:
            raise ValueError(f"latency_scaling must be one of {', '.join(LATENCY_SCALING)}, got {latency_scaling!r}")
        self.latency_scaling = latency_scaling
        self._nodes = nodes
        self._nodes_seen: tuple[float, int] = (-math.inf, 1)  # (when, how many)
        self._published_at = 0.0
        self._pending_since: float | None = None  # since when Serve has been starting replicas

    def demands(self, ctx: Any, now: float | None = None,
                levels: dict[str, float] | None = None) -> dict[str, float]:
        """Replicas each signal asks for (Serve's ongoing requests included, as ``ongoing``);
        ``levels``: the deployment's signal levels when the caller already has them."""
        now = time.time() if now is None else now
        levels = self.levels(ctx) if levels is None else levels
        running = max(1, ctx.current_num_replicas)
        out: dict[str, float] = {}
        target_ongoing = ctx.config.get_target_ongoing_requests() if ctx.config is not None else None
        if target_ongoing and math.isfinite(ctx.total_num_requests):
            out["ongoing"] = ctx.total_num_requests / target_ongoing
        for name, target in self.counts.items():
            if name in levels:
                out[name] = levels[name] / target
        if not self.latency_counts(now):
            return out
        # a latency measured before the last scale-up took effect asks for nothing more
        last_up = getattr(ctx, "last_scale_up_time", None)
        settling = last_up is not None and now - last_up < self.settle_s
        step = running if settling else running + 1
        for name, target in self.ratios.items():
            if name in levels:
                level = levels[name]
                # over target: one more than running; under it: what running * level / target needs
                out[name] = step if level > target else running * level / target
        app_levels = self.app_levels(ctx.app_name or "", now)
        for name, limit in self.budget.items():
            if app_levels.get(name, 0.0) > limit:
                out[f"app_{name}"] = step
        return out

    def latency_counts(self, now: float | None = None) -> bool:
        """Whether latency (ratios, budget) may ask for replicas now: see ``latency_scaling``."""
        if self.latency_scaling != "auto":
            return self.latency_scaling == "always"
        now = time.time() if now is None else now
        at, count = self._nodes_seen
        if now - at > NODES_TTL_S:
            count = self._nodes()
            self._nodes_seen = (now, count)
        return count > 1

    @staticmethod
    def app_levels(app: str, now: float | None = None) -> dict[str, float]:
        """The Gateway's newest signal levels (empty when none is fresh)."""
        at, levels = scaling_state.LEVELS.get(f"{app}/{BUDGET_SOURCE}", (0.0, {}))
        return levels if (now or time.time()) - at < STALE_S else {}

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        try:
            return self._decide(ctx)
        except Exception:
            log.exception("VoicePolicy failed for %s; keeping %s replicas", ctx.deployment_name,
                          ctx.target_num_replicas)
            return ctx.target_num_replicas, ctx.policy_state

    def _decide(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, ctx.policy_state
        now = time.time()
        levels = self.levels(ctx)
        scaling_state.LEVELS[f"{ctx.app_name or ''}/{ctx.deployment_name}"] = (now, levels)
        demands = self.demands(ctx, now, levels)
        desired = max(demands.values(), default=float(ctx.current_num_replicas))
        if ctx.target_num_replicas > ctx.current_num_replicas:
            self._pending_since = self._pending_since or now
        else:
            self._pending_since = None
        if self.publish:
            self._publish(ctx, desired, demands, levels, now)
        return desired, ctx.policy_state

    def levels(self, ctx: Any) -> dict[str, float]:
        """Each signal for the whole deployment: the sum of a count, else the mean of the
        replicas that have samples (a latency); NaN and infinity are no samples."""
        out: dict[str, float] = {}
        for name, per_replica in (ctx.aggregated_metrics or {}).items():
            values = _finite(per_replica).values()
            out[name] = sum(values) if name in self.counts else _mean(v for v in values if v > 0)
        return out

    def _publish(self, ctx: Any, desired: float, demands: dict[str, float],
                 levels: dict[str, float], now: float) -> None:
        if now - self._published_at < PUBLISH_PERIOD_S:
            return
        self._published_at = now
        top = ctx.capacity_adjusted_max_replicas
        record = {
            "t": now, "deployment": ctx.deployment_name,
            "running": ctx.current_num_replicas, "target": ctx.target_num_replicas,
            "desired": min(top, math.ceil(desired - 1e-9)),
            "min": ctx.capacity_adjusted_min_replicas, "max": top,
            "pending_since": self._pending_since,
            "ongoing": ctx.total_num_requests,
            "targets": {**self.counts, **self.ratios},
            "latency": bool((self.ratios or self.budget) and self.latency_counts(now)),
            "signals": {name: round(v, 3) for name, v in levels.items()},
            "demands": {k: round(v, 3) for k, v in demands.items()},
        }
        scaling_state.PUBLISHER.put(kv_key(ctx.app_name or "", ctx.deployment_name), json.dumps(record).encode())


# --- what others read -----------------------------------------------------------------------------


class ScalingView:
    """The policy's latest published decision per deployment (``refresh`` reads the GCS; call it
    in a thread: it blocks for a GCS round trip)."""

    def __init__(self, app: str, deployments: Iterable[str], clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.deployments = tuple(deployments)
        self.clock = clock
        self.records: dict[str, dict[str, Any]] = {}

    def refresh(self) -> dict[str, dict[str, Any]]:
        from ray.experimental import internal_kv

        records: dict[str, dict[str, Any]] = {}
        for name in self.deployments:
            raw = internal_kv._internal_kv_get(kv_key(self.app, name), namespace=KV_NAMESPACE)
            if raw:
                records[name] = json.loads(raw)
        self.records = records
        return records

    def fresh(self, deployment: str) -> dict[str, Any] | None:
        """The deployment's record if it is recent and well-formed (a record of another version,
        or a broken one, counts as none)."""
        record = self.records.get(deployment)
        if not isinstance(record, dict):
            return None
        try:
            if self.clock() - float(record["t"]) > STALE_S:
                return None
            if not all(isinstance(record[k], int | float) for k in ("running", "target", "desired", "max")):
                return None
        except (KeyError, TypeError, ValueError):
            return None
        return record

    def can_grow(self, deployment: str) -> bool:
        """The deployment is below its max replicas, and not stuck starting the ones it decided
        on (a replica that cannot be placed for ``PENDING_LIMIT_S``, e.g. no GPU left, is no
        room). Unknown (no fresh record) counts as no: admission then behaves as if there were
        no autoscaling."""
        r = self.fresh(deployment)
        if r is None or r["running"] >= r["max"]:
            return False
        pending = r.get("pending_since")
        return not (isinstance(pending, int | float) and self.clock() - pending > PENDING_LIMIT_S)

    def grows_for_latency(self, deployment: str) -> bool:
        """It can grow, and its policy adds replicas for slow answers (on a single machine it
        does not: ``VoicePolicy.latency_scaling``). A record without the flag counts as yes."""
        r = self.fresh(deployment)
        return r is not None and self.can_grow(deployment) and bool(r.get("latency", True))

    def growing(self, deployment: str) -> bool:
        """It can grow, and the policy wants (or Serve is starting) more replicas than run now."""
        r = self.fresh(deployment)
        return r is not None and self.can_grow(deployment) and max(r["target"], r["desired"]) > r["running"]

    def at_target(self, deployment: str, signal: str) -> bool:
        """The deployment's total ``signal`` is at or over its target for the replicas running:
        one replica being full is then the deployment's load, not an uneven spread of it."""
        r = self.fresh(deployment)
        if r is None:
            return False
        target = (r.get("targets") or {}).get(signal)
        level = (r.get("signals") or {}).get(signal)
        if not isinstance(target, int | float) or not isinstance(level, int | float):
            return False
        return level >= r["running"] * target

    def summary(self) -> dict[str, Any]:
        """Replicas and signals per deployment, for stats() and the load tester."""
        return {name: {k: r[k] for k in ("running", "target", "desired", "max", "signals")}
                for name in self.deployments if (r := self.fresh(name)) is not None}

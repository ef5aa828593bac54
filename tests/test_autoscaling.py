"""Autoscaling rules without Ray: VoicePolicy's arithmetic on the signals replicas report, the
ScalingView admission reads, the gateway's admission while deployments can still grow, and the
profiles' autoscaling options. On the real app: test_autoscaling_graph.py (and the two-node
placement in test_resume_cluster.py)."""

from __future__ import annotations

import contextlib
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from deployments import autoscaling, scaling_state
from deployments.autoscaling import InFlight, RecentValues, ScalingView, VoicePolicy
from deployments.config import ASR, GATEWAY, LLM, TTS
from deployments.profiles import VOICE_POLICY, get_profile, serve_config
from deployments.sessions import LatencyWindow
from services.conversation import SessionSettings
from services.conversation.events import TurnLatency
from services.conversation.input_lag import InputLag
from services.errors import ResourceExhausted
from tests.test_sessions import hub


def ctx(name: str = "LLM", running: int = 1, metrics: dict[str, list[float]] | None = None,
        ongoing: float = 0.0, target_ongoing: float = 4.0, app: str = "test") -> Any:
    """An AutoscalingContext stand-in: the fields VoicePolicy reads."""
    per_replica = {k: {f"r{i}": v for i, v in enumerate(vals)} for k, vals in (metrics or {}).items()}
    return SimpleNamespace(
        app_name=app, deployment_name=name, current_num_replicas=running, target_num_replicas=running,
        total_num_requests=ongoing, aggregated_metrics=per_replica, policy_state={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3,
        config=SimpleNamespace(get_target_ongoing_requests=lambda: target_ongoing))


@pytest.fixture(autouse=True)
def _fresh_levels() -> Any:
    scaling_state.LEVELS.clear()
    yield
    scaling_state.LEVELS.clear()


def test_counts_add_up_over_replicas() -> None:
    policy = VoicePolicy(counts={"sessions": 6}, publish=False)
    desired, _ = policy(ctx(GATEWAY, running=2, metrics={"sessions": [8, 6]}, target_ongoing=6))
    assert desired == pytest.approx(14 / 6)
    idle, _ = policy(ctx(GATEWAY, running=2, metrics={"sessions": [1, 0]}, target_ongoing=6))
    assert idle == pytest.approx(1 / 6)  # Serve then keeps min_replicas and waits downscale_delay_s


def test_a_ratio_over_target_asks_for_one_more_replica_at_a_time() -> None:
    policy = VoicePolicy(counts={"requests": 3}, ratios={"ttft_ms": 700}, publish=False, latency_scaling="always")
    over, _ = policy(ctx(running=2, metrics={"requests": [1, 1], "ttft_ms": [900, 1100]}))
    assert over == 3  # not 2 * 1000/700: on one machine a replica adds concurrency, not compute
    # a replica with no samples (0) does not pull the mean down
    under, _ = policy(ctx(running=2, metrics={"requests": [0, 0], "ttft_ms": [350, 0]}))
    assert under == pytest.approx(1.0)


def test_serve_queue_counts_too() -> None:
    """Requests queued in front of the replicas (Serve's ongoing count) are a demand of their own."""
    policy = VoicePolicy(counts={"utterances": 2}, publish=False)
    desired, _ = policy(ctx(ASR, metrics={"utterances": [1]}, ongoing=12, target_ongoing=2))
    assert desired == 6


def test_the_app_latency_budget_grows_every_model_stage() -> None:
    gateway = VoicePolicy(counts={"sessions": 6}, publish=False)
    stage = VoicePolicy(counts={"syntheses": 2}, budget={"first_audio_ms": 1200}, publish=False,
                        latency_scaling="always")
    calm, _ = stage(ctx(TTS, metrics={"syntheses": [0.5]}))
    assert calm == pytest.approx(0.25)
    gateway(ctx(GATEWAY, metrics={"sessions": [5], "first_audio_ms": [1800]}, target_ongoing=6))
    slow, _ = stage(ctx(TTS, metrics={"syntheses": [0.5]}))
    assert slow == 2 and "app_first_audio_ms" in stage.demands(ctx(TTS, metrics={"syntheses": [0.5]}))
    # another app's gateway is not ours, and an old level is not trusted
    assert stage(ctx(TTS, metrics={"syntheses": [0.5]}, app="other"))[0] == pytest.approx(0.25)
    assert VoicePolicy.app_levels("test", now=time.time() + autoscaling.STALE_S + 1) == {}


def test_latency_adds_replicas_only_where_they_add_compute() -> None:
    """On one machine a new replica brings no core (and loading it takes the live calls' cores):
    "auto" lets latency ask for replicas only on a cluster of several nodes; counts always ask."""
    nodes = [1]
    calls = []

    def count() -> int:
        calls.append(1)
        return nodes[0]

    VoicePolicy(counts={"sessions": 6}, publish=False)(
        ctx(GATEWAY, metrics={"sessions": [5], "first_audio_ms": [1800]}, target_ongoing=6))
    policy = VoicePolicy(counts={"requests": 3}, ratios={"ttft_ms": 700}, budget={"first_audio_ms": 1200},
                         publish=False, nodes=count)
    slow = ctx(metrics={"requests": [1], "ttft_ms": [1500]})
    assert policy(slow)[0] == pytest.approx(1 / 3)
    assert set(policy.demands(slow)) == {"ongoing", "requests"}
    assert policy(ctx(metrics={"requests": [9], "ttft_ms": [1500]}))[0] == 3  # concurrency still scales
    assert len(calls) == 1  # the node count is asked once per NODES_TTL_S, not on every decision
    nodes[0] = 2
    policy._nodes_seen = (0.0, 1)  # that long ago
    assert policy(slow)[0] == 2 and {"ttft_ms", "app_first_audio_ms"} <= set(policy.demands(slow))
    assert VoicePolicy(ratios={"ttft_ms": 700}, publish=False, latency_scaling="never", nodes=count)(slow)[0] < 1
    with pytest.raises(ValueError, match="latency_scaling"):
        VoicePolicy(ratios={"ttft_ms": 700}, latency_scaling="sometimes")


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="ttft_ms"):
        VoicePolicy(ratios={"ttft_ms": 0})


def test_no_replicas_keeps_serves_own_start_decision() -> None:
    c = ctx(running=0)
    c.target_num_replicas = 1
    assert VoicePolicy(counts={"requests": 3}, publish=False)(c)[0] == 1


def test_decisions_are_published_off_the_controller_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The record goes to the publisher's queue (its thread writes the GCS), desired clamped to max."""
    puts: list[tuple[bytes, dict[str, Any]]] = []
    monkeypatch.setattr(scaling_state.PUBLISHER, "put", lambda key, value: puts.append((key, json.loads(value))))
    policy = VoicePolicy(counts={"requests": 3}, ratios={"ttft_ms": 700})
    desired, _ = policy(ctx(metrics={"requests": [30], "ttft_ms": [100]}))
    assert desired == 10
    (key, record), = puts
    assert key == b"scaling/test/LLM"
    assert record["desired"] == 3 and record["max"] == 3 and record["targets"] == {"requests": 3, "ttft_ms": 700}
    assert record["signals"] == {"requests": 30, "ttft_ms": 100} and record["pending_since"] is None
    policy(ctx(metrics={"requests": [30]}))
    assert len(puts) == 1  # at most once a second


def test_a_failing_policy_keeps_the_current_target() -> None:
    """An exception inside Serve's controller would stop its control loop for every app."""
    class Broken(SimpleNamespace):
        @property
        def aggregated_metrics(self) -> Any:
            raise RuntimeError("boom")

    c = Broken(**{k: v for k, v in vars(ctx(running=2)).items() if k != "aggregated_metrics"})
    assert VoicePolicy(counts={"requests": 3}, publish=False)(c)[0] == 2


def test_nan_and_inf_are_no_measurement() -> None:
    policy = VoicePolicy(counts={"requests": 3}, ratios={"ttft_ms": 700}, publish=False, latency_scaling="always")
    desired, _ = policy(ctx(running=2, metrics={"requests": [float("nan"), 3], "ttft_ms": [float("inf"), 300]}))
    assert desired == pytest.approx(1.0)


def test_latency_demands_settle_after_a_scale_up() -> None:
    """Right after a scale-up the latency windows still hold the old answers: no second step."""
    policy = VoicePolicy(ratios={"ttft_ms": 700}, budget={"first_audio_ms": 1200}, publish=False, settle_s=15,
                         latency_scaling="always")
    c = ctx(running=2, metrics={"ttft_ms": [900]})
    c.last_scale_up_time = time.time() - 5
    assert policy(c)[0] == 2
    c.last_scale_up_time = time.time() - 20
    assert policy(c)[0] == 3


def view(**records: dict[str, Any]) -> ScalingView:
    v = ScalingView("test", (GATEWAY, ASR, LLM, TTS))
    now = time.time()
    v.records = {name: {"t": now, "running": 1, "target": 1, "desired": 1, "max": 3, "signals": {}, **r}
                 for name, r in records.items()}
    return v


def test_scaling_view_can_grow_and_growing() -> None:
    v = view(Gateway={}, ASR={"running": 3}, LLM={"running": 1, "desired": 2}, TTS={"running": 2, "target": 3})
    assert v.can_grow(GATEWAY) and not v.growing(GATEWAY)
    assert not v.can_grow(ASR)
    assert v.growing(LLM) and v.growing(TTS) and v.can_grow(TTS)
    v.records[GATEWAY]["t"] = time.time() - autoscaling.STALE_S - 1
    assert not v.can_grow(GATEWAY) and v.fresh(GATEWAY) is None  # stale: as if nothing could grow
    assert set(v.summary()) == {ASR, LLM, TTS}


def test_a_replica_that_cannot_be_placed_is_no_room() -> None:
    v = view(TTS={"running": 1, "target": 2, "pending_since": time.time() - 30})
    assert v.growing(TTS)
    v.records[TTS]["pending_since"] = time.time() - autoscaling.PENDING_LIMIT_S - 1
    assert not v.can_grow(TTS) and not v.growing(TTS)


def test_a_malformed_record_counts_as_none() -> None:
    v = view(Gateway={}, LLM={})
    del v.records[GATEWAY]["max"]
    v.records[LLM]["running"] = "two"
    assert v.fresh(GATEWAY) is None and not v.can_grow(GATEWAY) and v.fresh(LLM) is None
    assert v.summary() == {}


def test_at_target_compares_the_deployment_total() -> None:
    v = view(Gateway={"running": 2, "targets": {"sessions": 6}, "signals": {"sessions": 11}})
    assert not v.at_target(GATEWAY, "sessions")  # 8 + 3: one replica full, the other has room
    v.records[GATEWAY]["signals"]["sessions"] = 12
    assert v.at_target(GATEWAY, "sessions")


def test_replica_trackers() -> None:
    now = [0.0]
    values = RecentValues(window_s=10, clock=lambda: now[0])
    assert values.p95() == 0.0 and values.mean() == 0.0
    for v in range(1, 21):
        values.add(float(v))
    assert values.p95() == 19.0 and values.mean() == pytest.approx(10.5)
    now[0] = 11.0
    assert values.p95() == 0.0
    calls = InFlight()
    with calls, calls:
        assert calls.now == 2
    assert calls.now == 0


# --- admission while the deployments can grow -------------------------------------------------------


async def test_a_full_replica_admits_a_burst_while_the_gateway_grows() -> None:
    h = hub(max_sessions=2, burst_sessions=1)
    h.scaling = view(Gateway={"running": 1, "max": 2, "desired": 2})
    s = SessionSettings()
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(h.session(s))
        with pytest.raises(ResourceExhausted, match="3 sessions already active"):
            h.admit()  # the burst is bounded


async def test_a_full_replica_beside_one_with_room_refuses() -> None:
    """The Gateway is not growing (8 + 3 sessions need 2 replicas): the retry lands on the other."""
    h = hub(max_sessions=2, burst_sessions=4)
    h.scaling = view(Gateway={"running": 2, "max": 3, "targets": {"sessions": 6}, "signals": {"sessions": 11}})
    s = SessionSettings()
    async with h.session(s), h.session(s):
        with pytest.raises(ResourceExhausted, match="max 2\\)"):
            h.admit()
        h.scaling.records[GATEWAY]["signals"]["sessions"] = 12  # every replica at target: it will grow
        h.admit()


async def test_a_full_replica_refuses_when_the_gateway_is_at_max_replicas() -> None:
    h = hub(max_sessions=2, burst_sessions=4)
    h.scaling = view(Gateway={"running": 2, "max": 2, "desired": 3})
    s = SessionSettings()
    async with h.session(s), h.session(s):
        with pytest.raises(ResourceExhausted, match="at its max replicas") as info:
            h.admit()
        assert info.value.retry_after_s == h.args.gateway.retry_after_s


async def test_without_a_scaling_view_the_limit_is_hard() -> None:
    h = hub(max_sessions=1, burst_sessions=4)
    async with h.session(SessionSettings()):
        with pytest.raises(ResourceExhausted, match="max 1"):
            h.admit()


async def test_slow_answers_pace_callers_while_stages_can_grow_and_shed_at_max() -> None:
    now = [100.0]
    h = hub(admission_first_audio_ms=1000, retry_after_s=2)
    h.first_audio = LatencyWindow(30, clock=lambda: now[0])
    h.scaling = view(Gateway={}, ASR={"running": 3}, LLM={"running": 1, "max": 2}, TTS={"running": 3})
    s = SessionSettings()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(h.session(s))
        for _ in range(5):
            h.observer.answered(TurnLatency(first_audio_ms=2500))
        now[0] += 3
        await stack.enter_async_context(h.session(s))  # the LLM can still add a replica: let in...
        with pytest.raises(ResourceExhausted, match=r"scaling up.*LLM can add replicas"):
            h.admit()  # ...but one per retry interval
        now[0] += 2.5
        await stack.enter_async_context(h.session(s))
        h.scaling.records[LLM]["running"] = 2
        with pytest.raises(ResourceExhausted, match="ASR, LLM, TTS are at their max replicas"):
            h.admit()


async def test_on_one_machine_slow_answers_shed_at_once() -> None:
    """Stages whose policy adds no replica for latency (one node) are no reason to let callers in."""
    now = [100.0]
    h = hub(admission_first_audio_ms=1000, retry_after_s=2)
    h.first_audio = LatencyWindow(30, clock=lambda: now[0])
    h.scaling = view(Gateway={}, **{s: {"running": 1, "latency": False} for s in (ASR, LLM, TTS)})
    async with h.session(SessionSettings()):
        for _ in range(5):
            h.observer.answered(TurnLatency(first_audio_ms=2500))
        now[0] += 3
        with pytest.raises(ResourceExhausted, match="ASR, LLM, TTS add no replicas for slow answers here"):
            h.admit()
        # a call moved here by a scale-down is load the app already carries: refusing it would cut it
        h.admit(resuming=True)


async def test_answers_that_stall_at_the_caller_shed_new_callers() -> None:
    """Fast first audio, but the rest of the answers comes too slowly to play: the callers already
    in hear gaps, so one more is refused; short gaps (under admission_stall_ms) do not count."""
    now = [100.0]
    h = hub(admission_stalled_share=0.2, admission_stall_ms=200, retry_after_s=2)
    h.first_audio = LatencyWindow(30, clock=lambda: now[0])
    h.stall_ms = LatencyWindow(30, clock=lambda: now[0])
    h.scaling = view(Gateway={}, **{s: {"running": 1, "latency": False} for s in (ASR, LLM, TTS)})
    async with h.session(SessionSettings()):
        for _ in range(6):
            h.observer.answered(TurnLatency(first_audio_ms=400))
            h.observer.played(1, 150.0)  # audible, but under the limit
        h.observer.played(0, 0.0)
        now[0] += 3
        h.admit()
        for _ in range(3):
            h.observer.played(2, 900.0)  # 3 of 10 answers stalled 900 ms
        with pytest.raises(ResourceExhausted, match=r"30% of recent answers stalled over 200 ms.*add no replicas"):
            h.admit()
        assert h.stats()["stalled_share"] == pytest.approx(0.3)
        h.admit(resuming=True)  # a live call moving in is not a new caller
        now[0] += 20
        with pytest.raises(ResourceExhausted, match="stalled"):
            h.admit()
        now[0] += 11  # the stalls age out of the window; callers come back one per retry interval
        h.admit(record=True)
        with pytest.raises(ResourceExhausted, match="recovering from overload"):
            h.admit()


def test_input_lag_is_the_backlog_of_a_real_time_stream() -> None:
    now = [0.0]
    lag = InputLag(pause_s=0.5, clock=lambda: now[0])
    for _ in range(50):  # 20 ms messages, on time
        now[0] += 0.02
        lag.push(0.02)
    assert lag.current() == pytest.approx(0.0, abs=1e-9)
    for _ in range(100):  # each message takes 30 ms to come through: 1 s of wall time lags 1/3 s
        now[0] += 0.03
        lag.push(0.02)
    assert lag.current() == pytest.approx(1.0)
    for _ in range(25):  # a burst catches up
        now[0] += 0.001
        lag.push(0.02)
    assert lag.current() == pytest.approx(0.525)
    now[0] += 0.6
    assert lag.current() == 0.0  # the client stopped sending (mute, push-to-talk): nothing queues
    lag.push(0.02)
    assert lag.current() == 0.0  # and it starts again from nothing


async def test_callers_audio_arriving_late_sheds_new_callers() -> None:
    h = hub(admission_input_lag_s=1.0)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(h.session(SessionSettings()))
        a.input_lag.lag_s = 5.0
        h.admit()  # one session: maybe its own network, not the replica's
        b = await stack.enter_async_context(h.session(SessionSettings()))
        a.input_lag.lag_s, b.input_lag.lag_s = 2.5, 0.1
        h.admit()  # one caller of two lags: the (lower) median stays low
        b.input_lag.lag_s = 1.5
        with pytest.raises(ResourceExhausted, match=r"1.5 s behind real time"):
            h.admit()
        assert h.stats()["input_lag_s"] == pytest.approx(1.5)
        h.admit(resuming=True)


async def test_a_resumed_call_gets_the_burst_allowance_and_no_more() -> None:
    h = hub(max_sessions=1, burst_sessions=1)
    s = SessionSettings()
    async with h.session(s):
        with pytest.raises(ResourceExhausted, match="max 1"):
            h.admit()
        async with h.slot(resuming=True):
            with pytest.raises(ResourceExhausted, match="max 1 \\+ 1 for resumed calls"):
                h.admit(resuming=True)


# --- profiles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_profiles_scale_each_stage_on_its_own_signals(name: str) -> None:
    profile = get_profile(name)
    signals = {GATEWAY: {"sessions"}, ASR: {"utterances", "wait_ms"}, LLM: {"requests", "ttft_ms"},
               TTS: {"syntheses", "rtf"}}
    for dep, expected in signals.items():
        scaling = profile.deployments[dep].autoscaling_config
        assert scaling.policy is not None and scaling.policy.policy_function == VOICE_POLICY
        kwargs = scaling.policy.policy_kwargs
        assert expected <= set(kwargs.counts) | set(kwargs.ratios), dep
        assert scaling.max_replicas > scaling.min_replicas, dep
        # fast up, patient down
        assert scaling.upscale_delay_s <= 5 and scaling.downscale_delay_s >= 30, dep
        if dep != GATEWAY:
            assert kwargs.budget["first_audio_ms"] < profile.args.gateway.admission_first_audio_ms
    # the policy Serve loads is the one named, and takes the kwargs as written in the config
    deps = {d["name"]: d for d in serve_config(name)["applications"][0]["deployments"]}
    kwargs = deps[LLM]["autoscaling_config"]["policy"]["policy_kwargs"]
    VoicePolicy(**kwargs)


def test_cpu_profile_max_replicas_fit_the_logical_cpus_of_voxserve_serve() -> None:
    """`voxserve serve` declares max(8, cores) logical CPUs: every stage at max replicas must fit."""
    profile = get_profile("cpu")
    total = sum(d.autoscaling_config.max_replicas * d.ray_actor_options.num_cpus
                for d in profile.deployments.values())
    assert total <= 8, total


def test_config_checks_catch_policy_targets_that_disagree_with_the_gateway() -> None:
    from deployments.profiles import check_serve_config

    config = serve_config("cpu")
    deps = {d["name"]: d for d in config["applications"][0]["deployments"]}
    deps[LLM]["autoscaling_config"]["policy"]["policy_kwargs"]["counts"]["request"] = 3  # a typo
    deps[TTS]["autoscaling_config"]["policy"]["policy_kwargs"]["budget"]["first_audio_ms"] = 5000
    deps[GATEWAY]["autoscaling_config"]["policy"]["policy_kwargs"]["counts"]["sessions"] = 99
    problems = "\n".join(check_serve_config(config))
    assert "counts.request is not reported" in problems
    assert "budget.first_audio_ms 5000 is over gateway.admission_first_audio_ms" in problems
    assert "target sessions 99 is over gateway.max_sessions" in problems
    deps[ASR]["autoscaling_config"]["policy"]["policy_kwargs"]["ratios"]["wait_ms"] = 0
    assert any("wait_ms" in p for p in check_serve_config(config))

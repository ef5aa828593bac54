"""Load tester: pure summary/schedule/guard logic, metrics dispatch, and a short real load test.

The real run asserts correctness only (every turn answered, no errors, replicas recorded),
never speed: timings belong in scripts/bench_*.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.errors import InvalidInput, MissingPackage
from clients.loadtest import (
    ReplicaPoller,
    caller_window,
    check_address,
    classify_error,
    next_active,
    run_loadtest,
    target_callers,
)
from clients.loadtest_cli import add_parser, cmd_loadtest, config_from_args
from clients.loadtest_config import InvalidLoadTestConfig, LoadTestConfig, parse_schedule
from clients.loadtest_report import (
    CallRecord,
    LoadTestReport,
    Sample,
    TurnRecord,
    call_cut,
    call_refused,
    plot,
    summarize,
    summary_dict,
    write_outputs,
)
from clients.stats import percentile
from deployments.metrics import METRICS, GatewayMetrics, StageMetrics
from services.conversation import events as ev
from services.errors import InvalidArgument

# --- pure helpers ---------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    import numpy as np

    xs = [120.0, 80.0, 300.0, 95.0, 1000.0, 410.0, 77.0]
    for q in (0, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(InvalidInput):
        percentile(xs, 101)


@pytest.mark.parametrize("address", ["127.0.0.1:9000", "127.3.2.1:1", "localhost:9000", "[::1]:9000",
                                     "LOCALHOST:80"])
def test_loopback_addresses_pass(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize("address", ["10.0.0.5:9000", "0.0.0.0:9000", "example.com:9000", "[2001:db8::1]:9000",
                                     "192.168.1.2:9000", "voxserve.internal:443"])
def test_remote_addresses_are_refused_unless_allowed(address: str) -> None:
    with pytest.raises(InvalidInput, match="loopback"):
        check_address(address)
    assert check_address(address, allow_remote=True) == address


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:port", ":9000", "127.0.0.1:70000"])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        check_address(address, allow_remote=True)


def test_server_errors_and_client_notes_are_told_apart() -> None:
    assert classify_error("UNAVAILABLE: the LLM is not ready") == ("UNAVAILABLE", "the LLM is not ready", "")
    assert classify_error("the previous answer ended before the barge-in point") == (
        "", "", "the previous answer ended before the barge-in point")
    assert classify_error("") == ("", "", "")


def test_ramp_schedule_goes_one_to_n_and_back() -> None:
    cfg = LoadTestConfig(callers=4, ramp_up_s=8, hold_s=10, ramp_down_s=8)
    windows = [caller_window(i, cfg) for i in range(4)]
    assert [w[0] for w in windows] == [0, 2, 4, 6]
    assert [w[1] for w in windows] == [24, 22, 20, 18]  # last started stops first
    counts = [target_callers(t, cfg) for t in (0, 2.5, 6.5, 12, 17.9, 19, 21, 23, 24.5)]
    assert counts == [1, 2, 4, 4, 4, 3, 2, 1, 0]
    flat = LoadTestConfig(callers=3, hold_s=0)
    assert [caller_window(i, flat) for i in range(3)] == [(0, 0), (0, 0), (0, 0)]


def test_config_defaults_and_json() -> None:
    cfg = LoadTestConfig()
    assert (cfg.address, cfg.callers, cfg.hold_s, cfg.turns_per_call, cfg.barge_in_after_ms, cfg.language) == (
        "127.0.0.1:9000", 4, 30.0, 2, (400.0, 1200.0), "en")
    d = LoadTestConfig(callers=3, ramp_up_s=2, questions=["Hi?"]).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["callers"] == 3 and d["ramp_up_s"] == 2.0 and isinstance(d["ramp_up_s"], float)
    assert d["barge_in_after_ms"] == [400.0, 1200.0] and d["questions"] == ["Hi?"]
    assert LoadTestConfig(**d) == LoadTestConfig(callers=3, ramp_up_s=2, questions=["Hi?"])  # a report's config


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"callers": 0}, "callers must be >= 1"),
    ({"callers": 257}, "callers must be <= 256"),
    ({"callers": 2.5}, "callers must be an integer"),
    ({"callers": True}, "callers must be an integer"),
    ({"ramp_up_s": -1}, "ramp_up_s must be >= 0"),
    ({"turns_per_call": 51}, "turns_per_call must be <= 50"),
    ({"barge_in_rate": 1.5}, "barge_in_rate must be <= 1"),
    ({"barge_in_after_ms": (100,)}, "barge_in_after_ms must be two numbers"),
    ({"max_duration_s": 0}, "max_duration_s must be > 0"),
    ({"max_duration_s": 4000}, "max_duration_s must be <= 3600"),
    ({"turn_timeout_s": float("nan")}, "turn_timeout_s must be a finite number"),
    ({"sample_interval_s": 0}, "sample_interval_s must be > 0"),
    ({"questions": "What?"}, "questions must be a list of texts"),
    ({"questions": ["  "]}, "questions must not hold empty texts"),
    ({"address": 9000}, "address must be a string"),
    ({"progress": "yes"}, "progress must be true or false"),
])
def test_config_refuses_bad_values_with_clear_messages(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidLoadTestConfig, match=message) as info:
        LoadTestConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_config_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="nope"):
        LoadTestConfig(nope=1)  # type: ignore[call-arg]


def _report() -> LoadTestReport:
    turns = [
        TurnRecord(caller=0, call=0, turn=0, question="q", t_s=1.0, answered=True, voice_to_voice_ms=800,
                   first_transcript_ms=300, first_text_ms=500, server_latency={"asr_ms": 200.0}),
        TurnRecord(caller=0, call=0, turn=1, question="q", t_s=5.0, answered=True, voice_to_voice_ms=1200,
                   barge_in=True, underruns=2, underrun_ms=150, interrupted=True),
        TurnRecord(caller=1, call=0, turn=0, question="q", t_s=6.0, error_code="UNAVAILABLE", error="down"),
    ]
    calls = [CallRecord(0, 0, 0.0, 9.0, "OK", turns_planned=2, turns_done=2),
             CallRecord(1, 0, 0.5, 7.0, "RESOURCE_EXHAUSTED", "busy", turns_planned=2, turns_done=1)]
    timeline = [Sample(float(t), 2 if t < 8 else 0, 2, t // 3, {"ASR": 1 + (t > 4), "LLM": 1}) for t in range(10)]
    return LoadTestReport(config=LoadTestConfig(callers=2).to_dict(), started_at="now",
                          duration_s=10.0, turns=turns, calls=calls, timeline=timeline)


def test_summary_counts_errors_by_code_and_unanswered_turns() -> None:
    report = _report()
    s = summary_dict(report)
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}
    assert s["unanswered"] == 2  # the failed turn, plus the call's turn that was never spoken
    assert (s["turns"], s["answered"], s["barge_ins"], s["interrupted"], s["underrun_turns"]) == (3, 2, 1, 1, 1)
    assert s["max_replicas"] == {"ASR": 2, "LLM": 1}
    v2v = s["metrics"]["voice_to_voice_ms"]
    assert (v2v["n"], v2v["p50"], v2v["max"]) == (2, 1000, 1200)
    assert s["metrics"]["server_asr_ms"]["p95"] == 200
    assert not report.ok
    text = summarize(report)
    assert "voice_to_voice_ms" in text and "RESOURCE_EXHAUSTED 1" in text
    assert summarize(report, markdown=True).startswith("| metric (ms) | n | p50 | p95 | p99 | max |")


def test_report_ok_only_when_everything_answered() -> None:
    report = _report()
    report.turns = report.turns[:2]
    report.calls = report.calls[:1]
    assert report.ok
    report.calls[0].status = "CUT"  # stopped by max_duration_s: not an error, but not a clean run
    assert not report.errors() and not report.ok


def test_outputs_round_trip_and_plot(tmp_path: Path) -> None:
    report = _report()
    paths = write_outputs(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["turns"]) == 3 and data["summary"]["errors"]["UNAVAILABLE"] == 1
    again = LoadTestReport.from_dict(data)
    assert summary_dict(again) == summary_dict(report)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    report.timeline = [Sample(0.0, 0, 0, 0, None)]
    report.replica_note = "no Ray cluster"
    assert plot(report, tmp_path / "none.png").stat().st_size > 0


def test_cli_parses_and_refuses_remote_targets(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loadtest", "--callers", "3", "--ramp-up", "5", "--hold", "7", "--turns", "1",
                              "--barge-in-rate", "0.25", "--question", "Hi there?", "--no-replicas"])
    cfg = config_from_args(args)
    assert (cfg.callers, cfg.ramp_up_s, cfg.hold_s, cfg.turns_per_call, cfg.barge_in_rate) == (3, 5, 7, 1, 0.25)
    assert cfg.questions == ["Hi there?"] and cfg.replicas == "off"
    remote = parser.parse_args(["loadtest", "--address", "10.1.2.3:9000"])
    assert remote.func(remote) == 2  # refused before any traffic
    assert "loopback" in capsys.readouterr().err
    bad = parser.parse_args(["loadtest", "--callers", "0"])
    assert cmd_loadtest(bad) == 2
    assert "callers must be >= 1" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_missing_package(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingPackage, match="pip install matplotlib"):
        plot(_report(), tmp_path / "x.png")
    paths = write_outputs(_report(), tmp_path, plot_png=False)
    assert set(paths) == {"json", "summary"}


# --- step schedules, phases and autoscaling data --------------------------------------------------

STEPS = [(0.0, 1), (30.0, 4), (60.0, 10), (150.0, 4), (180.0, 1), (210.0, 0)]


def test_schedule_is_parsed_and_sets_the_peak() -> None:
    assert parse_schedule("0:1,30:4,60:10,150:4,180:1,210:0") == STEPS
    assert parse_schedule(" 0:2, 1.5:0 ") == [(0.0, 2), (1.5, 0)]
    as_json: Any = [[0, 1], [30, 4], [60, 10], [150, 4], [180, 1], [210, 0]]
    cfg = LoadTestConfig(schedule=as_json)
    assert cfg.schedule == STEPS and cfg.callers == 10 and cfg.end_s() == 210
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["schedule"][2] == [60.0, 10]
    assert LoadTestConfig(**d) == cfg  # a report's config (callers 10 = the peak is accepted)
    assert LoadTestConfig().schedule is None and LoadTestConfig().to_dict()["schedule"] is None


@pytest.mark.parametrize(("text", "message"), [
    ("0:1,30", "schedule step '30' must be SECONDS:CALLERS"),
    ("0:1,x:0", "schedule step 'x:0' must be SECONDS:CALLERS"),
    ("0:1.5,10:0", r"schedule step '0:1.5' must be SECONDS:CALLERS"),
    ("5:1,10:0", "schedule must start at 0 s"),
    ("0:1,30:4,20:0", "schedule times must increase: schedule\\[2\\] is at 20 s"),
    ("0:1,30:4,30:0", "schedule times must increase"),
    ("0:1,30:2", "schedule must end with a step of 0 callers"),
    ("0:0,10:0", "schedule must ask for at least 1 caller"),
    ("0:257,10:0", "schedule\\[0\\] callers must be <= 256"),
    ("0:-1,10:0", "schedule\\[0\\] callers must be >= 0"),
    ("0:1", "schedule needs at least two steps"),
    ("0:1,inf:0", "schedule\\[1\\] time must be a finite number"),
])
def test_bad_schedules_are_refused_with_clear_messages(text: str, message: str) -> None:
    with pytest.raises(InvalidLoadTestConfig, match=message):
        parse_schedule(text)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": "0:1,10:0"}, "schedule must be a list of \\(t_s, callers\\) steps"),
    ({"schedule": [(0, 1, 2), (10, 0)]}, "schedule\\[0\\] must be a \\(t_s, callers\\) pair"),
    ({"schedule": [(0, 1.5), (10, 0)]}, "schedule\\[0\\] callers must be an integer"),
    ({"schedule": STEPS, "hold_s": 60}, "ramp_up_s, hold_s and ramp_down_s must be left at their defaults with a "
                                        "schedule .*got hold_s=60"),
    ({"schedule": STEPS, "ramp_up_s": 5, "ramp_down_s": 5}, "got ramp_up_s=5, ramp_down_s=5"),
    ({"schedule": STEPS, "callers": 3}, "callers is the schedule's largest step \\(10\\)"),
    ({"schedule": STEPS, "max_duration_s": 200}, "schedule ends at 210 s, after max_duration_s \\(200 s\\)"),
])
def test_config_refuses_bad_schedules(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidLoadTestConfig, match=message):
        LoadTestConfig(**kwargs)


def test_target_callers_and_next_active_follow_the_schedule() -> None:
    cfg = LoadTestConfig(schedule=STEPS)
    times = (0, 29.9, 30, 59, 60, 149.9, 150, 179, 180, 209.9, 210, 500)
    assert [target_callers(t, cfg) for t in times] == [1, 1, 4, 4, 10, 10, 4, 4, 1, 1, 0, 0]
    assert next_active(0, 0, cfg) == 0 and next_active(3, 0, cfg) == 30 and next_active(9, 10, cfg) == 60
    assert next_active(9, 149, cfg) == 149 and next_active(9, 150, cfg) is None  # its last step has passed
    assert next_active(0, 209, cfg) == 209 and next_active(0, 210, cfg) is None
    # a caller idle in a dip becomes active again in the next step that wants it
    dip = LoadTestConfig(schedule=[(0, 2), (10, 1), (20, 2), (30, 0)])
    assert [next_active(1, t, dip) for t in (5, 10, 15, 20, 30)] == [5, 20, 20, 20, None]
    # the ramp through the same function: its windows, unchanged
    ramp = LoadTestConfig(callers=4, ramp_up_s=8, hold_s=10, ramp_down_s=8)
    assert [next_active(3, t, ramp) for t in (0, 6, 17.9, 18)] == [6, 6, 17.9, None]
    assert [next_active(0, t, ramp) for t in (0, 23.9, 24)] == [0, 23.9, None]
    assert ramp.end_s() == 26
    assert all(target_callers(t, ramp) > i if next_active(i, t, ramp) == t else target_callers(t, ramp) <= i
               for i in range(4) for t in (0, 1, 2.5, 6, 12, 19, 21, 23, 25))


def test_callers_call_while_the_schedule_wants_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller loop on a fast schedule, each call a 40 ms sleep: calls start only while the
    caller is wanted, an idle caller comes back in a later step, and all return at the end."""
    import clients.loadtest as lt

    started: list[tuple[int, float]] = []

    async def fake_call(cfg: LoadTestConfig, caller: int, call: int, questions: list[Any], rng: Any, t0: float,
                        report: LoadTestReport, live: Any) -> None:
        started.append((caller, time.monotonic() - t0))
        await asyncio.sleep(0.04)

    monkeypatch.setattr(lt, "_one_call", fake_call)
    cfg = LoadTestConfig(schedule=[(0, 1), (1, 3), (2, 1), (3, 2), (4, 0)], pause_s=0.02, progress=False)
    report = LoadTestReport(config=cfg.to_dict(), started_at="now")

    async def main() -> None:
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(lt._caller(cfg, i, [], t0, report, lt._Live()) for i in range(3))),
                               10)
        assert time.monotonic() - t0 < 6

    asyncio.run(main())
    slack = 0.25  # event loop wake-up on a busy machine (steps are 1 s apart)
    for caller, t in started:
        wanted = [target_callers(t - dt, cfg) for dt in (0, slack)]
        assert max(wanted) > caller, (caller, t)
    by_caller = {i: [t for c, t in started if c == i] for i in range(3)}
    assert min(by_caller[0]) < slack and max(by_caller[0]) > 3.5  # caller 0: the whole schedule
    assert by_caller[2] and all(0.99 < t < 2 + slack for t in by_caller[2])  # caller 2: only the 3-caller step
    assert any(t < 2 for t in by_caller[1]) and any(t > 2.99 for t in by_caller[1])  # idle in the dip, then back


def test_ramp_phases_and_calls_per_caller_stay_as_before() -> None:
    ramp = LoadTestConfig(callers=4, ramp_up_s=8, hold_s=10, ramp_down_s=8)
    assert ramp.phases() == [("ramp-up", 0, 8, "1->4"), ("hold", 8, 18, "4"), ("ramp-down", 18, 26, "4->1"),
                             ("cooldown", 26, None, "0")]
    assert LoadTestConfig().phases() == [("hold", 0, 30, "4"), ("cooldown", 30, None, "0")]
    assert LoadTestConfig(schedule=STEPS).phases()[2] == ("step 3", 60, 150, "10")
    flat = LoadTestConfig(callers=2, hold_s=0)
    assert flat.phases() == [("cooldown", 0, None, "0")]
    assert next_active(1, 0, flat) is None  # an empty window: the caller still makes its one call


def _scaling(t: float) -> dict[str, dict[str, Any]]:
    llm = 1 + (t >= 12)
    return {"LLM": {"running": llm, "target": 2, "desired": 2, "max": 3, "signals": {"ttft_ms": 900.0},
                    "demands": {"ongoing": 0.5, "ttft_ms": llm + 1.0}},
            "Gateway": {"running": 1, "target": 1, "desired": 1, "max": 2, "signals": {"sessions": 2.0}}}


def _scaling_report() -> LoadTestReport:
    """Schedule 1 caller, 3 from 10 s, 0 from 20 s; refusals at 10-11 s and 19 s, one cut call."""
    cfg = LoadTestConfig(schedule=[(0, 1), (10, 3), (20, 0)], cooldown_s=5)
    calls = [
        CallRecord(0, 0, 0.0, 9.0, "OK", turns_planned=2, turns_done=2, admitted=True),
        CallRecord(0, 1, 10.0, 19.0, "OK", turns_planned=2, turns_done=2, admitted=True),
        CallRecord(1, 0, 10.1, 10.2, "RESOURCE_EXHAUSTED", "busy", turns_planned=2, admitted=False, lost=True),
        CallRecord(2, 0, 11.0, 11.1, "UNAVAILABLE", "down", turns_planned=2, admitted=False, lost=True),
        CallRecord(1, 1, 12.0, 21.0, "UNAVAILABLE", "replica gone", turns_planned=2, turns_done=1, admitted=True,
                   lost=True),  # admitted, then lost: cut
        CallRecord(2, 1, 19.0, 19.1, "RESOURCE_EXHAUSTED", "busy", turns_planned=2),  # an older report: no flag
        CallRecord(2, 2, 15.0, 16.0, "INTERNAL", "bug", turns_planned=2, admitted=False),  # not a refusal, not cut
    ]
    turns = [TurnRecord(0, 0, 0, "q", 3.0, answered=True, voice_to_voice_ms=700),
             TurnRecord(0, 0, 1, "q", 7.0, answered=True, voice_to_voice_ms=900),
             TurnRecord(0, 1, 0, "q", 13.0, answered=True, voice_to_voice_ms=1500),
             TurnRecord(0, 1, 1, "q", 17.0, answered=True, voice_to_voice_ms=2500),
             TurnRecord(1, 1, 0, "q", 15.0, answered=True, voice_to_voice_ms=2000),
             TurnRecord(1, 1, 1, "q", 21.0, error_code="NO_ANSWER")]
    timeline = [Sample(float(t), min(target_callers(t, cfg), 2), target_callers(t, cfg), 0,
                       {"LLM": 1 + (t >= 12), "Gateway": 1}, _scaling(t) if 5 <= t < 22 else None)
                for t in range(26)]
    return LoadTestReport(config=cfg.to_dict(), started_at="now", duration_s=25.5, turns=turns, calls=calls,
                          timeline=timeline)


def test_refusals_and_cut_calls_are_told_apart() -> None:
    report = _scaling_report()
    c = report.calls
    assert [call_refused(x) for x in c] == [False, False, True, True, False, True, False]
    assert [call_cut(x, call_refused(x)) for x in c] == [False, False, False, False, True, False, False]
    assert not call_refused(c[5], answered=True)  # an older report's call with an answered turn was admitted
    assert not call_cut(CallRecord(0, 0, 0, 1, "CUT", lost=True, admitted=True))  # stopped by the test itself


def test_phase_summary_counts_refusals_cuts_latency_and_replicas_per_phase() -> None:
    report = _scaling_report()
    s = summary_dict(report)
    step1, step2, cool = s["phases"]
    assert [p["phase"] for p in s["phases"]] == ["step 1", "step 2", "cooldown"]
    assert (step1["start_s"], step1["end_s"], step2["end_s"], cool["end_s"]) == (0, 10, 20, 25.5)
    assert [p["wanted"] for p in s["phases"]] == ["1", "3", "0"]
    assert [p["calls_started"] for p in s["phases"]] == [1, 6, 0]
    assert [p["calls_refused"] for p in s["phases"]] == [0, 3, 0]
    assert [p["calls_cut"] for p in s["phases"]] == [0, 0, 1]  # by when it ended
    assert (step1["v2v_p50_ms"], step1["v2v_p95_ms"]) == (800, pytest.approx(890))
    assert step2["turns_timed"] == 3 and step2["v2v_p50_ms"] == 2000 and cool["v2v_p50_ms"] is None
    assert step1["max_replicas"] == {"LLM": 1, "Gateway": 1} and step2["max_replicas"] == {"LLM": 2, "Gateway": 1}
    assert list(step2["max_replicas"]) == ["LLM", "Gateway"]  # pipeline order
    r = s["refusals"]
    assert (r["n"], r["by_code"], r["first_s"], r["last_s"]) == (
        3, {"RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}, 10.1, 19.0)
    assert r["spans"] == [[10.1, 11.0, 2], [19.0, 19.0, 1]]
    assert s["calls_cut_by_scale_down"] == 1 and s["cut_times_s"] == [21.0]
    text = summarize(report)
    assert "callers wanted" in text and "max LLM" in text
    assert "calls refused at session start: 3 (RESOURCE_EXHAUSTED 2, UNAVAILABLE 1); first at 10.1 s, last at " \
           "19.0 s; at 10-11 s (2), 19 s (1)" in text
    assert "calls cut by scale-down (admitted, then lost or ended with an error): 1 at 21 s" in text
    row = next(line for line in text.splitlines() if line.startswith("step 2"))
    assert row.split() == ["step", "2", "10-20", "3", "6", "3", "0", "2000", "2450", "2", "1"]
    md = summarize(report, markdown=True)
    assert "| step 2 | 10-20 | 3 | 6 | 3 | 0 | 2000 | 2450 | 2 | 1 |" in md


def test_phase_summary_without_scaling_or_with_an_unknown_config() -> None:
    report = _report()  # replicas only, no schedule: the default hold, then the cooldown
    s = summary_dict(report)
    assert [p["phase"] for p in s["phases"]] == ["hold", "cooldown"]
    assert s["phases"][0]["max_replicas"] == {"ASR": 2, "LLM": 1}
    assert s["refusals"]["n"] == 1  # its RESOURCE_EXHAUSTED call (no flag, no answered turn)
    report.config = {"callers": 2, "some_field_of_another_version": 1}
    assert [p["phase"] for p in summary_dict(report)["phases"]] == ["whole test"]


def test_scaling_json_round_trip_and_old_files(tmp_path: Path) -> None:
    report = _scaling_report()
    report.scaling_note = "read from Ray's GCS key-value store (17 of 26 samples)"
    paths = write_outputs(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["timeline"][12]["scaling"]["LLM"]["demands"] == {"ongoing": 0.5, "ttft_ms": 3.0}
    assert data["timeline"][0]["scaling"] is None and data["calls"][2]["admitted"] is False
    again = LoadTestReport.from_dict(data)
    assert again == report
    assert summary_dict(again) == summary_dict(report) == data["summary"]
    assert "| step 2 |" in paths["summary"].read_text()
    # a file written before these fields: no scaling, no admitted flag, no scaling note
    for sample in data["timeline"]:
        del sample["scaling"]
    for call in data["calls"]:
        del call["admitted"]
    del data["scaling_note"]
    old = LoadTestReport.from_dict(data)
    assert all(x.scaling is None for x in old.timeline) and old.calls[2].admitted is None
    assert summary_dict(old)["refusals"]["n"] == 3
    assert plot(old, tmp_path / "old.png").stat().st_size > 0


def test_plot_with_and_without_scaling_data(tmp_path: Path) -> None:
    report = _scaling_report()
    assert plot(report, tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    for sample in report.timeline:  # replicas from the autoscaler's records only
        sample.replicas = None
    assert plot(report, tmp_path / "records.png").stat().st_size > 0
    for sample in report.timeline:
        sample.scaling = None
    report.replica_note, report.scaling_note = "no Ray cluster", ""
    assert plot(report, tmp_path / "none.png").stat().st_size > 0
    report.timeline, report.calls, report.turns = [], [], []
    assert plot(report, tmp_path / "empty.png").stat().st_size > 0


def test_replica_poller_reads_the_autoscalers_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments import autoscaling

    now = time.time()
    records = {"LLM": {"t": now, "running": 1, "target": 2, "desired": 2, "max": 3, "signals": {"ttft_ms": 900.0},
                       "demands": {"ttft_ms": 2.0}, "min": 1, "ongoing": 3},
               "ASR": {"t": now - 60, "running": 1, "target": 1, "desired": 1, "max": 2, "signals": {}}}  # stale

    def refresh(self: autoscaling.ScalingView) -> dict[str, dict[str, Any]]:
        self.records = {k: v for k, v in records.items() if k in self.deployments}
        return self.records

    monkeypatch.setattr(autoscaling.ScalingView, "refresh", refresh)
    poller = ReplicaPoller("voxserve")
    monkeypatch.setattr(poller, "poll", lambda: {"LLM": 1, "ASR": 1, "Gateway": 1})
    replicas, scaling = poller.sample()
    assert replicas == {"LLM": 1, "ASR": 1, "Gateway": 1}
    assert scaling == {"LLM": {"running": 1, "target": 2, "desired": 2, "max": 3, "signals": {"ttft_ms": 900.0},
                               "demands": {"ttft_ms": 2.0}}}
    assert poller.scaling_note == ""
    records.clear()
    assert poller.sample()[1] is None and "published no fresh decisions" in poller.scaling_note
    monkeypatch.setattr(poller, "poll", lambda: None)  # no such app: no decisions asked for
    assert poller.sample() == (None, None)


def test_replica_poller_without_the_server_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "deployments.autoscaling", None)
    poller = ReplicaPoller("voxserve")
    assert poller.poll_scaling(["LLM"]) is None and "deployments.autoscaling" in poller.scaling_note
    assert poller.poll_scaling(["LLM"]) is None  # not tried again


def test_cli_schedule_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loadtest", "--schedule", "0:1,30:4,60:10,150:4,180:1,210:0", "--cooldown", "30",
                              "--no-replicas"])
    cfg = config_from_args(args)
    assert (cfg.schedule, cfg.callers, cfg.cooldown_s) == (STEPS, 10, 30)
    plain = config_from_args(parser.parse_args(["loadtest"]))
    assert (plain.callers, plain.schedule, plain.hold_s) == (4, None, 30)
    with pytest.raises(SystemExit):
        parser.parse_args(["loadtest", "--schedule", "0:1,30:4"])
    assert "argument --schedule: schedule must end with a step of 0 callers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["loadtest", "--schedule", "0-1"])
    assert "argument --schedule: schedule step '0-1' must be SECONDS:CALLERS" in capsys.readouterr().err
    both = parser.parse_args(["loadtest", "--schedule", "0:2,10:0", "--callers", "2"])
    assert cmd_loadtest(both) == 2
    assert "--callers is not used with --schedule" in capsys.readouterr().err
    held = parser.parse_args(["loadtest", "--schedule", "0:2,10:0", "--hold", "5"])
    assert cmd_loadtest(held) == 2
    assert "must be left at their defaults with a schedule" in capsys.readouterr().err
    help_text = sub.format_help()
    assert "--schedule T:N,..." in help_text and "0:1,30:4,60:10,150:4,180:1,210:0" in help_text


# --- metrics dispatch -----------------------------------------------------------------------------


class _Fake:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, tags or {}))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, tags or {}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", value, tags or {}))


def test_gateway_metrics_record_events() -> None:
    fakes = {name: _Fake() for name in METRICS}
    m = GatewayMetrics(backend=fakes)
    m.session_started()
    m.session_started()
    lat = ev.TurnLatency(vad_end_delay_ms=510, asr_ms=120, llm_first_token_ms=60, tts_first_audio_ms=90,
                         first_audio_ms=300, voice_to_voice_ms=810, total_ms=2500, llm_tokens=20, llm_tokens_per_s=25)
    m.observe(ev.ResponseDone(response_id=1, text="hi", audio_ms=900, latency=lat))
    m.observe(ev.ResponseInterrupted(response_id=2, heard_text="a", heard_ms=10, generated_text="a b"))
    m.observe(ev.ErrorEvent(code="UNAVAILABLE", message="down"))
    m.observe(ev.TextDelta(response_id=3, text="ignored"))
    m.session_ended("OK")
    m.session_ended("INVALID_ARGUMENT")
    assert [c[1] for c in fakes["voxserve_sessions_active"].calls] == [1, 2, 1, 0]
    stages = {c[2]["stage"]: c[1] for c in fakes["voxserve_stage_latency_ms"].calls}
    assert stages == {"vad_end": 510, "asr": 120, "llm_first_token": 60, "tts_first_audio": 90}
    assert [c[1] for c in fakes["voxserve_voice_to_voice_ms"].calls] == [810]
    assert [c[2]["outcome"] for c in fakes["voxserve_turns_total"].calls] == ["done", "interrupted", "error"]
    assert len(fakes["voxserve_barge_ins_total"].calls) == 1
    assert [c[2] for c in fakes["voxserve_errors_total"].calls] == [
        {"code": "UNAVAILABLE", "where": "turn"}, {"code": "INVALID_ARGUMENT", "where": "stream"}]
    assert [c[2]["status"] for c in fakes["voxserve_sessions_total"].calls] == ["OK", "INVALID_ARGUMENT"]


def test_stage_metrics_time_requests_and_failures() -> None:
    fakes = {name: _Fake() for name in METRICS}
    m = StageMetrics("asr", backend=fakes)
    with m.time("transcribe"):
        pass
    with pytest.raises(InvalidArgument), m.time("transcribe"):
        raise InvalidArgument("bad audio")
    statuses = [c[2]["status"] for c in fakes["voxserve_stage_requests_total"].calls]
    assert statuses == ["OK", "INVALID_ARGUMENT"]
    assert all(c[2] == {"stage": "asr", "method": "transcribe"} for c in fakes["voxserve_stage_request_ms"].calls)


def test_ray_metrics_can_be_created_outside_a_replica() -> None:
    m = GatewayMetrics()  # real ray.serve.metrics objects; recording without a cluster is a no-op
    m.session_started()
    m.turn_latency(ev.TurnLatency(asr_ms=100, voice_to_voice_ms=900))
    m.session_ended("OK")
    StageMetrics("tts").record("synthesize", 12.0)


# --- a short real load test -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    from deployments.profiles import load_serve_config
    from deployments.server import free_port, start_local

    srv = start_local(load_serve_config("cpu"), grpc_port=free_port())
    yield srv
    srv.stop()


@pytest.mark.serve
@pytest.mark.timeout(900)
async def test_short_load_test_answers_every_turn(server: Any, tmp_path: Path) -> None:
    cfg = LoadTestConfig(address=server.grpc_address, callers=2, ramp_up_s=2, hold_s=0, turns_per_call=2,
                         calls_per_caller=1, pause_s=0.5, max_duration_s=240, turn_timeout_s=60,
                         progress=False, out_dir=str(tmp_path))
    report = await run_loadtest(cfg)
    summary = summary_dict(report)
    assert summary["errors"] == {}, summarize(report)
    assert [c.status for c in report.calls] == ["OK", "OK"]
    assert len(report.turns) == 4 and all(t.answered and t.response_text for t in report.turns)
    assert all(t.transcript for t in report.turns)
    assert report.ok
    # Serve's replica counts are read from this process's Ray connection.
    assert summary["max_replicas"].get("Gateway", 0) >= 1, report.replica_note
    assert max(s.active_calls for s in report.timeline) >= 1
    paths = write_outputs(report, tmp_path)
    assert paths["png"].stat().st_size > 0

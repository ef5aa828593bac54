"""Load tester: pure summary/schedule/guard logic, metrics dispatch, and a short real load test.

The real run asserts correctness only (every turn answered, no errors, replicas recorded),
never speed: timings belong in scripts/bench_*.py.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.errors import InvalidInput, MissingPackage
from clients.loadtest import caller_window, check_address, classify_error, run_loadtest, target_callers
from clients.loadtest_cli import add_parser, cmd_loadtest, config_from_args
from clients.loadtest_config import InvalidLoadTestConfig, LoadTestConfig
from clients.loadtest_report import (
    CallRecord,
    LoadTestReport,
    Sample,
    TurnRecord,
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

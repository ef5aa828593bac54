"""Sessions that survive their replica, on the real app (a local Ray Serve, the real models): the
only Gateway replica is killed with SIGKILL mid-conversation and the call resumes once Serve has
restarted it; a rolling redeploy of the Gateway drains its sessions onto the new replica; a
forged token restores nothing. The fake-stage rules are in test_resume.py."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest

from clients.resume import Backoff, converse_resuming
from clients.voice_client import UserTurn, VoiceClient
from protos.voxserve.v1 import voice_pb2 as pb
from tests.conftest import handle, say

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]

CONFIG = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=16000, language="en", max_response_tokens=24)
OPTIONS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    from deployments.profiles import load_serve_config
    from deployments.server import free_port
    from tests.graph_app import start_observed

    config = load_serve_config("cpu")
    OPTIONS["config"] = config
    srv = start_observed(config, grpc_port=free_port(), app_overrides={"sessions": {"drain_timeout_s": 5}})
    yield srv
    srv.stop()


def gateway_pids() -> list[int]:
    return [int(handle("Gateway").pid.remote().result(timeout_s=30))]


def kill_gateway_after(events: list[str], kind: str, n: int) -> threading.Thread:
    """SIGKILL the Gateway replica's process once ``n`` events of ``kind`` arrived."""
    def run() -> None:
        deadline = time.monotonic() + 120
        while sum(1 for e in events if e == kind) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in gateway_pids():
            os.kill(pid, signal.SIGKILL)
        events.append("killed")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_kill_9_of_the_only_gateway_resumes_the_call_with_its_history(server) -> None:  # type: ignore[no-untyped-def]
    events: list[str] = []
    client = VoiceClient(server.grpc_address)
    turns = [UserTurn(text="What is the capital of France?", label="q1"),
             UserTurn(text="And what is the capital of Italy?", label="q2"),
             UserTurn(text="Which of the two cities is larger?", label="q3")]
    killer = kill_gateway_after(events, "response_done", 1)
    try:
        result, report = await converse_resuming(client, turns, CONFIG, backoff=Backoff(give_up_s=120),
                                                 on_event=lambda e: events.append(e.WhichOneof("event") or ""),
                                                 wait_playback=False)
    finally:
        await client.close()
    killer.join(5)
    assert "killed" in events
    assert report.resumes >= 1 and not report.lost, (report, result.status, result.details)
    assert report.turns_lost == 0, [(t.label, t.error) for t in result.turns]
    assert [t.label for t in result.turns] == ["q1", "q2", "q3"]
    assert all(t.response_text.strip() for t in result.turns)
    assert result.extra_answers == 0
    assert result.resumed and result.session_id
    history = await handle("Gateway").session_history.remote(result.session_id)
    users = [m["content"] for m in history if m["role"] == "user"]
    # one history on the new replica: the turn before the kill restored, each later one once
    assert users == [t.text for t in turns], history


async def test_a_forged_or_foreign_token_restores_nothing(server) -> None:  # type: ignore[no-untyped-def]
    client = VoiceClient(server.grpc_address)
    try:
        first = await client.converse([UserTurn(text="Remember the word banana.")], CONFIG, wait_playback=False)
        assert first.status == "OK" and first.resume_token
        head, sig = first.resume_token.split(".")
        for token, code in ((head + "." + sig[:-2] + "AA", "PERMISSION_DENIED"),
                            ("not-a-token", "PERMISSION_DENIED"),):
            cfg = pb.SessionConfig()
            cfg.CopyFrom(CONFIG)
            cfg.resume_token = token
            got = await client.converse([UserTurn(text="What word?")], cfg, wait_playback=False)
            assert got.status == code, (got.status, got.details)
            assert not got.session_id and not any(t.response_text for t in got.turns)
        again = pb.SessionConfig()
        again.CopyFrom(CONFIG)
        again.resume_token = first.resume_token
        resumed = await client.converse([UserTurn(text="Thanks.")], again, wait_playback=False)
        assert resumed.status == "OK" and resumed.session_id == first.session_id and resumed.restored_turns == 2
    finally:
        await client.close()


async def test_a_rolling_redeploy_moves_the_call_without_dropping_it(server) -> None:  # type: ignore[no-untyped-def]
    """A changed Gateway config: Serve starts a new replica and stops the old one, which drains:
    SessionMoved at a turn boundary, then the client resumes on the new replica."""
    from ray import serve

    from deployments.app import build_app
    from deployments.config import merged
    from tests.graph_app import OBSERVED

    events: list[str] = []
    client = VoiceClient(server.grpc_address)
    turns = [UserTurn(text=q, label=f"q{i}") for i, q in enumerate(
        ["Hello, who are you?", "Name a color.", "Name a fruit.", "Name an animal.", "Name a country."])]

    async def redeploy_after_first_answer() -> None:
        while "response_done" not in events:
            await asyncio.sleep(0.05)
        app = OPTIONS["config"]["applications"][0]
        options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
        for name, extra in OBSERVED.items():
            options[name] = {**options.get(name, {}), **extra}
        gateway = options["Gateway"]
        gateway["ray_actor_options"] = {**gateway.get("ray_actor_options", {}), "num_cpus": 0.26}
        args = merged(app.get("args", {}), {"sessions": {"drain_timeout_s": 5}})
        await asyncio.to_thread(serve.run, build_app(args, options), name=server.app_name, route_prefix="/",
                                blocking=False)

    redeploy = asyncio.create_task(redeploy_after_first_answer())
    try:
        result, report = await converse_resuming(client, turns, CONFIG, backoff=Backoff(give_up_s=120),
                                                 on_event=lambda e: events.append(e.WhichOneof("event") or ""),
                                                 pause_ms=1500, wait_playback=False)
    finally:
        await client.close()
        await redeploy
    assert "session_moved" in events, events
    assert report.resumes >= 1 and not report.lost and report.turns_lost == 0, report
    assert result.extra_answers == 0
    assert [t.label for t in result.turns] == [t.label for t in turns]
    assert all(t.response_text.strip() for t in result.turns), [
        (t.label, t.restored, t.answered, t.interrupt_reason, t.error, t.response_text) for t in result.turns]


# --- stage replicas -------------------------------------------------------------------------------------


def kill_stage(name: str) -> None:
    """Kill the stage's only replica as a crash would (Serve then starts another)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"#{name}#" in a["name"]]
    assert names, f"no {name} replica"
    for actor in names:
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)


async def health(address: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.5)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_a_dead_tts_gives_an_error_event_soon_not_seconds_of_silence(server) -> None:  # type: ignore[no-untyped-def]
    events: list[tuple[float, str]] = []
    client = VoiceClient(server.grpc_address)
    killed: list[float] = []

    def on_event(e: pb.ServerEvent) -> None:
        kind = e.WhichOneof("event") or ""
        events.append((time.monotonic(), kind))
        if kind == "audio" and not killed:
            killed.append(time.monotonic())
            threading.Thread(target=kill_stage, args=("TTS",), daemon=True).start()

    try:
        cfg = pb.SessionConfig()
        cfg.CopyFrom(CONFIG)
        cfg.max_response_tokens = 80
        result = await client.converse([UserTurn(text="Tell me a long story about a dragon and a knight.")], cfg,
                                       on_event=on_event, wait_playback=False)
    finally:
        await client.close()
    assert killed
    after = [(t, k) for t, k in events if t > killed[0]]
    ends = [t for t, k in after if k in ("error", "response_done", "response_interrupted")]
    assert ends, [k for _, k in after]
    audio_times = [killed[0]] + [t for t, k in after if k == "audio"]
    gaps = np.diff([*audio_times, ends[0]])
    # either the answer went on (a retried chunk) or it ended with an error: never a long silence
    assert gaps.max() < 6.0, (gaps.max(), [k for _, k in after][:20], result.turns[0].error)
    await until_serving(server.grpc_address)


async def until_serving(address: str, within_s: float = 90) -> float:
    t0 = time.monotonic()
    while await health(address) != "SERVING":
        assert time.monotonic() - t0 < within_s, "the app did not come back"
        await asyncio.sleep(0.25)
    return time.monotonic() - t0


async def test_a_dead_asr_turns_health_not_serving_then_admission_reopens(server) -> None:  # type: ignore[no-untyped-def]
    await until_serving(server.grpc_address)
    kill_stage("ASR")
    seen: list[str] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and "NOT_SERVING" not in seen:
        seen.append(await health(server.grpc_address))
        await asyncio.sleep(0.1)
    assert "NOT_SERVING" in seen and "DEADLINE_EXCEEDED" not in seen, seen
    client = VoiceClient(server.grpc_address)
    try:
        refused = await client.converse([UserTurn(text="Hello?")], CONFIG, wait_playback=False)
        assert refused.status in ("UNAVAILABLE", "OK"), (refused.status, refused.details)  # never RESOURCE_EXHAUSTED
        await until_serving(server.grpc_address)
        answered = await client.converse([UserTurn(audio=say("What is the capital of France?"))], CONFIG,
                                         wait_playback=False)
        assert answered.status == "OK", (answered.status, answered.details)
        assert answered.turns[0].response_text.strip()
    finally:
        await client.close()

"""SessionHub (shared by the gRPC and realtime adapters): admission, system-prompt check, health,
history registry; on fake stages (the real ones run in test_graph.py and test_realtime_graph.py)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from deployments.config import AppArgs
from deployments.sessions import LatencyWindow, SessionHub
from services.conversation import SessionSettings
from services.conversation.events import TurnLatency
from services.errors import OutOfRange, ResourceExhausted
from tests.fakes import FakeStages


class HubStages(FakeStages):
    def __init__(self) -> None:
        super().__init__()
        self.alive = True

    async def info(self) -> dict[str, Any]:
        if not self.alive:
            raise RuntimeError("a stage is down")
        return {"voice_rate": 22050, "llm_model": "fake", "asr_model": "fake", "speech_native": False}

    async def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def replicas_running(self) -> None:
        pass  # in-process stages: their replica is this one


def hub(**gateway: Any) -> SessionHub:
    return SessionHub(AppArgs.model_validate({"gateway": gateway}), HubStages())


def test_latency_window_forgets_old_answers() -> None:
    now = [0.0]
    window = LatencyWindow(30, clock=lambda: now[0])
    for ms in (100, 200, 300, 400, 5000):
        window.add(ms)
    # one slow answer in five lifts the p95 most of the way (numpy's linear interpolation, as
    # everywhere else in the project): 400 + 0.8 * (5000 - 400)
    assert window.p95() == pytest.approx(4080) and window.p95(min_samples=6) is None
    now[0] = 31
    assert window.p95(min_samples=1) is None


async def test_admission_refuses_at_once_with_a_retry_hint() -> None:
    h = hub(max_sessions=2, retry_after_s=3)
    settings = SessionSettings()
    async with h.session(settings), h.session(settings):
        with pytest.raises(ResourceExhausted) as info:
            h.admit()
        assert info.value.retry_after_s == 3 and "retry in 3 s" in info.value.message
    assert h.active == 0
    h.admit()  # room again


async def test_admission_sheds_load_while_answers_are_slow() -> None:
    h = hub(admission_first_audio_ms=1000)
    async with h.session(SessionSettings()):
        for _ in range(5):
            h.observer.answered(TurnLatency(first_audio_ms=2500))
        with pytest.raises(ResourceExhausted, match="answers take 2500 ms"):
            h.admit()
        assert h.stats()["first_audio_p95_ms"] == 2500
    h.admit()  # with no session running, a new one is always let in


async def test_after_shedding_callers_come_back_one_at_a_time() -> None:
    now = [0.0]
    h = hub(admission_first_audio_ms=1000, admission_window_s=30, retry_after_s=2, max_system_prompt_tokens=16)
    h.first_audio = LatencyWindow(30, clock=lambda: now[0])
    settings = SessionSettings()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(h.session(settings))
        for _ in range(5):
            h.observer.answered(TurnLatency(first_audio_ms=2500))
        now[0] = 10.0
        with pytest.raises(ResourceExhausted, match="answers take"):
            h.admit()
        now[0] = 31.0  # the slow answers aged out: too few answers to judge
        h.admit()  # the gateway's early check is a pure check...
        await stack.enter_async_context(h.session(settings))  # ...so one caller comes back
        with pytest.raises(ResourceExhausted, match="recovering from overload"):
            await stack.enter_async_context(h.session(settings))  # not the whole herd at once
        now[0] = 33.5  # a retry interval later: a session that fails to open...
        with pytest.raises(OutOfRange):
            await stack.enter_async_context(h.session(SessionSettings(system_prompt="word " * 40)))
        await stack.enter_async_context(h.session(settings))  # ...did not use up the slot
        now[0] = 62.0  # long after the last refusal: judged as usual again
        await stack.enter_async_context(h.session(settings))
        await stack.enter_async_context(h.session(settings))
        assert h.active == 5
    assert h.active == 0


async def test_system_prompt_over_the_token_limit() -> None:
    h = hub(max_system_prompt_tokens=16)
    with pytest.raises(OutOfRange, match="17 tokens"):
        async with h.session(SessionSettings(system_prompt="word " * 17)):
            pass
    assert h.active == 0


async def test_health_follows_the_stages() -> None:
    h = hub()
    assert await h.healthy()
    h.stages.alive = False  # type: ignore[attr-defined]
    h._health = (0.0, True)  # the verdict is reused for 2 s: pretend it expired
    assert not await h.healthy()


async def test_history_of_ended_sessions_is_kept() -> None:
    h = hub()
    async with h.session(SessionSettings(system_prompt="be nice")) as conv:
        session_id = conv.session_id
        assert h.history(session_id) == [{"role": "system", "content": "be nice"}]
    assert h.history(session_id) == [{"role": "system", "content": "be nice"}] and not h.live

"""Pacing: an answer with seconds of speech in hand yields the CPU to one that is behind.

The rule on a fake clock, then the real CTranslate2 engine (SmolLM2-135M int8), proven by its
state: a far-ahead generation stops producing tokens while another request is behind, goes on
when nobody is behind, and a stop reaches it while it waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.llm import LLMConfig
from services.llm_ctranslate2 import CT2Engine
from services.llm_engines import create_llm_engine
from services.llm_pacing import Pacer
from tests.conftest import until

STORY = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pacer(clock: Clock, workers: int = 8) -> Pacer:
    return Pacer(yield_lead_s=3.0, urgent_lead_s=1.0, chars_per_s=15.0, workers=workers, clock=clock)


def test_an_answer_far_ahead_waits_for_one_with_no_words_yet() -> None:
    clock = Clock()
    p = pacer(clock)
    p.add("ahead")
    p.delivered("ahead", 15)  # 1 s of speech at t=100
    clock.now += 0.2
    p.delivered("ahead", 90)  # 6 s of speech, 0.2 s of it heard: 5.8 s in hand
    assert not p.should_wait("ahead")  # nobody is behind
    p.add("new")  # a caller waiting for a first word
    assert p.should_wait("ahead") and not p.should_wait("new")
    p.delivered("new", 30)  # 2 s in hand: no longer behind
    assert not p.should_wait("ahead")


def test_an_answer_about_to_run_dry_is_served_first() -> None:
    clock = Clock()
    p = pacer(clock)
    p.add("ahead")
    p.add("thin")
    p.delivered("ahead", 90)  # 6 s
    p.delivered("thin", 30)  # 2 s
    clock.now += 1.5  # thin: 0.5 s left, ahead: 4.5 s left
    assert p.should_wait("ahead") and not p.should_wait("thin")
    clock.now += 1.6  # ahead is down to 2.9 s: it goes on, whoever is behind
    assert not p.should_wait("ahead")


def test_nobody_waits_while_a_request_is_queued_for_a_worker() -> None:
    clock = Clock()
    p = pacer(clock, workers=2)
    for rid in ("ahead", "new", "queued"):
        p.add(rid)
    p.delivered("ahead", 150)
    assert not p.should_wait("ahead")  # its pause would hold the worker "queued" waits for
    p.remove("queued")
    assert p.should_wait("ahead")


def test_off_when_the_lead_mark_is_zero() -> None:
    clock = Clock()
    p = Pacer(yield_lead_s=0.0, urgent_lead_s=0.0, chars_per_s=15.0, workers=8, clock=clock)
    p.add("ahead")
    p.add("new")
    p.delivered("ahead", 1000)
    assert not p.should_wait("ahead")


def test_a_stop_ends_the_wait_at_once_and_the_wait_is_counted() -> None:
    p = Pacer(yield_lead_s=3.0, urgent_lead_s=1.0, chars_per_s=15.0, workers=8)
    p.add("ahead")
    p.add("new")
    p.delivered("ahead", 1500)  # 100 s in hand
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    p.wait("ahead", stop)
    assert 0.15 < time.monotonic() - t0 < 1.0
    p.remove("ahead")
    assert p.yields == 1 and p.yielded_s >= 0.15


def test_marks_in_the_wrong_order_are_refused() -> None:
    with pytest.raises(ValueError, match="urgent_lead_s"):
        LLMConfig(yield_lead_s=1.0, urgent_lead_s=2.0)
    LLMConfig(yield_lead_s=0.0, urgent_lead_s=2.0)  # pacing off: the urgent mark is unused


# --- the real engine ---------------------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine() -> AsyncIterator[CT2Engine]:
    # half a character a second: one word puts an answer seconds ahead of its playback
    eng = await create_llm_engine(LLMConfig(engine="ctranslate2", max_model_len=512, seed=0, max_tokens=96,
                                            speech_chars_per_s=0.5))
    assert isinstance(eng, CT2Engine)
    yield eng
    eng.shutdown()


class Reader:
    """Reads a stream in a task of its own (a timed-out read would cancel, and so abort, it)."""

    def __init__(self, stream: AsyncIterator[str]) -> None:
        self.text = ""
        self.task = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: AsyncIterator[str]) -> None:
        async for delta in stream:
            self.text += delta

    async def until_quiet(self, quiet_s: float = 0.5, limit_s: float = 20.0) -> str:
        """The text once nothing came for ``quiet_s`` (a paused or finished generation)."""
        seen, t0 = -1, time.monotonic()
        while (not self.text or len(self.text) != seen) and time.monotonic() - t0 < limit_s:
            seen = len(self.text)
            await asyncio.sleep(quiet_s)
        return self.text


@pytest.mark.asyncio(loop_scope="session")
async def test_the_engine_pauses_an_answer_far_ahead_while_another_is_behind(engine: CT2Engine) -> None:
    engine.pacer.add("behind")  # a request with no words yet, as one in its prefill
    try:
        async with engine.stream_chat(STORY, temperature=0, request_id="ahead") as stream:
            reader = Reader(stream)
            paused = await reader.until_quiet()  # a few words, then seconds of speech ahead: it waits
            assert 0 < len(paused) < 80 and not reader.task.done(), paused
            await asyncio.sleep(0.5)
            assert engine.num_unfinished_requests() == 1  # still running: waiting, not stopped
            assert reader.text == paused
            engine.pacer.remove("behind")  # nobody behind: it goes on to the end
            await asyncio.wait_for(reader.task, 30)
    finally:
        engine.pacer.remove("behind")
    assert len(reader.text) > len(paused)
    assert stream.stats is not None and stream.stats.finish_reason in ("stop", "length")
    # the worker closes CTranslate2's job just after the last token
    await until(lambda: engine.num_unfinished_requests() == 0, within_s=1.0)
    assert stream.stats.yielded_s > 0.8
    assert engine.pacing()["yields"] >= 1


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cancelled_answer_stops_while_it_waits(engine: CT2Engine) -> None:
    engine.pacer.add("behind")
    try:
        async with engine.stream_chat(STORY, temperature=0, request_id="waiting") as stream:
            reader = Reader(stream)
            assert await reader.until_quiet() and not reader.task.done()
            assert engine.num_unfinished_requests() == 1  # waiting for the one behind
            reader.task.cancel()  # as a barge-in cancels the task that reads the answer
            await asyncio.gather(reader.task, return_exceptions=True)
        # the waiting generation stops within a poll or two
        await until(lambda: engine.num_unfinished_requests() == 0, within_s=1.0)
    finally:
        engine.pacer.remove("behind")

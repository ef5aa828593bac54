"""The caller's playout buffer: how the server estimates it, and how TTS work is ordered by it.

Fake stages (``tests.fakes``) share one ``DeadlineSlots`` the way every session shares the TTS
replica's CPU; the real engine's ordering is tested in test_tts.py.
"""

from __future__ import annotations

import asyncio
import math
import threading

import numpy as np
import pytest

from deployments.metrics import GatewayMetrics
from services.chunking import ChunkerConfig, TextChunker
from services.conversation import events as ev
from services.conversation.settings import Playout, TurnDetection
from services.conversation.turn import PlaybackClock
from services.deadline_slots import NO_DEADLINE, DeadlineSlots, deadline_in
from tests.fakes import FakeStages, silence
from tests.test_conversation import Harness, question

# --- the slots ------------------------------------------------------------------------------------


def _queue(slots: DeadlineSlots, deadlines: list[float]) -> tuple[list[float], list[threading.Thread]]:
    """Threads waiting for ``slots`` (held by the caller), one per deadline, queued in list order."""
    granted: list[float] = []
    threads = []
    for d in deadlines:
        def take(d: float = d) -> None:
            slots.acquire(d)
            granted.append(d)
            slots.release()
        t = threading.Thread(target=take)
        t.start()
        threads.append(t)
        while slots.waiting < len(threads):  # queued before the next one arrives
            threading.Event().wait(0.001)
    return granted, threads


@pytest.mark.parametrize(("order", "expected"), [("deadline", [1.0, 2.0, 3.0, NO_DEADLINE]),
                                                 ("fifo", [3.0, NO_DEADLINE, 1.0, 2.0])])
def test_slots_go_earliest_deadline_first_or_in_arrival_order(order: str, expected: list[float]) -> None:
    slots = DeadlineSlots(1, order)  # type: ignore[arg-type]
    assert slots.acquire(-math.inf)
    granted, threads = _queue(slots, [3.0, NO_DEADLINE, 1.0, 2.0])
    slots.release()
    for t in threads:
        t.join(5)
    assert granted == expected and slots.granted == 5


def test_a_stopped_waiter_leaves_the_queue_and_takes_no_slot() -> None:
    slots = DeadlineSlots(1)
    assert slots.acquire()
    stop = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(slots.acquire(0.0, stop)))
    t.start()
    while not slots.waiting:
        threading.Event().wait(0.001)
    stop.set()
    t.join(5)
    assert result == [False] and slots.waiting == 0
    slots.release()
    assert slots.acquire(1.0)  # the slot is free again
    slots.release()
    with pytest.raises(ValueError):
        slots.release()


def test_deadline_in_turns_slack_into_a_local_deadline() -> None:
    assert deadline_in(None) == NO_DEADLINE == deadline_in(math.inf)
    assert deadline_in(0.5, now=10.0) == 10.5 and deadline_in(-1.0, now=10.0) == 9.0


# --- the server's view of the buffer --------------------------------------------------------------


def test_a_client_that_plays_nothing_never_stalls() -> None:
    now = [0.0]
    clock = PlaybackClock("none", clock=lambda: now[0])
    clock.on_sent(100)
    now[0] = 5.0
    clock.on_sent(100)
    assert clock.underruns == 0 and clock.underrun_ms == 0


def test_playback_clock_counts_underruns_and_restarts_playback_after_one() -> None:
    now = [0.0]
    clock = PlaybackClock("estimate", clock=lambda: now[0])
    clock.on_sent(1000)
    now[0] = 0.4
    assert clock.buffer_ms() == pytest.approx(600)
    clock.on_sent(500)  # in time: 600 ms were in hand
    assert clock.underruns == 0 and clock.min_buffer_ms == pytest.approx(600)
    now[0] = 2.0  # 1500 ms sent, 2000 ms elapsed: dry for 500 ms
    assert clock.slack_s(clock.sent_ms) == pytest.approx(-0.5)  # the caller has heard 500 ms of silence
    clock.on_sent(1000)
    assert clock.underruns == 1 and clock.underrun_ms == pytest.approx(500) and clock.min_buffer_ms == 0
    now[0] = 2.2  # playback went on from where it stopped, not from the wall clock
    assert clock.played_ms() == pytest.approx(1700) and clock.buffer_ms() == pytest.approx(800)
    assert clock.slack_s(produced_ms=clock.sent_ms + 400) == pytest.approx(1.2)
    clock.pause()
    now[0] = 9.0
    # nothing plays while paused: the buffer left stands still
    assert clock.slack_s(clock.sent_ms) == pytest.approx(0.8) and clock.buffer_ms() == pytest.approx(800)
    clock.resume()
    clock.report(1500)  # the client is behind the estimate: its report re-anchors it
    assert clock.buffer_ms() == pytest.approx(1000)


def test_least_buffer_counts_from_the_second_chunk() -> None:
    """The first chunk's pieces go out back to back: the second piece always finds one in hand,
    which said nothing about the margin (every answer read 100 ms)."""
    now = [0.0]
    clock = PlaybackClock("estimate", clock=lambda: now[0])
    for i in range(8):
        clock.on_sent(100, chunk_start=i == 0)
    assert clock.min_buffer_ms is None
    now[0] = 0.5
    clock.on_sent(100, chunk_start=True)  # the next chunk, with 300 ms still to play
    clock.on_sent(100, chunk_start=False)
    assert clock.min_buffer_ms == pytest.approx(300)


def test_stalls_the_client_reports_count_where_the_estimate_saw_none() -> None:
    """Audio late in transit: the server sent in time, the client's player ran dry. The report
    re-anchors the estimate (which then sees no gap) and its stalls are kept."""
    now = [0.0]
    clock = PlaybackClock("estimate", clock=lambda: now[0])
    clock.on_sent(1000)
    now[0] = 0.8
    clock.on_sent(1000)
    now[0] = 1.5
    clock.report(900, underruns=1, underrun_ms=600)  # it got the second piece 600 ms late
    now[0] = 1.6
    clock.on_sent(500)
    assert clock.underruns == 0 and clock.stalls() == (1, pytest.approx(600))
    clock.report(1000, underruns=0, underrun_ms=0)  # a later report never lowers what was heard
    assert clock.stalls() == (1, pytest.approx(600))
    assert PlaybackClock("estimate").stalls() == (0, 0.0)
    clock.report(1000, underruns=9, underrun_ms=1e12)  # never more silence than time since the first audio
    assert clock.stalls() == (9, pytest.approx(1600))
    unsent = PlaybackClock("estimate")
    unsent.report(0, underruns=3, underrun_ms=500)  # nothing sent yet: nothing could stall
    assert unsent.stalls() == (0, 0.0)


async def test_answer_latency_reports_its_stalls_and_the_gateway_counts_them() -> None:
    stages = FakeStages(answer="one two three four five six seven eight nine ten eleven twelve")
    stages.tts_slots, stages.tts_s = DeadlineSlots(1), 0.9  # slower than the 600 ms a 3-word chunk plays
    chunker = ChunkerConfig(adaptive=False, next_words=3, growth=1.0)
    async with Harness(stages, chunker=chunker) as h:
        await h.conv.push_text("count to twelve")
        await h.until(lambda: h.of(ev.ResponseDone), within_s=20)
    lat = h.of(ev.ResponseDone)[0].latency
    assert lat.underruns >= 1 and lat.underrun_ms > 100 and lat.min_buffer_ms == 0
    seen: dict[str, list[float]] = {}

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
            seen.setdefault(self.name, []).append(value)

        observe = set = inc

    metrics = GatewayMetrics({name: Recorder(name) for name in GatewayMetrics._NAMES})
    metrics.turn_latency(lat)
    assert "voxserve_stalled_turns_total" not in seen  # counted when the answer ends (client reports come late)
    assert h.played_stalls == [(lat.underruns, pytest.approx(lat.underrun_ms))]
    metrics.played(*h.played_stalls[0])
    assert seen["voxserve_stalled_turns_total"] == [1]
    assert seen["voxserve_underrun_ms"] == [pytest.approx(lat.underrun_ms)]


async def test_a_stall_the_client_reports_reaches_the_latency_and_the_end_of_the_answer() -> None:
    stages = FakeStages(answer="one two three four five six seven eight nine ten eleven twelve")
    stages.tts_slots, stages.tts_s = DeadlineSlots(1), 0.3
    chunker = ChunkerConfig(adaptive=False, next_words=3, growth=1.0)
    async with Harness(stages, chunker=chunker) as h:
        await h.conv.push_text("count to twelve")
        await h.until(lambda: h.of(ev.AudioOut))
        rid = h.of(ev.AudioOut)[0].response_id
        await asyncio.sleep(0.5)  # (no more silence is believed than time has passed)
        h.conv.playback(rid, 100, underruns=1, underrun_ms=450.0)  # heard before the last audio went out
        await h.until(lambda: h.of(ev.ResponseDone), within_s=20)
        assert h.of(ev.ResponseDone)[0].latency.underrun_ms >= 450
        await asyncio.sleep(0.8)
        h.conv.playback(rid, 1500, underruns=2, underrun_ms=700.0)  # heard while the rest played
    # the conversation closed: the answer ended with everything the client said it heard
    assert h.played_stalls and h.played_stalls[0][0] >= 2 and h.played_stalls[0][1] >= 700


# --- what the conversation asks of the TTS --------------------------------------------------------


async def test_a_chunk_asked_for_ahead_is_due_after_the_words_before_it() -> None:
    """Lookahead: chunk 1 is asked for while chunk 0 (3 words) is synthesized, before any audio
    was sent; it is due 3 spoken words later than chunk 0, not at the same moment."""
    stages = FakeStages(answer="one two three. four five six.")
    stages.tts_slots, stages.tts_s = DeadlineSlots(2), 0.3
    async with Harness(stages, chunker=ChunkerConfig(adaptive=False)) as h:
        await h.conv.push_text("count")
        await h.until(lambda: h.of(ev.ResponseDone))
    first, second = stages.tts_slacks
    per_word = h.conv.settings.playout.speech_ms_per_word / 1000
    assert first is not None and second is not None
    assert second - first == pytest.approx(3 * per_word, abs=0.1)


async def test_each_chunk_carries_the_slack_of_its_caller() -> None:
    stages = FakeStages(answer="one two three. four five six. seven eight nine.")
    async with Harness(stages, chunker=ChunkerConfig(adaptive=False)) as h:
        await h.conv.push_text("count")
        await h.until(lambda: h.of(ev.ResponseDone))
    first, *later = stages.tts_slacks
    assert first is not None and first <= 0  # nothing played yet: the caller is waiting now
    assert later and all(s is not None and 0 < s <= 1.8 for s in later)  # audio in hand, at most what was made


async def test_a_speculation_is_scheduled_by_the_earliest_end_of_its_turn() -> None:
    stages = FakeStages(answer="one two three four five six", word_s=0.01)
    turn = TurnDetection(mode="silence", min_silence_ms=700, speculate_after_ms=150)
    async with Harness(stages, turn=turn) as h:
        await h.feed(np.concatenate([question(1.0, "i would like to order"), silence(0.4)]))
        await h.until(lambda: bool(stages.tts_slacks))
        assert h.counts.get("speculation_started") == 1 and not h.of(ev.AudioOut)
    # the turn can end 700 ms after the speech stopped: that is when the caller starts waiting
    assert stages.tts_slacks[0] is not None and 0 <= stages.tts_slacks[0] <= 0.7


@pytest.mark.parametrize("order", ["deadline", "fifo"])
async def test_a_caller_about_to_run_dry_is_served_before_a_speculation(order: str) -> None:
    """Two sessions share one TTS slot. A speculation asks first; a caller then waits for its
    answer. Earliest deadline first serves the waiting caller, chunk after chunk, until it has
    more audio in hand than the speculation's slack (its earliest end of turn plus 2 s); arrival
    order would serve the speculation."""
    stages = FakeStages(word_s=0.002)
    stages.answers = ["alpha beta gamma delta epsilon zeta", "one two three four five six seven eight nine ten"]
    slots = DeadlineSlots(1, order)  # type: ignore[arg-type]
    stages.tts_slots, stages.tts_s = slots, 0.03
    speculating = TurnDetection(mode="silence", min_silence_ms=700, speculate_after_ms=150)
    # the speculation may wait 2 s past its earliest end of turn
    wait = Playout(speculative_slack_ms=2000)
    async with Harness(stages, turn=speculating, playout=wait) as spec, Harness(stages) as caller:
        assert await asyncio.to_thread(slots.acquire, -math.inf)  # hold the CPU while both queue up
        await spec.feed(np.concatenate([question(1.0, "i would like to order"), silence(0.4)]))
        await spec.until(lambda: slots.waiting >= 1)  # the speculation's first chunks wait
        await asyncio.sleep(0.1)
        queued = slots.waiting
        await caller.conv.push_text("count to ten")
        await caller.until(lambda: slots.waiting > queued)  # the caller's first chunk waits behind them
        slots.release()
        await caller.until(lambda: caller.of(ev.ResponseDone))
        await caller.until(lambda: any(text.startswith("alpha") for text, _ in stages.tts_grants))
    spec_at = next(i for i, (text, _) in enumerate(stages.tts_grants) if text.startswith("alpha"))
    if order == "fifo":
        assert spec_at == 0
        return
    before = stages.tts_grants[:spec_at]
    assert len(before) >= 2 and before[0][0].startswith("one")
    speculative = stages.tts_grants[spec_at][1]
    assert speculative is not None and speculative > 1.0
    assert all(slack is not None and slack < speculative for _, slack in before)


# --- chunk sizes follow the buffer ----------------------------------------------------------------


def _chunks(buffer_ms: float | None, text: str) -> list[str]:
    chunker = TextChunker(ChunkerConfig(), (lambda: buffer_ms) if buffer_ms is not None else None)
    out: list[str] = []
    for word in text.split(" "):
        out += chunker.push(word + " ")
    return out + chunker.flush()


def test_chunks_are_small_while_the_buffer_is_thin_and_grow_when_it_is_full() -> None:
    text = " ".join(f"w{i}" for i in range(60)) + "."
    thin = _chunks(0.0, text)
    full = _chunks(12000.0, text)
    fixed = _chunks(None, text)
    assert max(len(c.split()) for c in thin[1:]) <= 6  # 2 x the smallest budget (first_max_words)
    assert max(len(c.split()) for c in full[1:]) == ChunkerConfig().max_words
    assert len(thin) > len(fixed) > len(full)
    assert " ".join(thin) == " ".join(full) == " ".join(fixed) == text  # the same words, cut elsewhere
    off = TextChunker(ChunkerConfig(adaptive=False), lambda: 0.0)
    assert [len(c.split()) for c in off.push(text + " ")] == [len(c.split()) for c in fixed[:-1]]


def test_a_stall_report_with_silence_but_no_count_is_one_stall() -> None:
    now = [0.0]
    clock = PlaybackClock("estimate", clock=lambda: now[0])
    clock.on_sent(1000)
    now[0] = 2.0
    clock.report(1000, underruns=0, underrun_ms=300)
    assert clock.stalls() == (1, pytest.approx(300))

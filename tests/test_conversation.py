"""The conversation engine's orchestration logic, on fake stages (tests/fakes.py): turns, history,
speculation, end of turn, interruptions, deadlines, cancellation. The same behaviours run over
the real models and Ray Serve in test_graph.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from services.batching import Priority
from services.conversation import events as ev
from services.conversation.engine import Conversation
from services.conversation.history import ChatHistory
from services.conversation.policies import EndOfTurn
from services.conversation.settings import Interruptions, SessionSettings, StageTimeouts, TurnDetection
from services.conversation.turn import UNTRANSCRIBED, PlaybackClock, heard_text
from services.errors import Unavailable
from tests.fakes import RATE, FakeStages, silence, speech

OUT_RATE = 16000


class Harness:
    """A conversation on fake stages, its events collected as they come."""

    def __init__(self, stages: FakeStages, **settings: Any) -> None:
        settings.setdefault("output_sample_rate", OUT_RATE)
        self.stages = stages
        self.counts: dict[str, int] = {}
        self.played_stalls: list[tuple[int, float]] = []  # Observer.played, one per answer with audio
        self.conv = Conversation(stages, SessionSettings(**settings), history=ChatHistory("system"),
                                 observer=self)
        self.out: list[ev.Event] = []
        self.reader: asyncio.Task[None] | None = None

    # Observer: counts what no client event shows
    def speculation(self, outcome: str) -> None:
        self._count(f"speculation_{outcome}")

    def interruption(self, outcome: str) -> None:
        self._count(outcome)

    def turn_ended(self, state: str, reason: str) -> None:
        self._count(f"turn_{state}")

    def answered(self, latency: ev.TurnLatency) -> None:
        self._count("answered")

    def played(self, underruns: int, underrun_ms: float) -> None:
        self.played_stalls.append((underruns, underrun_ms))

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def __aenter__(self) -> Harness:
        await self.conv.start()
        self.reader = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conv.aclose()
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5)

    async def _collect(self) -> None:
        async for event in self.conv.events():
            self.out.append(event)

    async def feed(self, audio: np.ndarray, *, realtime: bool = True, chunk: int = 320) -> None:
        for i in range(0, audio.size, chunk):
            await self.conv.push_audio(audio[i:i + chunk])
            await asyncio.sleep(chunk / RATE if realtime else 0)

    async def until(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        """Wait for an observable state (events, engine counters), never a fixed sleep."""
        async with asyncio.timeout(within_s):
            while not predicate():
                await asyncio.sleep(0.005)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.out if isinstance(e, kind)]

    def history(self) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in self.conv.history.messages() if m["role"] != "system"]


def question(seconds: float = 1.0, phrase: str = "what is the capital of france") -> np.ndarray:
    return np.concatenate([silence(0.2), speech(seconds, phrase)])


# --- turns and history --------------------------------------------------------------------------------


async def test_spoken_turn_is_answered_once_and_recorded_once() -> None:
    stages = FakeStages()
    async with Harness(stages) as h:
        await h.feed(np.concatenate([question(), silence(0.6)]))
        await h.until(lambda: h.of(ev.ResponseDone))
        kinds = [type(e).__name__ for e in h.out]
        assert kinds[:5] == ["SessionStarted", "SpeechStarted", "SpeechStopped", "InputCommitted",
                             "FinalTranscript"]
        done = h.of(ev.ResponseDone)[0]
        assert done.text == stages.answer and done.audio_ms == 2000 and done.latency.llm_tokens == 10
        assert h.of(ev.FinalTranscript)[0].text == "what is the capital of france"
        await h.conv.end_input()
    assert h.history() == [("user", "what is the capital of france"), ("assistant", stages.answer)]
    assert stages.llm_running == 0 and len(stages.llm_calls) == 1


async def test_history_is_written_once_even_with_a_slow_client_and_a_barge_in() -> None:
    """Defect 1: the turn was recorded before ResponseDone and again by the interruption."""
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(40)))
    h = Harness(stages, send_queue=4, interruptions=Interruptions(mode="cancel"))
    await h.conv.start()  # nobody reads events: the send queue is full at once
    await h.conv.push_text("tell me something")
    await asyncio.sleep(0.3)
    feeder = asyncio.create_task(h.feed(question(0.6, "stop please what about spain")))
    reader = asyncio.create_task(h._collect())  # the client reads again
    await feeder
    await h.until(lambda: h.of(ev.ResponseInterrupted))
    await h.conv.aclose()
    await reader
    roles = [r for r, _ in h.history()]
    assert roles.count("user") == 1 and roles.count("assistant") <= 1, h.history()
    assert h.history()[0] == ("user", "tell me something")


async def test_caller_cancel_during_an_interruption_is_not_swallowed() -> None:
    """Defect 2: cancel-and-wait swallowed the reader's own cancel; it then emitted into a queue
    nobody drained, and the stream hung."""
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(200)), word_s=0.02)
    gen = stages.generate

    async def slow_to_close(*a: Any, **k: Any):  # type: ignore[no-untyped-def]
        try:
            async for d in gen(*a, **k):
                yield d
        finally:
            await asyncio.sleep(0.5)  # a remote abort that takes a while

    stages.generate = slow_to_close  # type: ignore[method-assign]
    h = Harness(stages, interruptions=Interruptions(mode="cancel"))
    async with h:
        await h.conv.push_text("go")
        await h.until(lambda: h.of(ev.AudioOut))
        reader = asyncio.create_task(h.conv.push_text("interrupt", interrupt=True))
        await asyncio.sleep(0.1)  # the reader now waits for the LLM stream to close
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    assert h.reader is not None and h.reader.done()  # the event stream ended: nothing hangs


async def test_speech_native_answer_survives_a_failed_side_transcript() -> None:
    """Defect 3: the answer the user heard was reported as an error, with nothing in the history."""
    stages = FakeStages(answer="a b c")
    stages.fails("asr")
    async with Harness(stages, mode="speech_native") as h:
        await h.feed(np.concatenate([question(), silence(0.6)]))
        await h.until(lambda: h.of(ev.ResponseDone))
        await h.conv.end_input()
    assert stages.llm_audio[0] is not None and stages.llm_audio[0].size > 0.9 * RATE
    errors = h.of(ev.ErrorEvent)
    assert errors and errors[0].code == "UNAVAILABLE" and "transcript" in errors[0].message
    assert h.of(ev.ResponseDone)[0].text == "a b c"
    assert h.history() == [("user", UNTRANSCRIBED), ("assistant", "a b c")]


async def test_stage_that_hangs_ends_the_turn_with_an_error_and_the_conversation_goes_on() -> None:
    """Defect 6: no stage call had a deadline."""
    stages = FakeStages(answer="a b c d e")
    stages.hang.add("llm_stall")
    timeouts = StageTimeouts(llm_first_token_s=1, llm_stall_s=0.3, asr_s=1, tts_first_audio_s=1, tts_stall_s=1)
    async with Harness(stages, timeouts=timeouts) as h:
        await h.conv.push_text("first")
        await h.until(lambda: h.of(ev.ErrorEvent))
        err = h.of(ev.ErrorEvent)[0]
        assert err.code == "DEADLINE_EXCEEDED" and "LLM stalled" in err.message
        assert stages.llm_running == 0  # the stuck request was closed
        stages.hang.clear()
        await h.conv.push_text("second")
        await h.until(lambda: h.of(ev.ResponseDone))
        await h.conv.end_input()
    assert h.history()[-1] == ("assistant", "a b c d e")


async def test_tts_outage_mid_answer_gives_an_error_event_not_dead_air() -> None:
    """Defect 13 (engine side): a TTS stage that stops answering ends the turn with an error."""
    stages = FakeStages(answer="one two three, four five six seven eight nine ten eleven twelve")
    synth = stages.synthesize
    calls = {"n": 0}

    async def dies_after_first(text: str, **k: Any):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 1:
            await asyncio.Event().wait()
        async for pcm in synth(text, **k):
            yield pcm

    stages.synthesize = dies_after_first  # type: ignore[method-assign]
    async with Harness(stages, timeouts=StageTimeouts(tts_first_audio_s=0.5)) as h:
        await h.conv.push_text("go")
        await h.until(lambda: h.of(ev.ErrorEvent))
        assert h.of(ev.ErrorEvent)[0].code == "DEADLINE_EXCEEDED"
        assert h.of(ev.AudioOut) and h.of(ev.ResponseInterrupted)


async def test_tts_failure_mid_answer_stops_the_llm_at_once() -> None:
    """A TTS replica that dies mid-answer ends the turn now: the LLM is not left generating."""
    stages = FakeStages(answer=" ".join(f"w{i}," for i in range(300)), word_s=0.01)
    synth = stages.synthesize
    calls = {"n": 0}

    async def dies_after_first(text: str, **k: Any):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 1:
            raise Unavailable("a stage replica died; retry shortly")
        async for pcm in synth(text, **k):
            yield pcm

    stages.synthesize = dies_after_first  # type: ignore[method-assign]
    async with Harness(stages) as h:
        await h.conv.push_text("go")
        await h.until(lambda: h.of(ev.ErrorEvent))
        assert h.of(ev.ErrorEvent)[0].code == "UNAVAILABLE"
        await h.until(lambda: stages.llm_running == 0)
    assert stages.llm_aborted == 1 and len(h.of(ev.TextDelta)) < 100


async def test_barge_in_off_answers_the_user_afterwards() -> None:
    """Defect 8: with barge-in off, words said during an answer were thrown away."""
    stages = FakeStages(answer="a b c d e f", word_s=0.05)
    stages.answers = ["a b c d e f", "second answer"]
    async with Harness(stages, interruptions=Interruptions(mode="off")) as h:
        await h.feed(np.concatenate([question(), silence(0.5)]))
        await h.until(lambda: h.of(ev.ResponseStarted))
        await h.feed(np.concatenate([question(0.8, "tell me a long story"), silence(0.6)]))
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        assert not h.of(ev.ResponseInterrupted) and not h.of(ev.ResponsePaused)
        assert [d.text for d in h.of(ev.ResponseDone)] == ["a b c d e f", "second answer"]
        await h.conv.end_input()
    assert [r for r, _ in h.history()] == ["user", "assistant", "user", "assistant"]
    assert h.history()[2] == ("user", "tell me a long story")


async def test_typed_turns_after_each_answer_are_not_barge_ins() -> None:
    """Defect 11: each typed turn counted as a barge-in on an answer still 'playing', the history
    filled with '…' and the model imitated it."""
    stages = FakeStages()
    stages.answers = [f"answer number {i}" for i in range(8)]
    async with Harness(stages) as h:
        for i in range(8):
            await h.conv.push_text(f"question {i}")
            await h.until(lambda i=i: len(h.of(ev.ResponseDone)) == i + 1)
        await h.conv.end_input()
    assert not h.of(ev.ResponseInterrupted)
    assert h.history() == [x for i in range(8) for x in (("user", f"question {i}"),
                                                         ("assistant", f"answer number {i}"))]
    assert all("…" not in c for _, c in h.history())
    # every answer saw the previous ones, whole
    assert stages.llm_calls[-1][-2] == {"role": "assistant", "content": "answer number 6"}


async def test_text_turn_with_nothing_to_answer_is_reported_and_ignored() -> None:
    """Defect 14: an emoji-only turn got an answer with no audio."""
    stages = FakeStages(answer="hello")
    async with Harness(stages) as h:
        await h.conv.push_text("🙂🎉")
        await h.conv.push_text("hi")
        await h.until(lambda: h.of(ev.ResponseDone))
    assert h.of(ev.ErrorEvent)[0].code == "INVALID_ARGUMENT" and len(stages.llm_calls) == 1


async def test_typed_turn_that_interrupts_keeps_what_was_heard() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(100)), word_s=0.01)
    async with Harness(stages, playback="reported") as h:
        await h.conv.push_text("long one")
        await h.until(lambda: h.conv._response is not None and h.conv._response.playback.sent_ms >= 1000)
        h.conv.playback(1, 700)  # 3 words of 200 ms and a bit of the fourth
        await h.conv.push_text("stop", interrupt=True)
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 1)
        cut = h.of(ev.ResponseInterrupted)[0]
        assert cut.heard_text == "w0 w1 w2" and cut.reason == "text_turn"
        assert stages.llm_aborted == 1 and stages.llm_running == 0
        await h.conv.end_input()
    assert h.history()[:3] == [("user", "long one"), ("assistant", "w0 w1 w2"), ("user", "stop")]


# --- speculation and end of turn ---------------------------------------------------------------------


async def test_speculation_is_released_when_the_turn_ends() -> None:
    stages = FakeStages()
    async with Harness(stages) as h:
        await h.feed(np.concatenate([question(), silence(0.6)]))
        await h.until(lambda: h.of(ev.ResponseDone))
    assert h.counts.get("speculation_started") == 1 and h.counts.get("speculation_used") == 1
    assert len(stages.llm_calls) == 1 and len(stages.transcribed) == 1  # no second ASR, no second LLM
    assert stages.priorities == [Priority.SPECULATIVE]  # other sessions' finished turns go first
    assert h.of(ev.ResponseDone)[0].latency.speculative
    input_id = h.of(ev.InputCommitted)[0].input_id
    assert h.of(ev.FinalTranscript)[0].input_id == h.of(ev.ResponseStarted)[0].input_id == input_id


async def test_settings_update_keeps_listening_state_unless_listening_changes() -> None:
    stages = FakeStages()
    async with Harness(stages) as h:
        await h.feed(question(0.6))
        s = h.conv.settings
        await h.conv.update_settings(s.model_copy(update={"system_prompt": "be brief"}))
        assert h.conv._listener.segmenter.in_speech  # the open utterance survived
        await h.feed(np.concatenate([speech(0.4), silence(0.6)]))
        await h.until(lambda: h.of(ev.InputCommitted))
        assert h.conv.history.system_prompt == "be brief"
        stopped = h.of(ev.SpeechStopped)[0]
        assert stopped.audio_time_ms > 1000  # input time, not the VAD's own clock
        await h.conv.update_settings(s.model_copy(update={"turn": TurnDetection(mode="silence")}))
        await h.feed(np.concatenate([speech(0.5), silence(0.7)]))
        await h.until(lambda: len(h.of(ev.SpeechStarted)) == 2)
        assert h.of(ev.SpeechStarted)[1].audio_time_ms > stopped.audio_time_ms  # continues after a new VAD


async def test_speculation_discarded_when_the_user_speaks_on_aborts_and_sends_nothing() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(100)), word_s=0.01)
    turn = TurnDetection(mode="silence", min_silence_ms=700, speculate_after_ms=150)
    async with Harness(stages, turn=turn) as h:
        await h.feed(np.concatenate([question(1.0, "i would like to order"), silence(0.4)]))
        assert h.counts.get("speculation_started") == 1
        await h.until(lambda: stages.llm_calls)  # the speculative answer is being generated
        assert not h.of(ev.ResponseStarted) and not h.of(ev.AudioOut)  # ... and held
        await h.feed(np.concatenate([speech(1.0, "a pizza with mushrooms"), silence(0.9)]))
        await h.until(lambda: h.of(ev.ResponseDone))
        assert h.counts.get("speculation_discarded") == 1
        assert stages.llm_aborted == 1  # the discarded request was aborted, not left running
        assert [d.response_id for d in h.of(ev.ResponseDone)] == [e.response_id for e in h.of(ev.ResponseStarted)]
        assert len(h.of(ev.InputCommitted)) == 1  # the pause did not end the turn
        await h.conv.end_input()
    assert h.history()[0] == ("user", "i would like to order a pizza with mushrooms")
    assert stages.llm_running == 0


async def test_semantic_end_of_turn_waits_through_a_pause_inside_a_sentence() -> None:
    stages = FakeStages()
    async with Harness(stages) as h:  # semantic: 300 ms if complete, 1500 ms at most
        await h.feed(np.concatenate([question(1.0, "i would like to order"), silence(0.8)]))
        assert not h.of(ev.InputCommitted), "ended after 0.8 s of silence on an unfinished sentence"
        await h.feed(np.concatenate([speech(1.0, "a pizza with mushrooms"), silence(0.6)]))
        await h.until(lambda: h.of(ev.InputCommitted))
        await h.until(lambda: h.of(ev.ResponseDone))
    assert len(h.of(ev.InputCommitted)) == 1
    assert stages.llm_calls[-1][-1]["content"] == "i would like to order a pizza with mushrooms"


async def test_finished_question_ends_after_the_short_silence() -> None:
    stages = FakeStages()
    async with Harness(stages) as h:
        await h.feed(question())
        t_end = h.conv.now_ms()
        await h.feed(silence(0.5))
        await h.until(lambda: h.of(ev.InputCommitted))
        committed = h.of(ev.InputCommitted)[0]
        assert committed.server_time_ms - t_end < 450  # ~300 ms of silence, not 1500


async def test_unfinished_sentence_ends_at_the_longer_silence() -> None:
    stages = FakeStages()
    async with Harness(stages) as h:
        await h.feed(np.concatenate([question(1.0, "i would like to order"), silence(1.3)]))
        assert not h.of(ev.InputCommitted)
        await h.feed(silence(0.4))
        await h.until(lambda: h.of(ev.InputCommitted))


async def test_silence_mode_without_speculation_is_the_old_path() -> None:
    stages = FakeStages()
    turn = TurnDetection(mode="silence", min_silence_ms=500, speculate=False)
    async with Harness(stages, turn=turn) as h:
        await h.feed(np.concatenate([question(), silence(0.7)]))
        await h.until(lambda: h.of(ev.ResponseDone))
    assert "speculation_started" not in h.counts and not h.of(ev.ResponseDone)[0].latency.speculative


async def test_noise_only_utterance_is_not_answered() -> None:
    stages = FakeStages()
    async with Harness(stages) as h:
        await h.feed(np.concatenate([question(0.6, ""), silence(0.6)]))
        await h.until(lambda: h.of(ev.InputCommitted))
        await h.conv.end_input()
    assert not h.of(ev.ResponseStarted) and not stages.llm_calls and h.history() == []


async def test_manual_turns_push_to_talk() -> None:
    stages = FakeStages(answer="ok")
    async with Harness(stages, turn=TurnDetection(mode="manual")) as h:
        await h.feed(question(), realtime=False)
        assert not h.of(ev.SpeechStarted)  # no VAD events in manual mode
        await h.conv.commit_audio()
        await h.until(lambda: h.of(ev.ResponseDone))
        await h.conv.end_input()
    assert h.history()[0] == ("user", "what is the capital of france")


def test_end_of_turn_rescores_an_incomplete_verdict_as_the_silence_grows() -> None:
    eot = EndOfTurn(TurnDetection())  # 300 / 1500 ms
    assert eot.wants_score(60)
    eot.start_score(60)
    assert not eot.wants_score(100)  # one call at a time
    eot.set_score(0.1)
    eot.set_transcript("can you tell me a fun fact about cats?")
    assert not eot.decide(300) and not eot.wants_score(200)
    assert eot.wants_score(300)  # asked again at min_silence, with 300 ms of silence heard
    eot.start_score(300)
    eot.set_score(0.8)
    assert eot.decide(320) and not eot.wants_score(600)
    eot.reset()
    eot.set_score(0.9)
    eot.set_transcript("what is the capital of?")  # the transcript wins: unfinished
    assert not eot.decide(1000) and eot.decide(1500)
    eot.reset()
    eot.set_score(0.05)  # the model misjudges some long questions ...
    eot.set_transcript("Can you tell me a fun fact about cats?")
    assert not eot.decide(300) and eot.decide(600)  # ... a finished question ends at 2 x min_silence


# --- interruptions --------------------------------------------------------------------------------


async def _answer_playing(h: Harness, stages: FakeStages) -> None:
    await h.conv.push_text("tell me a long story")
    await h.until(lambda: h.of(ev.AudioOut))


async def test_noise_over_the_answer_pauses_then_resumes_exactly_where_it_paused() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(30)), word_s=0.02)
    async with Harness(stages) as h:
        await _answer_playing(h, stages)
        await h.feed(np.concatenate([speech(0.25, "what is the capital of france"), silence(0.5)]))
        await h.until(lambda: h.of(ev.ResponseResumed))
        assert h.of(ev.ResponsePaused) and h.of(ev.ResponseResumed)[0].reason == "noise"
        await h.until(lambda: h.of(ev.ResponseDone))
        await h.conv.end_input()
    audio = h.of(ev.AudioOut)
    assert [a.offset_ms for a in audio] == sorted(a.offset_ms for a in audio)
    assert sum(len(a.pcm16) // 2 for a in audio) * 1000 // OUT_RATE == h.of(ev.ResponseDone)[0].audio_ms
    assert not h.of(ev.ResponseInterrupted) and h.counts.get("resumed_noise") == 1
    assert h.history()[1] == ("assistant", stages.answer)  # the whole answer, once


async def test_backchannel_over_the_answer_resumes_it() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(30)), word_s=0.02)
    async with Harness(stages) as h:
        await _answer_playing(h, stages)
        await h.feed(np.concatenate([speech(0.6, "uh huh"), silence(0.5)]))
        await h.until(lambda: h.of(ev.ResponseResumed))
        assert h.of(ev.ResponseResumed)[0].reason == "backchannel"
        await h.until(lambda: h.of(ev.ResponseDone))
        await h.conv.end_input()
    assert not h.of(ev.ResponseInterrupted) and len(stages.llm_calls) == 1  # "uh huh" is not answered
    assert Priority.BARGE_IN in stages.priorities
    assert h.counts.get("resumed_backchannel") == 1 and h.counts.get("paused") == 1


async def test_real_turn_over_the_answer_interrupts_it_and_keeps_what_was_heard() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(200)), word_s=0.02)
    stages.answers = [stages.answer, "spain is in europe"]
    async with Harness(stages, playback="reported") as h:
        await _answer_playing(h, stages)
        await h.until(lambda: h.conv._response is not None and h.conv._response.playback.sent_ms >= 1000)
        h.conv.playback(1, 700)
        await h.feed(np.concatenate([speech(1.0, "stop please what about spain"), silence(0.6)]))
        await h.until(lambda: h.of(ev.ResponseDone))
        cut = h.of(ev.ResponseInterrupted)[0]
        assert cut.heard_text == "w0 w1 w2" and cut.heard_ms == 700
        assert stages.llm_aborted == 1  # the first answer's request was aborted
        index = h.out.index(cut)
        assert not [e for e in h.out[index:] if isinstance(e, ev.AudioOut) and e.response_id == 1]
        await h.conv.end_input()
    assert h.history() == [("user", "tell me a long story"), ("assistant", "w0 w1 w2"),
                           ("user", "stop please what about spain"), ("assistant", "spain is in europe")]
    assert h.conv.history.turns[1].interrupted and h.counts.get("interrupted") == 1


async def test_cancel_mode_interrupts_at_once() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(200)), word_s=0.02)
    async with Harness(stages, interruptions=Interruptions(mode="cancel")) as h:
        await _answer_playing(h, stages)
        await h.feed(speech(0.3, "uh huh"))
        await h.until(lambda: h.of(ev.ResponseInterrupted))
        assert not h.of(ev.ResponsePaused)
        await h.until(lambda: stages.llm_running == 0)
    assert stages.llm_aborted == 1


async def test_speech_over_a_fully_sent_answer_still_playing_truncates_it() -> None:
    stages = FakeStages()  # 2 s of audio, all sent at once
    async with Harness(stages, playback="reported") as h:
        await h.conv.push_text("count")
        await h.until(lambda: h.of(ev.ResponseDone))
        h.conv.playback(1, 500)  # 2.5 words heard
        await h.feed(np.concatenate([speech(1.0, "stop please what about spain"), silence(0.6)]))
        await h.until(lambda: h.of(ev.ResponseInterrupted))
        assert h.of(ev.ResponseInterrupted)[0].heard_text == "one two"
        await h.conv.end_input()
    assert h.history()[1] == ("assistant", "one two")


async def test_truncate_of_a_committed_answer_rewrites_its_history() -> None:
    stages = FakeStages()
    async with Harness(stages, playback="none") as h:
        await h.conv.push_text("count")
        await h.until(lambda: h.of(ev.ResponseDone))
        await h.conv.push_text("again")  # commits the first answer
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        await h.conv.truncate(2, 600)
        await h.until(lambda: h.of(ev.Truncated))
        assert h.of(ev.Truncated)[0].heard_text == "one two three"
        await h.conv.end_input()
    assert h.history()[-1] == ("assistant", "one two three")


async def test_cancel_response_aborts_the_llm_request() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(500)), word_s=0.01)
    async with Harness(stages) as h:
        await h.conv.push_text("go")
        await h.until(lambda: h.of(ev.AudioOut))
        await h.conv.cancel_response()
        assert stages.llm_running == 0 and stages.llm_aborted == 1
        await h.until(lambda: h.of(ev.ResponseInterrupted))
        assert h.of(ev.ResponseInterrupted)[0].reason == "cancelled"


async def test_close_aborts_everything_and_never_waits_for_the_client() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(500)), word_s=0.0)
    h = Harness(stages, send_queue=4)
    await h.conv.start()
    await h.conv.push_text("go")  # nobody reads: the answer blocks on the full queue
    await asyncio.sleep(0.05)
    await asyncio.wait_for(h.conv.aclose(), 2)
    assert stages.llm_running == 0 and stages.llm_aborted == 1


# --- pure helpers -----------------------------------------------------------------------------------


def test_heard_text_counts_whole_and_partial_segments() -> None:
    segments = [("Hello there.", 0.0, 1000.0), ("How are you doing today?", 1000.0, 3000.0)]
    assert heard_text(segments, 0) == ""
    assert heard_text(segments, 1000) == "Hello there."
    assert heard_text(segments, 2000) == "Hello there. How are"
    assert heard_text(segments, 9999) == "Hello there. How are you doing today?"


def test_playback_clock_pauses_and_reports() -> None:
    now = [0.0]
    clock = PlaybackClock("estimate", clock=lambda: now[0])
    clock.on_sent(5000)
    now[0] = 1.0
    assert clock.played_ms() == 1000
    clock.pause()
    now[0] = 3.0
    assert clock.played_ms() == 1000  # paused: the user hears nothing more
    clock.resume()
    now[0] = 3.5
    assert clock.played_ms() == 1500
    clock.report(1200)  # the client is a bit behind our estimate: trust it
    now[0] = 4.0
    assert clock.played_ms() == 1700
    assert PlaybackClock("none").played_ms() == 0


async def test_unknown_stage_errors_become_internal_without_details() -> None:
    stages = FakeStages()
    stages.fails("llm", RuntimeError("secret stack detail"))
    async with Harness(stages) as h:
        await h.conv.push_text("hi")
        await h.until(lambda: h.of(ev.ErrorEvent))
    err = h.of(ev.ErrorEvent)[0]
    assert err.code == "INTERNAL" and "secret" not in err.message


async def test_mapped_unavailable_error_keeps_its_message() -> None:
    stages = FakeStages()
    stages.fails("llm", Unavailable("the LLM is down"))
    async with Harness(stages) as h:
        await h.conv.push_text("hi")
        await h.until(lambda: h.of(ev.ErrorEvent))
    assert h.of(ev.ErrorEvent)[0].code == "UNAVAILABLE" and "down" in h.of(ev.ErrorEvent)[0].message

"""Orchestration logic of a conversation with fake stages (the real graph is in test_graph.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import numpy as np
import pytest

from services import events as ev
from services.errors import Unavailable
from services.history import INTERRUPTED_MARK, ChatHistory
from services.session import Conversation, SessionSettings, heard_text
from services.vad import WINDOW, VADConfig, VADState

RATE = 16000
OUT_RATE = 16000


class FakeStages:
    """Energy VAD, length-keyed ASR, a word-by-word LLM, and TTS of 200 ms silence per word."""

    def __init__(self, answer: str = "one two three four five six seven eight nine ten", word_s: float = 0.01,
                 fail_llm: bool = False) -> None:
        self.answer = answer
        self.word_s = word_s
        self.fail_llm = fail_llm
        self.llm_closed = 0
        self.llm_calls: list[list[dict[str, str]]] = []
        self.transcribed: list[int] = []

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        joined = np.concatenate([state.leftover, audio16k])
        n = joined.size // WINDOW
        frames = joined[: n * WINDOW].reshape(n, WINDOW) if n else np.zeros((0, WINDOW), np.float32)
        probs = (np.abs(frames).mean(axis=1) > 0.05).astype(np.float32) * 0.95
        return probs, VADState(state.context, state.rnn, joined[n * WINDOW:].copy())

    async def transcribe(self, audio16k: np.ndarray, language: str | None) -> SimpleNamespace:
        self.transcribed.append(audio16k.size)
        return SimpleNamespace(text=f"utterance of {round(audio16k.size / RATE, 1)} seconds", language="en")

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        return "partial"

    async def generate(self, messages: list[dict[str, str]], *, max_tokens: int | None,
                       audio: np.ndarray | None = None) -> AsyncIterator[str]:
        self.llm_calls.append(messages)
        if self.fail_llm:
            raise Unavailable("the LLM is down")
        try:
            for i, word in enumerate(self.answer.split()):
                await asyncio.sleep(self.word_s)
                yield word if i == 0 else " " + word
        finally:
            self.llm_closed += 1

    async def synthesize(self, text: str, *, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        await asyncio.sleep(0.001)
        yield b"\x00\x00" * int(0.2 * sample_rate) * len(text.split())


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


async def feed(conv: Conversation, audio: np.ndarray, chunk: int = 320, realtime: bool = False) -> None:
    for i in range(0, audio.size, chunk):
        await conv.push_audio(audio[i:i + chunk])
        await asyncio.sleep(chunk / RATE if realtime else 0)


def make(stages: FakeStages, **settings: object) -> Conversation:
    cfg = SessionSettings(output_sample_rate=OUT_RATE, vad=VADConfig(min_silence_ms=300), **settings)  # type: ignore[arg-type]
    return Conversation(stages, cfg, history=ChatHistory("system"))


async def collect(conv: Conversation, into: list[ev.Event]) -> None:
    async for event in conv.events():
        into.append(event)


def test_heard_text_counts_whole_and_partial_segments() -> None:
    segments = [("Hello there.", 0.0, 1000.0), ("How are you doing today?", 1000.0, 3000.0)]
    assert heard_text(segments, 0) == ""
    assert heard_text(segments, 1000) == "Hello there."
    assert heard_text(segments, 2000) == "Hello there. How are"
    assert heard_text(segments, 9999) == "Hello there. How are you doing today?"


async def test_turn_is_answered_and_recorded_in_history() -> None:
    stages = FakeStages()
    conv = make(stages)
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    await feed(conv, np.concatenate([silence(0.3), speech(1.0), silence(0.6)]))
    await conv.end_input()
    await reader
    kinds = [type(e).__name__ for e in out]
    assert kinds[:4] == ["SessionStarted", "SpeechStarted", "SpeechStopped", "FinalTranscript"]
    done = [e for e in out if isinstance(e, ev.ResponseDone)]
    assert len(done) == 1 and done[0].text == stages.answer
    assert done[0].latency.llm_tokens == 10 and done[0].audio_ms > 0
    roles = [m["role"] for m in conv.history.messages()]
    assert roles == ["system", "user", "assistant"]
    assert stages.llm_closed == 1


async def test_barge_in_cancels_llm_and_keeps_only_heard_words() -> None:
    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(200)), word_s=0.02)
    conv = make(stages)
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    await feed(conv, np.concatenate([speech(1.0), silence(0.5)]), realtime=True)
    while not any(isinstance(e, ev.AudioOut) for e in out):
        await asyncio.sleep(0.01)
    conv.playback(1, 700)  # the client heard 700 ms: 3 words of 200 ms each, then part of one
    await feed(conv, speech(0.6), realtime=True)  # the user talks over the answer
    interrupted = [e for e in out if isinstance(e, ev.ResponseInterrupted)]
    assert interrupted and interrupted[0].heard_ms == 700
    assert interrupted[0].heard_text.split()[:3] == ["w0", "w1", "w2"]
    assert len(interrupted[0].generated_text.split()) < 200
    assert stages.llm_closed == 1  # the LLM stream was closed, not left running
    assistant = [m["content"] for m in conv.history.messages() if m["role"] == "assistant"]
    assert assistant == [interrupted[0].heard_text + INTERRUPTED_MARK]
    cut = out.index(interrupted[0])
    assert not [e for e in out[cut:] if isinstance(e, ev.AudioOut) and e.response_id == 1]
    await conv.aclose()
    await reader


async def test_speech_before_any_answer_audio_is_kept_for_the_next_turn() -> None:
    stages = FakeStages(word_s=0.5)  # slow LLM: the user speaks again before any audio
    conv = make(stages)
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    await feed(conv, np.concatenate([speech(1.0), silence(0.4)]), realtime=True)
    await feed(conv, np.concatenate([speech(1.0), silence(0.6)]), realtime=True)
    await conv.end_input()
    await reader
    # The second turn was transcribed with the first utterance in front of it.
    assert len(stages.transcribed) >= 2 and stages.transcribed[-1] > stages.transcribed[0] * 1.5
    roles = [m["role"] for m in conv.history.messages()]
    assert roles == ["system", "user", "assistant"]


async def test_failed_llm_turn_reports_error_and_conversation_goes_on() -> None:
    stages = FakeStages(fail_llm=True)
    conv = make(stages)
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    await feed(conv, np.concatenate([speech(1.0), silence(0.6)]))
    await asyncio.sleep(0.1)
    stages.fail_llm = False
    await conv.push_text("And now?")
    await conv.end_input()
    await reader
    errors = [e for e in out if isinstance(e, ev.ErrorEvent)]
    assert errors and errors[0].code == "UNAVAILABLE" and "down" in errors[0].message
    assert [e for e in out if isinstance(e, ev.ResponseDone)]
    assert [m["content"] for m in conv.history.messages() if m["role"] == "user"] == ["And now?"]


async def test_text_turn_with_history_window() -> None:
    stages = FakeStages(answer="ok")
    conv = make(stages, history_turns=1)
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    for text in ("first", "second", "third"):
        await conv.push_text(text)
        while sum(isinstance(e, ev.ResponseDone) for e in out) < ("first", "second", "third").index(text) + 1:
            await asyncio.sleep(0.01)
    await conv.end_input()
    await reader
    last = stages.llm_calls[-1]
    assert [m["content"] for m in last if m["role"] == "user"] == ["second", "third"]


@pytest.mark.parametrize("barge_in", [False])
async def test_barge_in_disabled_lets_answer_finish(barge_in: bool) -> None:
    stages = FakeStages(answer="a b c d e f", word_s=0.05)
    conv = make(stages, barge_in=barge_in)
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    await feed(conv, np.concatenate([speech(1.0), silence(0.5)]), realtime=True)
    await feed(conv, np.concatenate([speech(0.6), silence(0.5)]), realtime=True)
    await conv.end_input()
    await reader
    assert not [e for e in out if isinstance(e, ev.ResponseInterrupted)]
    assert next(e for e in out if isinstance(e, ev.ResponseDone)).text == "a b c d e f"


async def test_speech_native_gives_audio_to_llm_and_transcribes_beside_it() -> None:
    stages = FakeStages(answer="a b c", word_s=0.05)
    seen: list[np.ndarray | None] = []
    generate = stages.generate

    def spy(messages: list[dict[str, str]], *, max_tokens: int | None, audio: np.ndarray | None = None):  # type: ignore[no-untyped-def]
        seen.append(audio)
        return generate(messages, max_tokens=max_tokens, audio=audio)

    stages.generate = spy  # type: ignore[method-assign]
    conv = make(stages, mode="speech_native")
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    await feed(conv, np.concatenate([speech(1.0), silence(0.6)]))
    await conv.end_input()
    await reader
    assert len(seen) == 1 and seen[0] is not None and seen[0].size > 0.9 * RATE
    assert stages.llm_calls[0][-1] == {"role": "user", "content": ""}  # the audio is the turn
    kinds = [type(e).__name__ for e in out]
    assert kinds.index("FinalTranscript") < kinds.index("ResponseDone")
    done = next(e for e in out if isinstance(e, ev.ResponseDone))
    assert done.latency.asr_ms == 0  # ASR is off the latency path
    users = [m["content"] for m in conv.history.messages() if m["role"] == "user"]
    assert len(users) == 1 and users[0].startswith("utterance of")


async def test_barge_in_while_a_fully_sent_answer_still_plays_truncates_history() -> None:
    stages = FakeStages(answer="one two three four five six seven eight nine ten")  # 2 s of audio, sent at once
    conv = make(stages)
    out: list[ev.Event] = []
    reader = asyncio.create_task(collect(conv, out))
    await conv.start()
    await feed(conv, np.concatenate([speech(1.0), silence(0.5)]), realtime=True)
    while not any(isinstance(e, ev.ResponseDone) for e in out):
        await asyncio.sleep(0.01)
    conv.playback(1, 500)  # the client has played only 500 ms of the 2 s answer
    await feed(conv, speech(0.6), realtime=True)
    interrupted = [e for e in out if isinstance(e, ev.ResponseInterrupted)]
    assert len(interrupted) == 1 and interrupted[0].heard_ms == 500
    assistant = [m["content"] for m in conv.history.messages() if m["role"] == "assistant"]
    assert assistant == [interrupted[0].heard_text + INTERRUPTED_MARK]
    assert len(interrupted[0].heard_text.split()) < 10
    await conv.aclose()
    await reader


async def test_cancel_while_blocked_on_a_slow_client_closes_the_llm_stream_at_once() -> None:
    import gc

    stages = FakeStages(answer=" ".join(f"w{i}" for i in range(100)), word_s=0.0)
    conv = make(stages, send_queue=4)  # nobody reads events: emit() blocks once 4 are queued
    await conv.start()
    await conv.push_text("go")
    while not stages.llm_calls:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the response task now waits in emit(), not inside the LLM stream
    gc.disable()  # no cycle collection may be what closes it
    try:
        await conv.aclose()
        assert stages.llm_closed == 1
    finally:
        gc.enable()

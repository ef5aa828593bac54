"""Fake stages for unit tests of the conversation's orchestration logic (the real stages are
tested in their own modules and through the real Ray Serve graph).

Speech is a sine tone whose frequency says what was said (``speech(s, "uh huh")``), so the fake
ASR and end-of-turn model answer deterministically. The fake LLM counts requests that are still
running, so a test can prove a request was aborted rather than hope it ended.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np

from services.deadline_slots import DeadlineSlots, deadline_in
from services.errors import Unavailable
from services.tools import ToolCallDelta
from services.vad import WINDOW, VADState

RATE = 16000

#: What each tone frequency "says", and whether it is a finished sentence.
PHRASES: dict[int, tuple[str, bool]] = {
    220: ("what is the capital of france", True),
    260: ("tell me a long story", True),
    300: ("uh huh", True),
    340: ("stop please what about spain", True),
    380: ("i would like to order", False),
    420: ("a pizza with mushrooms", True),
    460: ("", True),  # a cough: no words
}


def speech(seconds: float, phrase: str = "what is the capital of france") -> np.ndarray:
    freq = next(f for f, (p, _) in PHRASES.items() if p == phrase)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def _phrases_in(audio: np.ndarray) -> list[tuple[str, bool]]:
    """The phrases spoken in ``audio``, in order (one per 0.25 s block of a known tone)."""
    out: list[tuple[str, bool]] = []
    block = RATE // 4
    for i in range(0, audio.size - block + 1, block):
        x = audio[i:i + block]
        if np.abs(x).mean() < 0.05:
            continue
        freq = int(round(np.argmax(np.abs(np.fft.rfft(x))) * RATE / block / 20.0) * 20)
        phrase = PHRASES.get(freq)
        if phrase is not None and (not out or out[-1] != phrase):
            out.append(phrase)
    return out


class FakeStages:
    """Energy VAD, tone ASR, a word-by-word LLM that counts live requests, and TTS of 200 ms
    of silence per word."""

    def __init__(self, answer: str = "one two three four five six seven eight nine ten",
                 word_s: float = 0.01) -> None:
        self.answer = answer
        self.word_s = word_s
        self.llm_calls: list[list[dict[str, str]]] = []
        self.tts_slacks: list[float | None] = []  # slack_s of each synthesize call, in order
        self.llm_audio: list[np.ndarray | None] = []
        self.llm_tools: list[tuple[Any, Any]] = []  # (tools, tool_choice) of each generate call
        self.llm_words_only: list[bool] = []  # words_only of each generate call
        self.llm_running = 0  # requests started and neither finished nor closed
        self.llm_aborted = 0  # requests closed before their last word
        self.transcribed: list[int] = []
        self.priorities: list[int] = []  # of each transcribe call
        self.fail: dict[str, BaseException] = {}  # stage name -> error to raise
        self.hang: set[str] = set()  # stage names that never answer
        self.answers: list[Any] = []  # per-call answers or scripts (pop from the front), else self.answer
        # A TTS that shares its CPU the way the real one does: one DeadlineSlots for every
        # session on these stages; each chunk holds a slot for tts_s seconds.
        self.tts_slots: DeadlineSlots | None = None
        self.tts_s = 0.0
        self.tts_grants: list[tuple[str, float | None]] = []  # (chunk text, slack_s), in grant order

    async def _gate(self, stage: str) -> None:
        if stage in self.hang:
            await asyncio.Event().wait()
        if stage in self.fail:
            raise self.fail[stage]

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        joined = np.concatenate([state.leftover, audio16k])
        n = joined.size // WINDOW
        frames = joined[: n * WINDOW].reshape(n, WINDOW) if n else np.zeros((0, WINDOW), np.float32)
        probs = (np.abs(frames).mean(axis=1) > 0.05).astype(np.float32) * 0.95
        return probs, VADState(state.context, state.rnn, joined[n * WINDOW:].copy())

    async def transcribe(self, audio16k: np.ndarray, language: str | None, priority: int = 0) -> SimpleNamespace:
        await self._gate("asr")
        self.transcribed.append(audio16k.size)
        self.priorities.append(int(priority))
        return SimpleNamespace(text=" ".join(p for p, _ in _phrases_in(audio16k) if p), language="en")

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        return " ".join(p for p, _ in _phrases_in(audio16k))

    async def end_of_turn(self, audio16k: np.ndarray) -> float | None:
        await self._gate("eot")
        phrases = _phrases_in(audio16k)
        return 0.9 if not phrases or phrases[-1][1] else 0.1

    async def generate(self, messages: list[dict[str, Any]], *, max_tokens: int | None,
                       audio: np.ndarray | None = None, tools: list[Any] | None = None,
                       tool_choice: Any = None, words_only: bool = False) -> AsyncIterator[Any]:
        """Words of the answer; an answer may also be a script: a list of text deltas and
        ``ToolCallDelta`` items (see ``call()``), yielded as they are."""
        self.llm_calls.append(messages)
        self.llm_audio.append(audio)
        self.llm_tools.append((tools, tool_choice))
        self.llm_words_only.append(words_only)
        await self._gate("llm")
        answer = self.answers.pop(0) if self.answers else self.answer
        items: list[Any] = answer if isinstance(answer, list) else \
            [w if i == 0 else " " + w for i, w in enumerate(answer.split())]
        self.llm_running += 1
        finished = False
        try:
            for i, item in enumerate(items):
                await asyncio.sleep(self.word_s)
                if "llm_stall" in self.hang and i == 2:
                    await asyncio.Event().wait()
                yield item
            finished = True
        finally:
            self.llm_running -= 1
            if not finished:
                self.llm_aborted += 1

    async def synthesize(self, text: str, *, voice: str, sample_rate: int,
                         slack_s: float | None = None) -> AsyncIterator[bytes]:
        self.tts_slacks.append(slack_s)
        await self._gate("tts")
        if self.tts_slots is not None:
            await self._synthesize_in_slot(text, slack_s)
        await asyncio.sleep(0.001)
        yield b"\x00\x00" * int(0.2 * sample_rate) * len(text.split())

    async def _synthesize_in_slot(self, text: str, slack_s: float | None) -> None:
        assert self.tts_slots is not None
        stop = threading.Event()
        waiter = asyncio.ensure_future(asyncio.to_thread(self.tts_slots.acquire, deadline_in(slack_s), stop))
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            stop.set()  # the thread gives up its place; a slot it got meanwhile goes back
            if await waiter:
                self.tts_slots.release()
            raise
        try:
            self.tts_grants.append((text, slack_s))
            await asyncio.sleep(self.tts_s)
        finally:
            self.tts_slots.release()

    def fails(self, stage: str, exc: BaseException | None = None) -> None:
        self.fail[stage] = exc or Unavailable(f"the {stage} is down")


def call(name: str, arguments: str, index: int = 0) -> list[ToolCallDelta]:
    """A tool call as an LLM stream gives it: name, arguments in two pieces, done."""
    half = len(arguments) // 2
    return [ToolCallDelta(index, name=name), ToolCallDelta(index, arguments_delta=arguments[:half]),
            ToolCallDelta(index, arguments_delta=arguments[half:]),
            ToolCallDelta(index, name, done=True, arguments=arguments)]

"""Piper TTS engine and TTSStream, with the real embedded voice (and Whisper to listen back)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.audio import resample
from services.chunking import ChunkerConfig, TextChunker
from services.conversation.tts_stream import SynthesizedAudio, TTSStream
from services.errors import (
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.models import default_asr_model
from services.tts import THREAD_PREFIX, PiperTTS, TTSConfig
from tests.conftest import wer


def stream_of(tts: PiperTTS, chunker: ChunkerConfig | None = None) -> TTSStream:
    """A text-delta stream over a local voice, with the voice's stream settings."""
    cfg = tts.config
    return TTSStream(tts.synthesize, sample_rate=tts.sample_rate, chunker=chunker or cfg.chunker,
                     audio_queue=cfg.audio_queue, max_pending_chunks=cfg.max_pending_chunks)

SENTENCE = "The quick brown fox jumps over the lazy dog near the old stone bridge."
ANSWER = (
    "Well, the weather today looks sunny with a light breeze from the west, and tomorrow it "
    "will probably rain in the afternoon. Remember to bring an umbrella!"
)
MANY = " ".join(f"This is sentence number {w} of a long answer." for w in
                ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    return PiperTTS.load(TTSConfig())


@pytest.fixture(scope="module")
def whisper() -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(default_asr_model(), device="cpu", compute_type="int8", cpu_threads=2)




def transcribe(model: Any, audio: np.ndarray, rate: int) -> str:
    segments, _ = model.transcribe(resample(audio, rate, 16000), language="en", beam_size=1)
    return " ".join(s.text for s in segments)


def token_deltas(text: str, seed: int = 0) -> list[str]:
    """LLM-like deltas of 1-6 characters, often ending inside a word."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i : i + n])
        i += n
    return out


def synth_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


async def threads_gone(tts: PiperTTS, within_s: float = 30.0) -> bool:
    """True once no synthesis thread is counted nor alive (a finished one may linger briefly)."""
    if not await tts.wait_idle(within_s=within_s):
        return False
    for t in synth_threads():
        await asyncio.to_thread(t.join, within_s)
    return synth_threads() == []


@contextlib.contextmanager
def count_onnx_runs(tts: PiperTTS) -> Iterator[dict[str, int]]:
    """Count ONNX runs of the voice, and the most that ran at the same time."""
    stats = {"runs": 0, "now": 0, "peak": 0}
    lock = threading.Lock()
    original = tts.voice.phoneme_ids_to_audio

    def spy(*args: Any, **kwargs: Any) -> Any:
        with lock:
            stats["runs"] += 1
            stats["now"] += 1
            stats["peak"] = max(stats["peak"], stats["now"])
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                stats["now"] -= 1

    tts.voice.phoneme_ids_to_audio = spy
    try:
        yield stats
    finally:
        del tts.voice.phoneme_ids_to_audio  # back to the class method


async def collect(tts: PiperTTS, text: str) -> list[np.ndarray]:
    return [a async for a in tts.synthesize(text)]


# --- synthesize ---------------------------------------------------------------------------------


async def test_round_trip_is_intelligible(tts: PiperTTS, whisper: Any) -> None:
    chunks = await collect(tts, SENTENCE)
    assert tts.sample_rate == 22050
    assert chunks and all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    audio = np.concatenate(chunks)
    assert 1.5 < audio.size / tts.sample_rate < 8
    assert np.abs(audio).max() <= 1.0
    heard = transcribe(whisper, audio, tts.sample_rate)
    assert wer(SENTENCE, heard) <= 0.15, heard


async def test_one_chunk_per_sentence(tts: PiperTTS) -> None:
    chunks = await collect(tts, "Hello there. How are you today? Fine.")
    assert len(chunks) == 3


async def test_empty_or_too_long_text_is_invalid(tts: PiperTTS) -> None:
    for text in ("", "   \n\t "):
        with pytest.raises(InvalidArgument, match="empty"):
            tts.synthesize(text)
    with pytest.raises(InvalidArgument, match="limit"):
        tts.synthesize("word " * 2000)


async def test_cancelled_consumer_stops_the_thread(tts: PiperTTS) -> None:
    # audio_queue=1: the thread may run at most a couple of sentences ahead of the consumer.
    small = PiperTTS(tts.voice, TTSConfig(audio_queue=1), tts.voice_path)
    with count_onnx_runs(small) as stats:
        async with contextlib.aclosing(small.synthesize(MANY)) as audio:
            first = await anext(audio)
            assert first.size > 0
        assert await threads_gone(small)
        assert stats["runs"] <= 4 < 10

        # Cancelling the task that consumes the stream stops it too.
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in small.synthesize(MANY):
                started.set()
                await asyncio.sleep(10)

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await threads_gone(small)
        assert stats["runs"] <= 8


async def test_concurrent_syntheses_share_the_onnx_slots(tts: PiperTTS) -> None:
    one = PiperTTS(tts.voice, TTSConfig(max_concurrent=1), tts.voice_path)
    texts = ["First speaker says hello. And goodbye.", "Second one talks. Then stops."]
    with count_onnx_runs(one) as stats:
        results = await asyncio.gather(*(collect(one, t) for t in texts))
    assert [len(r) for r in results] == [2, 2]
    assert stats["runs"] == 4
    assert stats["peak"] == 1


@pytest.mark.parametrize("order", ["deadline", "fifo"])
async def test_a_free_slot_goes_to_the_earliest_deadline(tts: PiperTTS, order: str) -> None:
    """Real ONNX runs: with the slot taken, a late-deadline synthesis queues first and an urgent
    one after it; when the slot frees, the urgent one's audio comes first (arrival order under fifo)."""
    config = TTSConfig(max_concurrent=1, scheduling=order)  # type: ignore[arg-type]
    one = PiperTTS(tts.voice, config, tts.voice_path)
    heard: list[str] = []

    async def speak(name: str, deadline: float) -> None:
        async for _ in one.synthesize("Hello there.", deadline):
            heard.append(name)

    assert await asyncio.to_thread(one._onnx_slots.acquire, -math.inf)
    late = asyncio.create_task(speak("late", time.monotonic() + 10))
    while one._onnx_slots.waiting < 1:
        await asyncio.sleep(0.01)
    urgent = asyncio.create_task(speak("urgent", time.monotonic()))
    while one._onnx_slots.waiting < 2:
        await asyncio.sleep(0.01)
    one._onnx_slots.release()
    await asyncio.gather(late, urgent)
    assert heard == (["urgent", "late"] if order == "deadline" else ["late", "urgent"])


@pytest.mark.parametrize("lookahead", [1, 2])
async def test_stream_keeps_the_next_chunk_queued_while_one_is_synthesized(lookahead: int) -> None:
    """lookahead=2: chunk n+1's synthesis has started (is queued at the TTS) before chunk n's
    audio is done; lookahead=1 waits for it."""
    started: list[str] = []
    release = asyncio.Event()

    async def synth(text: str) -> Any:
        started.append(text)
        await release.wait()
        yield np.zeros(160, np.float32)

    async with TTSStream(synth, sample_rate=16000, chunker=CLAUSE_CHUNKS, lookahead=lookahead) as stream:
        stream.push_text("Hello there, my friend. How are you? I am fine.")
        stream.end_input()
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert len(started) == lookahead
        release.set()
        texts = [p.text async for p in stream]
    assert texts == ["Hello there, my friend.", "How are you?", "I am fine."]


async def test_engine_failure_is_internal_error(tts: PiperTTS) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("onnx exploded")

    other = PiperTTS(tts.voice, TTSConfig(), tts.voice_path)
    other.voice = type(tts.voice)(session=tts.voice.session, config=tts.voice.config)
    other.voice.phoneme_ids_to_audio = broken
    with pytest.raises(InternalError, match="onnx exploded"):
        await collect(other, SENTENCE)
    stream = stream_of(other)
    stream.push_text(ANSWER)
    stream.end_input()
    with pytest.raises(InternalError):
        async for _ in stream:
            pass
    await stream.aclose()
    assert await other.wait_idle()


# --- loading ------------------------------------------------------------------------------------


def test_missing_voice_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(NotFound, match=re.escape(str(missing))):
        PiperTTS.load(TTSConfig(voice=str(missing)))
    lonely = tmp_path / "voice.onnx"
    lonely.write_bytes(b"x")
    with pytest.raises(NotFound, match=re.escape(f"{lonely}.json")):
        PiperTTS.load(TTSConfig(voice=str(lonely)))


def test_bad_speaker_id_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="speaker"):
        PiperTTS.load(TTSConfig(speaker_id=3))


# --- TTSStream ----------------------------------------------------------------------------------


async def test_stream_speaks_token_deltas_chunk_by_chunk(tts: PiperTTS, whisper: Any) -> None:
    deltas = token_deltas(ANSWER, seed=7)
    expected = TextChunker(tts.config.chunker)
    expected_chunks = [c for d in deltas for c in expected.push(d)] + expected.flush()
    assert len(expected_chunks) >= 3

    stream = stream_of(tts)

    async def feed() -> None:
        for d in deltas:
            stream.push_text(d)
            await asyncio.sleep(0)  # let synthesis start while text is still arriving
        stream.end_input()

    feeder = asyncio.create_task(feed())
    pieces: list[SynthesizedAudio] = [p async for p in stream]  # ends after end_input
    await feeder
    await stream.aclose()

    assert pieces[0].text == expected_chunks[0]
    assert [p.is_first_in_segment for p in pieces] == [True] + [False] * (len(pieces) - 1)
    spoken = [p.text for p in pieces if p.is_last_in_chunk]
    assert spoken == expected_chunks
    assert [p.chunk_index for p in pieces if p.is_last_in_chunk] == list(range(len(spoken)))
    assert all(p.sample_rate == tts.sample_rate and p.pcm.size > 0 for p in pieces)
    heard = transcribe(whisper, np.concatenate([p.pcm for p in pieces]), tts.sample_rate)
    assert wer(ANSWER, heard) <= 0.2, heard


#: The chunking these tests were written for: a first chunk of 3-6 words (a whole clause here).
CLAUSE_CHUNKS = ChunkerConfig(first_min_words=3, first_max_words=6)


async def test_stream_synthesizes_ahead_of_the_consumer(tts: PiperTTS) -> None:
    with count_onnx_runs(tts) as stats:
        async with stream_of(tts, CLAUSE_CHUNKS) as stream:
            stream.push_text("Hello there, my friend. How are you? I am fine.")
            stream.end_input()
            first = await anext(stream)
            assert first.chunk_index == 0
            # Without reading further, the next chunks get synthesized (bounded run-ahead).
            for _ in range(3000):
                if stats["runs"] >= 3:
                    break
                await asyncio.sleep(0.01)
            assert stats["runs"] == 3
            rest = [p.text async for p in stream]
        assert rest == ["How are you?", "I am fine."]
    assert await threads_gone(tts)


async def test_stream_flush_starts_new_segment(tts: PiperTTS) -> None:
    async with stream_of(tts, CLAUSE_CHUNKS) as stream:
        stream.push_text("Hello there, my good friend.")
        stream.flush()
        stream.push_text("And welcome back home.")
        stream.end_input()
        pieces = [p async for p in stream]
    assert [p.text for p in pieces] == ["Hello there, my good friend.", "And welcome back home."]
    assert [p.is_first_in_segment for p in pieces] == [True, True]
    with pytest.raises(FailedPrecondition):
        stream.push_text("more")


async def test_stream_aclose_mid_stream_stops_synthesis(tts: PiperTTS) -> None:
    with count_onnx_runs(tts) as stats:
        stream = stream_of(tts)
        stream.push_text(MANY)  # not ended: the stream waits for more text
        first = await anext(stream)
        assert first.is_first_in_segment
        await stream.aclose()
        assert await threads_gone(tts)
        assert stats["runs"] < 10
    assert [p async for p in stream] == []
    with pytest.raises(FailedPrecondition):
        stream.push_text("more")


async def test_stream_too_much_pending_text_is_resource_exhausted(tts: PiperTTS) -> None:
    small = PiperTTS(tts.voice, TTSConfig(max_pending_chunks=2), tts.voice_path)
    async with stream_of(small) as stream:
        with pytest.raises(ResourceExhausted):
            stream.push_text("One. Two. Three. Four. Five. Six. Seven. ")
    assert await small.wait_idle(within_s=30)


def test_memory_arena_follows_the_config(tts: PiperTTS) -> None:
    assert tts.voice.session.get_session_options().enable_cpu_mem_arena is True
    lean = PiperTTS.load(TTSConfig(memory_arena=False))
    assert lean.voice.session.get_session_options().enable_cpu_mem_arena is False


async def test_stream_speaks_pending_words_when_the_listener_runs_dry() -> None:
    """A slow word (many tokens) after the first chunk: once nothing is being synthesized and the
    listener has under cut_lead_ms of audio, the complete words so far go to synthesis at once."""
    started: list[str] = []
    buffer = [5000.0]

    async def synth(text: str) -> Any:
        started.append(text)
        yield np.zeros(160, np.float32)

    async with TTSStream(synth, sample_rate=16000, chunker=ChunkerConfig(adaptive=False, next_words=8),
                         buffer_ms=lambda: buffer[0], cut_lead_ms=600) as stream:
        stream.push_text("Sure, the boiling point of water is ")
        first = await anext(stream)  # the first chunk is synthesized: nothing in flight now
        assert first.text == "Sure, the boiling"
        stream.push_text("approx")
        for _ in range(5):
            await asyncio.sleep(0)
        assert started == ["Sure, the boiling"]  # plenty in hand: wait for a boundary
        buffer[0] = 400.0
        stream.push_text("imately")  # the listener runs dry: what is complete is spoken now
        for _ in range(5):
            await asyncio.sleep(0)  # (the synthesis task starts)
        assert started[-1] == "point of water is"
        buffer[0] = 1500.0  # that chunk's audio is in hand: boundaries again
        stream.push_text(" 100°C (212°F).")
        stream.end_input()
        texts = [p.text async for p in stream]
    assert texts == ["point of water is", "approximately 100°C (212°F)."]

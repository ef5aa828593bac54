"""faster-whisper ASR on Piper-synthesized English (real models)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from services.asr import ASRConfig, PartialTranscriber, Transcript, WhisperASR
from services.audio import MODEL_RATE, resample
from services.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from services.models import default_tts_voice
from tests.conftest import normalize, word_errors

SR = MODEL_RATE
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please turn off the lights in the kitchen before you go to bed.",
    "Could you tell me what the weather will be like tomorrow afternoon?",
)


def test_word_errors() -> None:
    assert word_errors(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert word_errors(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert word_errors(["a", "b"], []) == 2
    assert normalize("Hello, World! It's re-done.") == ["hello", "world", "it's", "re", "done"]


@pytest.fixture(scope="module")
def asr() -> Iterator[WhisperASR]:
    engine = WhisperASR.load(ASRConfig())
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    from piper import PiperVoice

    voice = PiperVoice.load(default_tts_voice())
    out = []
    for text in SENTENCES:
        chunks = list(voice.synthesize(text))
        audio = np.concatenate([c.audio_float_array for c in chunks])
        out.append(resample(audio, chunks[0].sample_rate, SR))
    return out


async def test_transcribe_wer(asr: WhisperASR, speech: list[np.ndarray]) -> None:
    # submitted together: they queue on the single CPU decode slot and all complete
    results = await asyncio.gather(*(asr.transcribe(a) for a in speech))
    errors = words = 0
    for text, audio, result in zip(SENTENCES, speech, results, strict=True):
        assert isinstance(result, Transcript)
        assert result.language == "en"
        assert result.duration_s == pytest.approx(audio.size / SR)
        assert result.decode_s > 0
        ref = normalize(text)
        errors += word_errors(ref, normalize(result.text))
        words += len(ref)
    wer = errors / words
    assert wer < 0.15, [r.text for r in results]
    assert asr.pending == 0


async def test_forced_language(asr: WhisperASR, speech: list[np.ndarray]) -> None:
    result = await asr.transcribe(speech[0], language="en")
    assert result.language == "en"
    assert "fox" in normalize(result.text)


async def test_invalid_inputs(asr: WhisperASR) -> None:
    with pytest.raises(InvalidArgument):
        await asr.transcribe(np.zeros(0, np.float32))
    with pytest.raises(InvalidArgument):
        await asr.transcribe(np.zeros((2, 100), np.float32))
    with pytest.raises(OutOfRange):
        await asr.transcribe(np.zeros(int((asr.cfg.max_audio_s + 1) * SR), np.float32))
    with pytest.raises(InvalidArgument):
        await asr.transcribe(np.zeros(SR, np.float32), language="xx")
    assert asr.pending == 0


def test_missing_local_model() -> None:
    with pytest.raises(NotFound):
        WhisperASR.load(ASRConfig(model="/nonexistent/whisper-ct2"))


async def test_busy_engine_queue_bound_and_cancel(
    asr: WhisperASR, speech: list[np.ndarray]
) -> None:
    engine = WhisperASR(asr.model, asr.cfg.model_copy(update={"max_queued": 1}))
    try:
        running = asyncio.create_task(engine.transcribe(speech[0]))
        await asyncio.sleep(0)  # the task reserves its slot before its first await
        assert engine.pending == 1
        assert await engine.try_transcribe(speech[1]) is None  # best effort: no free slot
        queued = asyncio.create_task(engine.transcribe(speech[1]))
        await asyncio.sleep(0)
        assert engine.pending == 2
        with pytest.raises(ResourceExhausted):
            await engine.transcribe(speech[1])
        queued.cancel()  # e.g. barge-in: a decode that has not started is dropped
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert "fox" in normalize((await running).text)
        assert engine.pending == 0
    finally:
        engine.close()


async def test_partial_transcriber(asr: WhisperASR, speech: list[np.ndarray]) -> None:
    audio = speech[1]
    now = [0.0]
    partial = PartialTranscriber(asr, interval_ms=500, language="en", clock=lambda: now[0])
    assert await partial.update(audio[: SR // 10]) is None  # shorter than min_audio_ms
    texts = []
    for end in (int(1.6 * SR), audio.size):
        text = await partial.update(audio[:end])
        if text is not None:
            texts.append(text)
        # an immediate repeat is skipped: the interval has not elapsed
        assert await partial.update(audio[: end + 1]) is None
        now[0] += 0.6
    assert texts, "no partial transcript produced"
    assert "kitchen" in normalize(texts[-1])
    assert partial.text == texts[-1]


async def test_partial_skips_while_decoding(asr: WhisperASR, speech: list[np.ndarray]) -> None:
    partial = PartialTranscriber(asr, interval_ms=100, language="en")
    first, second = await asyncio.gather(partial.update(speech[0]),
                                         partial.update(speech[0][: SR * 2]))
    assert first is not None and "fox" in normalize(first)
    assert second is None
    partial.reset()
    assert partial.text == "" and partial.due(SR)

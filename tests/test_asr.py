"""faster-whisper ASR on Piper-synthesized English, and the per-language engine router (real models)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from services.asr import ASRRouter, PartialTranscriber, WhisperASR, engines_for, whisper_name
from services.asr_base import ASRConfig, ASREngine, Transcript, requested_language
from services.audio import MODEL_RATE, resample
from services.batching import Priority
from services.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from services.models import default_tts_voice
from services.moonshine_asr import MoonshineASR
from tests.conftest import normalize, say, until, word_errors

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
        assert result.language == "en" and result.engine == "whisper-base"
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
        await until(lambda: engine.pending == 1 and engine.batcher.queued == 0)  # it runs
        assert await engine.try_transcribe(speech[1]) is None  # best effort: no free worker
        queued = asyncio.create_task(engine.transcribe(speech[1]))
        await until(lambda: engine.batcher.queued == 1)
        assert engine.pending == 2
        with pytest.raises(ResourceExhausted):
            await engine.transcribe(speech[1])
        queued.cancel()  # e.g. barge-in: a decode that has not started is dropped
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert "fox" in normalize((await running).text)
        await until(lambda: engine.pending == 0)
        assert engine.batcher.stats.items == 1  # the cancelled decode never ran
    finally:
        engine.close()


def test_batched_whisper_equals_transcribe(asr: WhisperASR, speech: list[np.ndarray]) -> None:
    """One CTranslate2 batch (fixed language, detected language, a silent window) gives what
    faster-whisper's own transcribe() gives each utterance alone."""
    engine = WhisperASR(asr.model, asr.cfg.model_copy(update={"max_batch": 4}))
    try:
        requests = [engine.request(speech[0], "en"), engine.request(speech[1], "auto"),
                    engine.request(np.zeros(SR, np.float32), "en"), engine.request(speech[2], "en")]
        batched = engine.decode_batch(requests)
        for request, got in zip(requests, batched, strict=True):
            alone = engine.decode_one(request)
            assert (got.text, got.language) == (alone.text, alone.language)
            assert got.language_probability == pytest.approx(alone.language_probability, abs=1e-6)
            assert got.batch_size == 4
        assert batched[1].language == "en" and "kitchen" in normalize(batched[1].text)
    finally:
        engine.close()


def test_whisper_batch_defaults(asr: WhisperASR) -> None:
    assert asr.max_batch == 1 and asr.concurrency == 1  # CPU: a batch costs as much as singles
    gpu = WhisperASR(asr.model, ASRConfig(device="cuda"))  # the choice only (the model is on CPU)
    try:
        assert gpu.max_batch == 8 and gpu.concurrency == 2
    finally:
        gpu.close()


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


# --- engine choice and routing -------------------------------------------------------------------


def test_whisper_interface(asr: WhisperASR) -> None:
    assert isinstance(asr, ASREngine)
    assert asr.name == "whisper-base" and "de" in asr.languages
    assert whisper_name("deepdml/faster-whisper-large-v3-turbo-ct2") == (
        "whisper:deepdml/faster-whisper-large-v3-turbo-ct2")
    assert whisper_name("/models/my-whisper/") == "whisper:my-whisper"


def test_engines_for_config() -> None:
    assert engines_for(ASRConfig()) == ("moonshine", "whisper")
    assert engines_for(ASRConfig(device="cuda")) == ("whisper",)  # auto on GPU
    assert engines_for(ASRConfig(engine="whisper")) == ("whisper",)
    assert engines_for(ASRConfig(engine="moonshine")) == ("moonshine",)
    assert ASRConfig().default_language == "en"


def test_requested_language() -> None:
    cfg = ASRConfig()
    assert requested_language(None, cfg) == "en"  # the configured default
    assert requested_language("", cfg) == "en"
    assert requested_language("DE", cfg) == "de"
    assert requested_language("auto", cfg) is None  # the session asks for detection
    assert requested_language(None, ASRConfig(default_language=None)) is None
    assert requested_language(None, ASRConfig(default_language="auto")) is None


@pytest.fixture(scope="module")
def moonshine() -> Iterator[MoonshineASR]:
    engine = MoonshineASR.load(ASRConfig())
    yield engine
    engine.close()


def test_router_routes_by_language(asr: WhisperASR, moonshine: MoonshineASR) -> None:
    router = ASRRouter(ASRConfig(), moonshine, asr)
    assert isinstance(router, ASREngine)
    assert router.name == "moonshine-tiny-en+whisper-base"
    assert router.languages == asr.languages
    assert router.engine_for(None) is moonshine  # default_language 'en'
    assert router.engine_for("en") is moonshine
    assert router.engine_for("de") is asr
    assert router.engine_for("auto") is asr  # detection needs Whisper
    assert ASRRouter(ASRConfig(default_language="fr"), moonshine, asr).engine_for(None) is asr
    assert ASRRouter(ASRConfig(default_language=None), moonshine, asr).engine_for(None) is asr
    info = router.describe()
    assert info["model"] == "moonshine-tiny-en"
    assert set(info["engines"]) == {"moonshine-tiny-en", "whisper-base"}
    assert info["engines"]["moonshine-tiny-en"]["languages"] == "en"


async def test_router_transcribes_each_language_with_its_engine(
    asr: WhisperASR, moonshine: MoonshineASR
) -> None:
    router = ASRRouter(ASRConfig(), moonshine, asr)
    english = await router.transcribe(say("What is the capital of France?"))
    assert english.engine == "moonshine-tiny-en" and english.language == "en"
    assert normalize(english.text) == ["what", "is", "the", "capital", "of", "france"]
    # Piper has only an English voice: this checks the route and that Whisper decodes German
    # without error, not German accuracy
    german = await router.transcribe(say("Guten Morgen, wie geht es dir?"), "de")
    assert german.engine == "whisper-base" and german.language == "de" and german.text
    detected = await router.transcribe(say("Good morning."), "auto")
    assert detected.engine == "whisper-base" and detected.language == "en"
    partial = await router.try_transcribe(say("Good morning."), "en")
    assert partial is not None and partial.engine == "moonshine-tiny-en"
    speculative = await router.transcribe(say("Good morning."), "en", Priority.SPECULATIVE)
    assert speculative.text == partial.text
    assert router.transcribe_sync(say("Good morning."), "en", "barge_in").text == partial.text
    assert router.pending == 0


def test_moonshine_only_router_refuses_other_languages(moonshine: MoonshineASR) -> None:
    router = ASRRouter(ASRConfig(engine="moonshine"), moonshine)
    assert router.engine_for("en") is moonshine
    with pytest.raises(InvalidArgument, match="'de' needs Whisper"):
        router.engine_for("de")
    with pytest.raises(InvalidArgument, match="language detection needs Whisper"):
        router.engine_for("auto")
    with pytest.raises(InvalidArgument):
        ASRRouter(ASRConfig())


def test_asr_deployment_warms_every_engine() -> None:
    """The first turn after start must not pay for first-decode set-up: warm-up ran for both
    engines before the deployment took traffic (structure, not timing)."""
    from deployments.stage_deployments import ASRDeployment

    deployment = ASRDeployment.func_or_class()  # type: ignore[attr-defined]  # the plain class, no Ray
    try:
        info = asyncio.run(deployment.info())
        assert info["model"] == "moonshine-tiny-en"
        for name in ("moonshine-tiny-en", "whisper-base"):
            assert info["engines"][name]["warm_up_s"] > 0
        result = asyncio.run(deployment.transcribe(say("Set a timer for ten minutes."), None))
        assert result["engine"] == "moonshine-tiny-en" and "timer" in normalize(result["text"])
        assert result["batch_size"] == 1 and info["engines"]["moonshine-tiny-en"]["max_batch"] == 8
        spec = asyncio.run(deployment.transcribe(say("Set a timer for ten minutes."), None, 2))
        assert spec["text"] == result["text"]
        with pytest.raises(InvalidArgument, match="unknown priority"):
            asyncio.run(deployment.transcribe(say("Hi."), None, "urgent"))
    finally:
        deployment.asr.close()

"""Silero VAD: model wrapper, segmenter logic, streaming on real (Piper) speech."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest

from services.audio import MODEL_RATE, resample
from services.conversation.vad_stream import SpeechEnd, SpeechStart, VADSegmenter, VADStream
from services.errors import InvalidArgument, NotFound
from services.models import default_tts_voice
from services.vad import WINDOW, SileroModel, VADBatcher, VADConfig, VADState

SR = MODEL_RATE
MS = SR // 1000


@pytest.fixture(scope="module")
def model() -> SileroModel:
    return SileroModel.load(VADConfig())


@pytest.fixture(scope="module")
def sentences() -> list[np.ndarray]:
    from piper import PiperVoice

    voice = PiperVoice.load(default_tts_voice())
    out = []
    for text in ("The quick brown fox jumps over the lazy dog.",
                 "Please close the window before you leave."):
        chunks = list(voice.synthesize(text))
        audio = np.concatenate([c.audio_float_array for c in chunks])
        out.append(resample(audio, chunks[0].sample_rate, SR))
    return out


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def bounds_ms(audio: np.ndarray, offset: int) -> tuple[float, float]:
    """First and last clearly non-silent sample of synthesized speech, in ms from stream start."""
    loud = np.nonzero(np.abs(audio) > 0.02)[0]
    return (offset + loud[0]) / MS, (offset + loud[-1]) / MS


async def run_stream(model: SileroModel, audio: np.ndarray, chunk: int,
                     cfg: VADConfig | None = None) -> list:
    vad = VADStream(model.score, cfg or VADConfig())
    events = []
    for i in range(0, audio.size, chunk):
        events += await vad.push(audio[i : i + chunk])
    return events + await vad.flush()


def segments(events: list) -> list[tuple[int, int]]:
    return [(e.start_ms, e.end_ms) for e in events if isinstance(e, SpeechEnd)]


# --- model --------------------------------------------------------------------------------------


def test_probs_windows_and_leftover(model: SileroModel, sentences: list[np.ndarray]) -> None:
    x = np.concatenate([silence(0.5), sentences[0]])
    probs, state = model.probs(x[:1000], VADState())
    assert probs.shape == (1,)
    assert state.leftover.size == 1000 - WINDOW
    assert state.rnn.shape == (2, 1, 128) and state.context.shape == (64,)
    rest, state = model.probs(x[1000:], state)
    full, _ = model.probs(x, VADState())
    np.testing.assert_allclose(np.concatenate([probs, rest]), full, atol=1e-5)
    assert full[: 8].max() < 0.2  # leading silence
    assert full.max() > 0.9  # speech


def test_state_is_picklable_and_resumes(model: SileroModel, sentences: list[np.ndarray]) -> None:
    x = sentences[0]
    first, state = model.probs(x[:5000], VADState())
    state = pickle.loads(pickle.dumps(state))
    second, _ = model.probs(x[5000:], state)
    full, _ = model.probs(x, VADState())
    np.testing.assert_allclose(np.concatenate([first, second]), full, atol=1e-5)


def test_probs_many_equals_single_calls(model: SileroModel, sentences: list[np.ndarray]) -> None:
    a, b = sentences[0][:9000], sentences[1][:4000]
    batched = model.probs_many([(a, VADState()), (b, VADState()), (a[:100], VADState())])
    for (p, st), x in zip(batched, (a, b, a[:100]), strict=True):
        ref, ref_st = model.probs(x, VADState())
        np.testing.assert_allclose(p, ref, atol=1e-5)
        np.testing.assert_allclose(st.rnn, ref_st.rnn, atol=1e-5)
        np.testing.assert_array_equal(st.leftover, ref_st.leftover)


async def test_batcher_scores_many_streams_as_each_alone(model: SileroModel,
                                                         sentences: list[np.ndarray]) -> None:
    """Sessions pushing chunks of different sizes at once: every stream gets the events and
    probabilities it gets alone, and the windows of concurrent streams share model calls."""
    audios = [np.concatenate([silence(0.3 * (k % 3)), sentences[k % 2], silence(0.8)]) for k in range(8)]
    chunks = [320, 512, 480, 1000, 160, 2048, 512, 700]  # 10-128 ms per message
    batcher = VADBatcher(model, tick_ms=2.0)
    try:
        streams = [VADStream(batcher, VADConfig()) for _ in audios]

        async def feed(k: int) -> tuple[list, list[float]]:
            events, probs = [], []
            for i in range(0, audios[k].size, chunks[k]):
                events += await streams[k].push(audios[k][i : i + chunks[k]])
                probs.append(streams[k].last_prob)
            return events + await streams[k].flush(), probs

        together = await asyncio.gather(*(feed(k) for k in range(len(audios))))
        for k, (events, probs) in enumerate(together):
            alone = VADStream(model.score, VADConfig())
            ref_events, ref_probs = [], []
            for i in range(0, audios[k].size, chunks[k]):
                ref_events += await alone.push(audios[k][i : i + chunks[k]])
                ref_probs.append(alone.last_prob)
            ref_events += await alone.flush()
            assert segments(events) == segments(ref_events) and len(segments(events)) == 1
            np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
        stats = batcher.stats
        assert stats.items > stats.batches  # windows of several streams went in one call
        with pytest.raises(InvalidArgument):
            await batcher.score(np.zeros((2, 512), np.float32), VADState())  # fails alone
        none, state = await batcher.score(np.zeros(100, np.float32), VADState())
        assert none.size == 0 and state.leftover.size == 100  # no whole window: no model call
    finally:
        batcher.close()


def test_bad_inputs(model: SileroModel) -> None:
    with pytest.raises(InvalidArgument):
        model.probs(np.zeros((2, 512), np.float32), VADState())
    with pytest.raises(NotFound):
        SileroModel.load(VADConfig(model="/nonexistent/silero.onnx"))


# --- streaming on real speech -------------------------------------------------------------------


async def test_one_sentence_one_segment(model: SileroModel, sentences: list[np.ndarray]) -> None:
    speech = sentences[0]
    lead = SR
    audio = np.concatenate([silence(1.0), speech, silence(1.0)])
    events = await run_stream(model, audio, 512)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    true_start, true_end = bounds_ms(speech, lead)
    start, end = segments(events)[0]
    assert abs(start - true_start) <= 300, (start, true_start)
    assert abs(end - true_end) <= 300, (end, true_end)
    assert events[0].start_ms == start
    end_ev = events[1]
    assert end_ev.reason == "silence"
    cfg = VADConfig()
    # the utterance carries the pre-roll before the trigger and a little audio after the end
    expected = (end - start + cfg.pre_roll_ms + cfg.post_roll_ms) * MS
    assert abs(end_ev.audio.size - expected) <= WINDOW
    assert np.abs(end_ev.audio).max() > 0.1


async def test_two_sentences_two_segments(model: SileroModel, sentences: list[np.ndarray]) -> None:
    audio = np.concatenate([silence(1.0), sentences[0], silence(1.5), sentences[1], silence(1.0)])
    segs = segments(await run_stream(model, audio, 512))
    assert len(segs) == 2
    second_start, _ = bounds_ms(sentences[1], SR + sentences[0].size + int(1.5 * SR))
    assert segs[0][1] < segs[1][0]
    assert abs(segs[1][0] - second_start) <= 300


async def test_silence_and_low_noise_give_no_events(model: SileroModel) -> None:
    assert await run_stream(model, silence(3.0), 512) == []
    noise = np.random.default_rng(0).normal(0, 0.005, 3 * SR).astype(np.float32)
    assert await run_stream(model, noise, 512) == []


async def test_chunk_size_does_not_change_segments(
    model: SileroModel, sentences: list[np.ndarray]
) -> None:
    audio = np.concatenate([silence(0.7), sentences[0], silence(1.2), sentences[1], silence(0.6)])
    results = {}
    for chunk in (160, 512, 1000):
        events = await run_stream(model, audio, chunk)
        results[chunk] = [(type(e).__name__, e.start_ms, getattr(e, "end_ms", None))
                          for e in events]
    assert results[160] == results[512] == results[1000]
    assert len(segments(await run_stream(model, audio, 1000))) == 2


async def test_flush_closes_open_utterance(model: SileroModel, sentences: list[np.ndarray]) -> None:
    vad = VADStream(model.score)
    events = await vad.push(np.concatenate([silence(0.5), sentences[0][: SR]]))
    assert [type(e) for e in events] == [SpeechStart]
    assert vad.segmenter.in_speech and vad.segmenter.state == "speech"
    current = vad.segmenter.current_audio()
    assert current is not None and current.size > SR // 2
    tail = await vad.flush()
    assert len(tail) == 1 and isinstance(tail[0], SpeechEnd) and tail[0].reason == "flush"
    assert not vad.segmenter.in_speech


# --- segmenter logic (synthetic probabilities) --------------------------------------------------


def feed_probs(seg: VADSegmenter, probs: list[float]) -> list:
    """Feeds windows whose audio is the running sample index, so slices can be checked exactly."""
    start = seg.position_ms * MS
    audio = np.arange(start, start + len(probs) * WINDOW, dtype=np.float32)
    return seg.feed(np.array(probs, np.float32), audio)


CFG = VADConfig(threshold=0.5, neg_threshold=0.3, min_speech_ms=200, min_silence_ms=320,
                pre_roll_ms=64, post_roll_ms=32, max_utterance_s=2.0)
W_MS = WINDOW // MS  # 32 ms per window


def test_segmenter_start_end_and_audio_slice() -> None:
    seg = VADSegmenter(CFG)
    events = feed_probs(seg, [0.0] * 10 + [0.9] * 20 + [0.0] * 12)
    assert events == [SpeechStart(10 * W_MS), events[1]]
    end = events[1]
    assert (end.start_ms, end.end_ms) == (10 * W_MS, 30 * W_MS)
    # audio = pre-roll (64 ms) before the start .. post-roll (32 ms) after the end
    assert end.audio[0] == (10 * W_MS - 64) * MS
    assert end.audio[-1] == (30 * W_MS + 32) * MS - 1
    assert seg.state == "silence"


def test_segmenter_start_is_announced_after_min_speech() -> None:
    seg = VADSegmenter(CFG)
    assert feed_probs(seg, [0.9] * 6) == []  # 192 ms < 200 ms
    assert seg.state == "pending"
    assert feed_probs(seg, [0.9]) == [SpeechStart(0)]
    assert seg.in_speech
    audio = seg.current_audio()
    assert audio is not None and audio.size == 7 * WINDOW


def test_segmenter_drops_blips() -> None:
    seg = VADSegmenter(CFG)
    assert feed_probs(seg, [0.0] * 5 + [0.9] * 3 + [0.0] * 30) == []
    assert seg.flush() == []


def test_segmenter_hysteresis() -> None:
    seg = VADSegmenter(CFG.model_copy(update={"max_utterance_s": 10.0}))
    # probabilities between neg_threshold and threshold keep speech going
    events = feed_probs(seg, [0.9] * 10 + [0.4] * 30 + [0.9] * 5)
    assert events == [SpeechStart(0)]
    # short dips below neg_threshold (< min_silence) do not end it
    assert feed_probs(seg, [0.1] * 5 + [0.9] * 5) == []
    events = feed_probs(seg, [0.1] * 10)
    assert len(events) == 1 and isinstance(events[0], SpeechEnd)
    assert events[0].end_ms == 55 * W_MS


def test_segmenter_forces_end_at_max_length() -> None:
    seg = VADSegmenter(CFG)
    events = feed_probs(seg, [0.9] * 100)  # 3.2 s of speech, max 2 s
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert ends and ends[0].reason == "max_length"
    assert ends[0].audio.size <= 2 * SR  # pre-roll included, so ASR's max_audio_s holds
    assert ends[0].audio.size > 2 * SR - 2 * WINDOW
    # speech goes on: a new utterance starts right after, without reusing old audio
    assert isinstance(events[-1], SpeechStart) or seg.state != "silence"
    tail = seg.flush()
    assert len(tail) == 1 and isinstance(tail[0], SpeechEnd)
    assert tail[0].audio[0] >= ends[0].end_ms * MS


def test_segmenter_rejects_mismatched_audio() -> None:
    seg = VADSegmenter(CFG)
    with pytest.raises(InvalidArgument):
        seg.feed(np.ones(2, np.float32), np.zeros(WINDOW, np.float32))


def test_neg_threshold_default() -> None:
    assert VADConfig(threshold=0.5).effective_neg_threshold() == pytest.approx(0.35)
    assert VADConfig(threshold=0.5, neg_threshold=0.8).effective_neg_threshold() == 0.5


async def test_gateway_stages_batch_vad_across_sessions(model: SileroModel,
                                                        sentences: list[np.ndarray]) -> None:
    """The gateway's stages score local VAD through one batcher (batch_tick_ms > 0, the default)
    or inline (0); both give what the model gives."""
    from typing import Any

    from deployments.remote import RemoteStages

    none: Any = None  # the stage handles are not used for local VAD
    chunk = sentences[0][:1600]
    ref, ref_state = model.probs(chunk, VADState())
    batched = RemoteStages(none, none, none, none, local_vad=model)
    assert batched.vad_batcher is not None
    try:
        probs, state = await batched.vad_probs(chunk, VADState())
        np.testing.assert_allclose(probs, ref, atol=1e-5)
        np.testing.assert_array_equal(state.leftover, ref_state.leftover)
    finally:
        batched.vad_batcher.close()
    inline = RemoteStages(none, none, none, none, local_vad=SileroModel.load(VADConfig(batch_tick_ms=0)))
    assert inline.vad_batcher is None
    probs, _ = await inline.vad_probs(chunk, VADState())
    np.testing.assert_allclose(probs, ref, atol=1e-5)

"""Moonshine Tiny English on Piper-synthesized speech (real model, loaded once)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.asr import PartialTranscriber
from services.asr_base import ASRConfig, ASREngine, Transcript
from services.audio import MODEL_RATE
from services.batching import Priority
from services.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted, Unavailable
from services.models import moonshine_source
from services.moonshine_asr import (
    MAX_SEGMENT_S,
    MoonshineASR,
    MoonshineTokenizer,
    clean_line,
    model_arch_name,
    model_language,
    split_for_model,
    with_quiet_edges,
)
from tests.conftest import normalize, say, until, word_errors

SR = MODEL_RATE
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please turn off the lights in the kitchen before you go to bed.",
    "Could you tell me what the weather will be like tomorrow afternoon?",
    "What is the capital of France?",
    "Set a timer for ten minutes.",
    "How far is it from London to Paris by train?",
    "Remind me to call my mother on Sunday evening.",
    "Can you recommend a good book about the history of science?",
)


@pytest.fixture(scope="module")
def asr() -> Iterator[MoonshineASR]:
    engine = MoonshineASR.load(ASRConfig())
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    return [say(text) for text in SENTENCES]


def test_interface(asr: MoonshineASR) -> None:
    assert isinstance(asr, ASREngine)
    assert asr.name == "moonshine-tiny-en"
    assert asr.languages == frozenset({"en"})
    assert asr.concurrency == 1 and asr.pending == 0
    # batching is on by default, with the decoder made batch-safe (checked bit for bit at load)
    assert asr.max_batch == 8 and asr.model.batch_decoder is not None
    # never imported: the microphone library (PortAudio)
    assert "sounddevice" not in sys.modules


def reference_texts(audios: list[np.ndarray]) -> list[str]:
    """What Moonshine's own C library (moonshine-voice) makes of the same audio, as the engine
    used it before batching: quiet edges added, its VAD off (one segment), lines cleaned."""
    from moonshine_voice.moonshine_api import ModelArch
    from moonshine_voice.transcriber import Transcriber

    transcriber = Transcriber(str(moonshine_source()), ModelArch.TINY,
                              options={"vad_threshold": "0", "return_audio_data": "false"})
    try:
        out = []
        for audio in audios:
            lines = transcriber.transcribe_without_streaming(with_quiet_edges(audio).tolist(), SR).lines
            out.append(" ".join(filter(None, (clean_line(line.text) for line in lines))))
        return out
    finally:
        transcriber.close()


def test_batched_decodes_equal_single_decodes_and_moonshines_own(
        asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    requests = [asr.request(a, "en") for a in speech]
    alone = [asr.decode_batch([r])[0].text for r in requests]
    together = [t.text for t in asr.decode_batch(requests)]
    assert together == alone
    shuffled = [requests[i] for i in (5, 2, 7, 0, 3)]  # other companions, other padding
    assert [t.text for t in asr.decode_batch(shuffled)] == [alone[i] for i in (5, 2, 7, 0, 3)]
    # Moonshine's C library links its own onnxruntime build, whose int8 kernels may round a
    # borderline case differently, and not the same way from run to run: equal on 40 of 40 Piper
    # sentences in one check, 7 of 8 in another ("a good book" / "the good book"), 6 of 8 in a
    # full-suite run, and once two words apart on a garbled sentence ("Half-arr is it" / "Half-arms
    # it"). So the library is asked twice, and our decode is held to the nearer of its answers:
    # no sentence differs by more than a word, and at most two differ at all.
    references = [reference_texts(speech), reference_texts(speech)]
    nearest = [min(word_errors(normalize(ref[i]), normalize(a)) for ref in references)
               for i, a in enumerate(alone)]
    assert sum(e == 0 for e in nearest) >= len(speech) - 2, list(zip(alone, *references, strict=True))
    assert max(nearest) <= 1, list(zip(alone, *references, nearest, strict=True))


async def test_concurrent_sessions_share_batches(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    alone = [asr.decode_batch([asr.request(a, "en")])[0].text for a in speech]
    results = await asyncio.gather(*(asr.transcribe(a) for a in speech))
    assert [r.text for r in results] == alone
    assert max(r.batch_size for r in results) > 1
    assert asr.pending == 0


def test_short_utterance_returns_before_the_long_one(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    """Rows leave the batch when they end: the short transcript is handed back first."""
    short, long = asr.decode_batch([asr.request(say("Yes."), "en"),
                                    asr.request(np.concatenate(speech[:3]), "en")])
    assert normalize(short.text) == ["yes"]
    assert short.decode_s < long.decode_s and short.batch_size == long.batch_size == 2


def test_long_utterance_is_decoded_in_pieces(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    audio = np.concatenate(speech)  # ~25 s
    pieces = split_for_model(audio)
    assert len(pieces) == 2 and all(p.size <= MAX_SEGMENT_S * SR for p in pieces)
    assert np.array_equal(np.concatenate(pieces), audio)
    text = asr.transcribe_sync(audio).text
    words = normalize(text)
    assert "fox" in words and "science" in words, text
    errors = word_errors([w for s in SENTENCES for w in normalize(s)], words)
    assert errors / len(words) < 0.15, text


def test_tokenizer_file(tmp_path: Path) -> None:
    tok = MoonshineTokenizer.load(moonshine_source() / "tokenizer.bin")
    assert len(tok.pieces) == 32768 and tok.pieces[1] == b"<s>" and tok.pieces[2] == b"</s>"
    assert tok.decode([1, 2]) == ""  # special tokens are not text
    (tmp_path / "t.bin").write_bytes(bytes([3]) + b"ab")  # says 3 bytes, has 2
    with pytest.raises(InvalidArgument, match="truncated"):
        MoonshineTokenizer.load(tmp_path / "t.bin")


async def test_wer_on_piper(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    # submitted together: they queue on the single decode slot and all complete
    results = await asyncio.gather(*(asr.transcribe(a) for a in speech))
    errors = words = 0
    for text, audio, result in zip(SENTENCES, speech, results, strict=True):
        assert isinstance(result, Transcript)
        assert result.language == "en" and result.engine == "moonshine-tiny-en"
        assert result.duration_s == pytest.approx(audio.size / SR)
        assert result.decode_s > 0
        ref = normalize(text)
        errors += word_errors(ref, normalize(result.text))
        words += len(ref)
    assert errors / words < 0.10, [r.text for r in results]
    assert asr.pending == 0


async def test_leading_and_trailing_silence(asr: MoonshineASR) -> None:
    """Our VAD keeps ~0.3 s around speech: it must not turn into words ("You")."""
    pad = np.zeros(int(0.3 * SR), np.float32)
    result = await asr.transcribe(np.concatenate([pad, say("What is the capital of France?"), pad]))
    assert normalize(result.text) == ["what", "is", "the", "capital", "of", "france"]


async def test_short_tail_still_ends_the_sentence(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    """A speculative decode starts ~200 ms into the silence: the transcript must still end with
    a full stop or question mark, not the comma Moonshine wrote there without added quiet."""
    for audio in speech:
        loud = np.flatnonzero(np.abs(audio) > 0.01)
        clipped = np.concatenate([audio[: loud[-1] + 1], np.zeros(SR // 5, np.float32)])
        text = (await asr.transcribe(clipped)).text
        assert text[-1] in ".?!", text


def test_quiet_edges_and_cleanup() -> None:
    speech = np.full(SR, 0.5, np.float32)
    padded = with_quiet_edges(speech)
    assert padded.size == SR + SR // 5 + SR // 2
    assert np.array_equal(padded[SR // 5 : SR // 5 + SR], speech)
    enough = np.concatenate([np.zeros(SR // 2, np.float32), speech, np.zeros(SR, np.float32)])
    assert with_quiet_edges(enough) is enough  # nothing to add: no copy
    assert clean_line(' "\'Please come to-night.\' ') == "Please come tonight."
    assert clean_line("To-morrow at nine.") == "Tomorrow at nine."
    assert clean_line("It's fine.") == "It's fine."


async def test_invalid_inputs(asr: MoonshineASR) -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        await asr.transcribe(np.zeros(0, np.float32))
    with pytest.raises(InvalidArgument, match="1-D"):
        await asr.transcribe(np.zeros((2, 100), np.float32))
    with pytest.raises(InvalidArgument, match="NaN"):
        await asr.transcribe(np.full(SR, np.nan, np.float32))
    with pytest.raises(OutOfRange):
        await asr.transcribe(np.zeros(int((asr.cfg.max_audio_s + 1) * SR), np.float32))
    with pytest.raises(InvalidArgument, match="'de' is not supported by moonshine-tiny-en"):
        await asr.transcribe(np.zeros(SR, np.float32), language="de")
    with pytest.raises(InvalidArgument, match="cannot detect"):
        await asr.transcribe(np.zeros(SR, np.float32), language="auto")
    assert asr.pending == 0


async def test_forced_english_and_default_language(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    assert (await asr.transcribe(speech[0], "EN")).language == "en"
    no_default = MoonshineASR.load(ASRConfig(default_language=None))
    try:
        with pytest.raises(InvalidArgument, match="cannot detect"):
            no_default.transcribe_sync(speech[0])
        assert "fox" in normalize(no_default.transcribe_sync(speech[0], "en").text)
    finally:
        no_default.close()


async def test_busy_engine_queue_bound_and_cancel(speech: list[np.ndarray]) -> None:
    engine = MoonshineASR.load(ASRConfig(max_queued=1, max_batch=1))
    long = np.concatenate(speech)  # ~25 s: a decode that runs for a while
    try:
        running = asyncio.create_task(engine.transcribe(long))
        await until(lambda: engine.pending == 1 and engine.batcher.queued == 0)  # it runs
        assert await engine.try_transcribe(speech[0]) is None  # best effort: no free worker
        queued = asyncio.create_task(engine.transcribe(speech[0]))
        await until(lambda: engine.batcher.queued == 1)
        assert engine.pending == 2
        with pytest.raises(ResourceExhausted):
            await engine.transcribe(speech[0])
        queued.cancel()  # e.g. barge-in: a decode that has not started is dropped
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert engine.batcher.queued == 0
        assert "kitchen" in normalize((await running).text)
        await until(lambda: engine.pending == 0)
        assert engine.batcher.stats.items == 1  # the cancelled decode never ran
    finally:
        engine.close()
    with pytest.raises(Unavailable):
        await engine.transcribe(speech[0])
    with pytest.raises(Unavailable):
        engine.transcribe_sync(speech[0])


async def test_finals_go_before_speculative_work(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    """While a long decode runs, three speculative decodes queue, then a final: the final goes
    in the next batch (two seats) and completes before the speculative work queued before it."""
    engine = MoonshineASR(asr.model, asr.cfg.model_copy(update={"max_batch": 2}), asr.name, asr.languages)
    done: list[str] = []

    async def ask(name: str, audio: np.ndarray, priority: Priority) -> Transcript:
        result = await engine.transcribe(audio, "en", priority)
        done.append(name)
        return result

    try:
        blocker = asyncio.create_task(ask("long", np.concatenate(speech), Priority.FINAL))
        await until(lambda: engine.pending == 1 and engine.batcher.queued == 0)
        specs = [asyncio.create_task(ask(f"spec{i}", speech[i], Priority.SPECULATIVE)) for i in range(3)]
        await until(lambda: engine.batcher.queued == 3)
        final = asyncio.create_task(ask("final", speech[4], Priority.parse("final")))
        await until(lambda: engine.batcher.queued == 4)
        await asyncio.gather(blocker, final, *specs)
        assert done.index("final") < done.index("spec1") and done.index("final") < done.index("spec2")
        assert engine.batcher.stats.sizes[2] == 2  # [final, spec0], then [spec1, spec2]
    finally:
        engine.close()


async def test_two_decode_slots(speech: list[np.ndarray]) -> None:
    engine = MoonshineASR.load(ASRConfig(max_concurrent=2))
    try:
        assert engine.concurrency == 2
        results = await asyncio.gather(*(engine.transcribe(a) for a in speech[:4]))
        # how the four land in batches depends on timing, and a batch's padding moves a borderline
        # word of the tiny model now and then ("quit-brown fox jumped", once in a fresh clone on
        # a Zen 3): two slots must transcribe, not match a single decode word for word
        for text, result in zip(SENTENCES, results, strict=False):
            assert word_errors(normalize(text), normalize(result.text)) <= 2, result.text
    finally:
        engine.close()


async def test_partial_transcriber(asr: MoonshineASR, speech: list[np.ndarray]) -> None:
    audio = speech[1]
    now = [0.0]
    partial = PartialTranscriber(asr, interval_ms=500, clock=lambda: now[0])
    texts = []
    for end in (int(1.6 * SR), audio.size):
        text = await partial.update(audio[:end])
        if text is not None:
            texts.append(text)
        now[0] += 0.6
    assert texts and "kitchen" in normalize(texts[-1])


def test_warm_up(asr: MoonshineASR) -> None:
    seconds = asr.warm_up()
    assert asr.warm_up_s == seconds > 0


def test_user_model_folder(tmp_path: Path, speech: list[np.ndarray]) -> None:
    folder = tmp_path / "my-models" / "tiny-en"
    folder.mkdir(parents=True)
    for f in moonshine_source().iterdir():
        (folder / f.name).symlink_to(f)
    engine = MoonshineASR.load(ASRConfig(moonshine_model=str(folder)))
    try:
        assert engine.name == "moonshine:tiny-en" and engine.languages == {"en"}
        assert "fox" in normalize(engine.transcribe_sync(speech[0]).text)
    finally:
        engine.close()


def test_bad_model_folders(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not found"):
        MoonshineASR.load(ASRConfig(moonshine_model=str(tmp_path / "missing")))
    with pytest.raises(NotFound, match="hub ids are not supported"):
        MoonshineASR.load(ASRConfig(moonshine_model="UsefulSensors/moonshine-tiny"))
    with pytest.raises(NotFound, match=r"tokenizer\.bin"):
        MoonshineASR.load(ASRConfig(moonshine_model=str(tmp_path)))
    (tmp_path / "tokenizer.bin").write_bytes(b"junk")
    (tmp_path / "encoder_model.ort").write_bytes(b"junk")
    with pytest.raises(NotFound, match=r"decoder_model_merged\.ort missing"):
        MoonshineASR.load(ASRConfig(moonshine_model=str(tmp_path)))
    (tmp_path / "decoder_model_merged.ort").write_bytes(b"junk")
    with pytest.raises(InvalidArgument, match="cannot load the Moonshine model"):
        MoonshineASR.load(ASRConfig(moonshine_model=str(tmp_path)))
    streaming = tmp_path / "tiny-streaming-en"
    streaming.mkdir()
    (streaming / "tokenizer.bin").write_bytes(b"junk")
    (streaming / "encoder.ort").write_bytes(b"junk")
    with pytest.raises(InvalidArgument, match="streaming"):
        MoonshineASR.load(ASRConfig(moonshine_model=str(streaming)))


def test_folder_names() -> None:
    assert model_arch_name(Path("tiny-en")) == "tiny"
    assert model_arch_name(Path("/m/base-en")) == "base"
    assert model_arch_name(Path("base-streaming-en")) == "base-streaming"
    assert model_arch_name(Path("custom")) == "tiny"
    assert model_language(Path("base-es")) == "es"
    assert model_language(Path("custom")) == "en"

"""Smart Turn v3.2 on Piper speech (real model, loaded once) and the transcript heuristic."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from services.audio import MODEL_RATE
from services.conversation.policies import transcript_looks_incomplete
from services.errors import InvalidArgument, NotFound, Unavailable
from services.models import smart_turn_source
from services.turn_detection import (
    N_FRAMES,
    N_MELS,
    WINDOW,
    SmartTurnModel,
    TurnDetectorConfig,
)
from tests.conftest import say

#: What a VAD hands over when it first sees silence: the speech plus ~200 ms of quiet.
TAIL = np.zeros(MODEL_RATE // 5, np.float32)

# Piper speaks every text with final intonation, so a cut sentence only sounds unfinished with a
# filler or a clearly dangling clause; "I would like to order" alone scored 0.77 (complete), which
# is why the transcript check exists. These pairs scored far from 0.5 in 5 renders each.
COMPLETE = ("What is the capital of France?", "Set a timer for ten minutes.", "Hello.")
INCOMPLETE = ("I would like to order, um", "So I was thinking that we could", "I was wondering if")


def turn(text: str) -> np.ndarray:
    return np.concatenate([say(text), TAIL])


@pytest.fixture(scope="module")
def model() -> Iterator[SmartTurnModel]:
    m = SmartTurnModel.load(TurnDetectorConfig())
    yield m
    m.close()


def test_loads_the_embedded_model(model: SmartTurnModel) -> None:
    assert model.path == str(smart_turn_source())
    assert model.name == "smart-turn-v3.2"
    assert model.cfg.threshold == 0.5 and model.cfg.num_threads == 1
    assert model.warm_up() > 0 and model.warm_up_s is not None


@pytest.mark.parametrize("text", COMPLETE)
def test_finished_sentence_scores_complete(model: SmartTurnModel, text: str) -> None:
    p = model.predict(turn(text))
    # the spoken sentence differs a little per synthesis: "Hello." scored 0.72 once in a fresh clone
    assert p > 0.6 and model.is_complete(p), p


@pytest.mark.parametrize("text", INCOMPLETE)
def test_cut_sentence_scores_incomplete(model: SmartTurnModel, text: str) -> None:
    p = model.predict(turn(text))
    assert p < 0.3 and not model.is_complete(p), p


def test_predict_many_matches_predict(model: SmartTurnModel) -> None:
    audios = [turn(t) for t in COMPLETE + INCOMPLETE]
    single = [model.predict(a) for a in audios]
    assert model.predict_many(audios) == pytest.approx(single, abs=1e-5)
    batched = SmartTurnModel(model.session, TurnDetectorConfig(max_batch=4), model.path)
    assert batched.predict_many(audios) == pytest.approx(single, abs=1e-4)  # one call per 4
    assert model.predict_many([]) == []


async def test_apredict_runs_off_the_loop(model: SmartTurnModel) -> None:
    assert await model.apredict(turn(COMPLETE[0])) > 0.8


async def test_sessions_batched_through_one_queue(model: SmartTurnModel) -> None:
    """Turns of many sessions at once: one thread, batched up to max_batch, results as alone; a
    turn whose session gave up (the user spoke again) leaves the queue without being scored."""
    audios = [turn(t) for t in COMPLETE + INCOMPLETE]
    single = [model.predict(a) for a in audios]
    batched = SmartTurnModel(model.session, TurnDetectorConfig(max_batch=4), model.path)
    try:
        assert await asyncio.gather(*(batched.apredict(a) for a in audios)) == pytest.approx(single, abs=1e-4)
        assert batched.batcher.stats.sizes.keys() - {1} and batched.batcher.stats.items == len(audios)
        first = asyncio.create_task(batched.apredict(audios[0]))
        later = [asyncio.create_task(batched.apredict(a)) for a in audios[1:]]
        await asyncio.sleep(0)
        later[-1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await later[-1]
        await asyncio.gather(first, *later[:-1])
        assert batched.batcher.stats.items <= 2 * len(audios) - 1
        with pytest.raises(InvalidArgument, match="empty"):
            await batched.apredict(np.zeros(0, np.float32))  # fails alone, before the queue
    finally:
        batched.close()
    with pytest.raises(Unavailable):
        await batched.apredict(audios[0])


def test_only_the_last_8_s_count(model: SmartTurnModel) -> None:
    cut = turn(INCOMPLETE[0])
    earlier = np.concatenate([say("Hello."), np.zeros(9 * MODEL_RATE, np.float32)])
    assert model.predict(np.concatenate([earlier, cut])) == pytest.approx(model.predict(cut), abs=1e-6)


def _pipecat_features() -> ModuleType:
    """Pipecat's own numpy feature code, loaded from its file (pipecat's __init__ never runs)."""
    path = smart_turn_source().parent.parent / "_whisper_features.py"
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_features_match_pipecat(model: SmartTurnModel) -> None:
    audio = turn(COMPLETE[0])
    ours = model.features(audio)
    assert ours.shape == (N_MELS, N_FRAMES) and ours.dtype == np.float32
    padded = np.concatenate([np.zeros(WINDOW - audio.size, np.float32), audio])  # as pipecat pads
    reference = _pipecat_features().compute_whisper_log_mel_features(padded, do_normalize=True)
    assert np.abs(ours - reference).max() < 1e-4


def test_invalid_inputs(model: SmartTurnModel, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        model.predict(np.zeros(0, np.float32))
    with pytest.raises(InvalidArgument, match="1-D"):
        model.predict(np.zeros((2, 100), np.float32))
    with pytest.raises(InvalidArgument, match="NaN"):
        model.predict(np.full(100, np.nan, np.float32))
    with pytest.raises(NotFound, match="not found"):
        SmartTurnModel.load(TurnDetectorConfig(model=str(tmp_path / "missing.onnx")))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(InvalidArgument, match="cannot load"):
        SmartTurnModel.load(TurnDetectorConfig(model=str(bad)))


def test_user_model_file(tmp_path: Path) -> None:
    copy = tmp_path / "my-turn.onnx"
    copy.symlink_to(smart_turn_source())
    m = SmartTurnModel.load(TurnDetectorConfig(model=str(copy)))
    try:
        assert m.name == "smart-turn:my-turn.onnx" and 0 <= m.predict(turn("Hello.")) <= 1
    finally:
        m.close()
    with pytest.raises(Unavailable):
        m.predict(turn("Hello."))


@pytest.mark.parametrize(("text", "incomplete"), [
    # the case audio alone gets wrong, with and without the punctuation ASR adds
    ("What is the capital of", True),
    ("What is the capital of?", True),
    ("I want to go to the.", True),
    ("Can you tell me about the?", True),
    ("I would like to order a", True),
    ("I need a table for", True),
    ("My name is.", True),
    ("I was wondering if", True),
    ("Pasta with tomatoes and", True),
    ("I would like to order,", True),
    ("I would like to order, um...", True),
    ("Let me think -", True),
    ("The reason is that…", True),
    ("So the options are:", True),
    ("What is the capital of France?", False),
    ("I would like to order a pizza.", False),
    ("Thank you.", False),
    ("Turn the lights on.", False),
    ("Yes, I can.", False),
    ("Who are you talking to?", False),  # a question may end with a stranded preposition
    ("What is it for?", False),
    ("Where are you from?", False),
    ("Hello", False),
    ("", False),
    ("   ", False),
    ("...", True),
])
def test_transcript_looks_incomplete(text: str, incomplete: bool) -> None:
    assert transcript_looks_incomplete(text) is incomplete

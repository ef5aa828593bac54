"""Benchmark the listening side: model load times, VAD cost per 32 ms chunk, ASR real-time factor
(Whisper base and Moonshine Tiny), and the Smart Turn end-of-turn model's cost per call.

    .venv/bin/python scripts/bench_listen.py [--out bench_listen.json] [--runs 3]

Speech comes from Piper (the embedded voice), so no audio files are needed. Engine against engine
on many utterances of several lengths and two voices: scripts/bench_asr.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from services.asr import WhisperASR
from services.asr_base import ASRConfig, PooledASR
from services.audio import MODEL_RATE, resample
from services.conversation.vad_stream import VADSegmenter
from services.cpu import machine_record
from services.models import default_tts_voice
from services.moonshine_asr import MoonshineASR
from services.turn_detection import SmartTurnModel, TurnDetectorConfig
from services.vad import WINDOW, SileroModel, VADConfig, VADState

T = TypeVar("T")

TEXT = ("Good morning. Could you please tell me what the weather will be like this afternoon, "
        "and whether I should bring an umbrella when I go out?")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def synthesize(text: str) -> tuple[np.ndarray, float]:
    from piper import PiperVoice

    voice, load_s = timed(lambda: PiperVoice.load(default_tts_voice()))
    chunks = list(voice.synthesize(text))
    audio = np.concatenate([c.audio_float_array for c in chunks])
    return resample(audio, chunks[0].sample_rate, MODEL_RATE), load_s


def bench_vad(model: SileroModel, speech: np.ndarray) -> dict[str, float]:
    silence = np.zeros(MODEL_RATE, np.float32)
    audio = np.concatenate([silence, speech, silence] * 2)
    n = audio.size // WINDOW
    res: dict[str, float] = {}
    # raw model step, one stream
    state = VADState()
    _, t = timed(lambda: [model.probs(audio[i * WINDOW : (i + 1) * WINDOW], state)
                          for i in range(n)])
    res["model_ms_per_chunk"] = 1000 * t / n
    # full streaming path (model + segmenter), 32 ms pushes
    segmenter = VADSegmenter(VADConfig())
    stream_state = VADState()
    t0 = time.perf_counter()
    events = []
    for i in range(n):
        chunk = audio[i * WINDOW : (i + 1) * WINDOW]
        probs, stream_state = model.probs(chunk, stream_state)
        events += segmenter.feed(probs, chunk)
    res["stream_ms_per_chunk"] = 1000 * (time.perf_counter() - t0) / n
    res["segments_found"] = sum(1 for e in events if type(e).__name__ == "SpeechEnd")
    # 8 streams batched per step (what a shared VAD server could do)
    streams = 8
    items = [(audio[: n * WINDOW], VADState()) for _ in range(streams)]
    _, t = timed(lambda: model.probs_many(items))
    res["batched8_ms_per_stream_chunk"] = 1000 * t / (n * streams)
    return res


def bench_turn(model: SmartTurnModel, speech: np.ndarray, runs: int) -> dict[str, float]:
    warm_s = model.warm_up()
    times = [timed(lambda: model.predict(speech))[1] for _ in range(runs)]
    return {"warm_up_s": round(warm_s, 3), "ms_per_call": round(1000 * statistics.mean(times), 1),
            "probability_complete": round(model.predict(speech), 3)}


def bench_asr(asr: PooledASR, speech: np.ndarray, runs: int, language: str | None
              ) -> dict[str, object]:
    asr.transcribe_sync(speech[: MODEL_RATE], language)  # warm-up
    decodes = [asr.transcribe_sync(speech, language) for _ in range(runs)]
    times = [d.decode_s for d in decodes]
    dur = speech.size / MODEL_RATE
    return {
        "engine": asr.name,
        "language": language or "auto",
        "audio_s": round(dur, 3),
        "decode_s_mean": round(statistics.mean(times), 3),
        "rtf_mean": round(statistics.mean(times) / dur, 3),
        "rtf_runs": [round(t / dur, 3) for t in times],
        "text": decodes[-1].text,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--runs", type=int, default=3, help="ASR decodes to average")
    ap.add_argument("--asr-model", default="", help="Whisper CT2 folder or hub id ('' = default)")
    args = ap.parse_args()

    speech, piper_load_s = synthesize(TEXT)
    vad_model, vad_load_s = timed(lambda: SileroModel.load(VADConfig()))
    asr, asr_load_s = timed(lambda: WhisperASR.load(ASRConfig(model=args.asr_model)))
    moonshine, moonshine_load_s = timed(lambda: MoonshineASR.load(ASRConfig()))
    turn, turn_load_s = timed(lambda: SmartTurnModel.load(TurnDetectorConfig()))
    results: dict[str, object] = {
        "machine": machine_record(),
        "load_s": {"vad": round(vad_load_s, 3), "asr": round(asr_load_s, 3),
                   "moonshine": round(moonshine_load_s, 3), "smart_turn": round(turn_load_s, 3),
                   "piper_for_test_speech": round(piper_load_s, 3)},
        "vad": {k: round(v, 4) for k, v in bench_vad(vad_model, speech).items()},
        "asr": [bench_asr(asr, speech, args.runs, None), bench_asr(asr, speech, args.runs, "en"),
                bench_asr(moonshine, speech, args.runs, "en")],
        "smart_turn": bench_turn(turn, speech, args.runs),
    }
    asr.close()
    moonshine.close()
    turn.close()
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Compare the ASR engines on the same utterances: Moonshine Tiny English vs Whisper base.

    .venv/bin/python scripts/bench_asr.py [--runs 3] [--out docs/bench/bench_asr.json]

For each voice, the same English sentences (1-8 s when spoken) are decoded by each engine:
decode latency p50/p95 per utterance length, and word error rate. Voices: the embedded Piper
voice (the one the tests use) and espeak-ng, a voice the tests never use (`apt-get install
espeak-ng`; skipped with a message where it is missing). Whisper gets the language ("en"), as a
session that sets one; the CPU model, its flags and the load average go into the results, because
figures taken while other work runs are not comparable.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_common import pct, versions
from services.asr import WhisperASR
from services.asr_base import ASRConfig, PooledASR
from services.audio import MODEL_RATE, resample
from services.cpu import machine_record
from services.moonshine_asr import MoonshineASR
from tests.conftest import normalize, word_errors

#: Assistant-style requests from ~1 s to ~8 s when spoken (none of them is in the tests).
SENTENCES = (
    "Good night.",
    "Stop the music.",
    "What time is it?",
    "Call my sister.",
    "Turn up the volume a little.",
    "How cold will it be tonight?",
    "Add milk and eggs to my shopping list.",
    "Who wrote the novel Pride and Prejudice?",
    "Can you find a quiet restaurant near the train station for dinner tonight?",
    "Please send a message to David saying that I will be ten minutes late.",
    "How many kilometers are there between Madrid and Barcelona, and how long does the drive take?",
    "I need to buy a birthday present for my father, who likes gardening, cooking and old films.",
    "Remind me tomorrow morning to water the plants, take out the recycling, and call the dentist "
    "about moving my appointment.",
    "Could you explain in simple words why the sky looks blue during the day but turns orange and "
    "red when the sun goes down?",
    "Before we leave for the airport, check whether our flight to Lisbon is still on time and how "
    "much traffic there is on the motorway.",
)
#: Utterance-length buckets (seconds) for the latency table.
BUCKETS = ((0.0, 1.5), (1.5, 2.5), (2.5, 4.0), (4.0, 6.0), (6.0, 30.0))


def piper_voice() -> Any:
    from services.tts import PiperTTS

    voice = PiperTTS.load()

    def speak(text: str) -> np.ndarray:
        audio = np.concatenate(list(voice.synthesize_blocking(text)))
        return resample(audio, voice.sample_rate, MODEL_RATE)

    return speak


def espeak_voice() -> Any | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None

    def speak(text: str) -> np.ndarray:
        wav = subprocess.run([exe, "-v", "en-us", "-s", "165", "--stdout", text],
                             capture_output=True, check=True).stdout
        with wave.open(io.BytesIO(wav)) as w:
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
        audio = np.frombuffer(frames, np.int16).astype(np.float32) / 32768
        return resample(audio, rate, MODEL_RATE)

    return speak


def with_vad_padding(audio: np.ndarray) -> np.ndarray:
    """Trim the synthesizer's own silence, then add what our VAD hands over (300 ms pre-roll,
    200 ms post-roll), so both voices reach the engines as a session's utterances do."""
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    if loud.size:
        audio = audio[loud[0] : loud[-1] + 1]
    return np.concatenate([np.zeros(int(0.3 * MODEL_RATE), np.float32), audio,
                           np.zeros(int(0.2 * MODEL_RATE), np.float32)])


def bench_engine(engine: PooledASR, utterances: list[np.ndarray], runs: int) -> dict[str, Any]:
    engine.warm_up()
    rows: list[dict[str, Any]] = []
    for text, audio in zip(SENTENCES, utterances, strict=True):
        decodes = [engine.transcribe_sync(audio, "en") for _ in range(runs)]
        ref = normalize(text)
        rows.append({
            "audio_s": round(audio.size / MODEL_RATE, 2),
            "decode_ms": [round(1000 * d.decode_s, 1) for d in decodes],
            "words": len(ref),
            "errors": word_errors(ref, normalize(decodes[0].text)),
            "text": decodes[0].text,
        })
    by_bucket = {}
    for lo, hi in BUCKETS:
        ms = [t for r in rows if lo <= r["audio_s"] < hi for t in r["decode_ms"]]
        if ms:
            by_bucket[f"{lo:g}-{hi:g}s"] = {"n": len(ms) // runs, "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95)}
    all_ms = [t for r in rows for t in r["decode_ms"]]
    total_audio = sum(r["audio_s"] for r in rows) * runs
    return {
        "engine": engine.name,
        "wer": round(sum(r["errors"] for r in rows) / sum(r["words"] for r in rows), 4),
        "exact_sentences": sum(r["errors"] == 0 for r in rows),
        "latency_by_length": by_bucket,
        "p50_ms": pct(all_ms, 50),
        "p95_ms": pct(all_ms, 95),
        "ms_per_audio_second": round(sum(all_ms) / total_audio, 1),
        "utterances": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="decodes per utterance and engine")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    machine_before = machine_record()
    t0 = time.perf_counter()
    engines: list[PooledASR] = [MoonshineASR.load(ASRConfig()), WhisperASR.load(ASRConfig())]
    load_s = round(time.perf_counter() - t0, 2)
    voices = {"piper": piper_voice()}
    espeak = espeak_voice()
    if espeak is None:
        print("espeak-ng is not installed: skipping the unseen-voice part "
              "(apt-get install -y espeak-ng)", file=sys.stderr)
    else:
        voices["espeak-ng"] = espeak

    results: dict[str, Any] = {
        "benchmark": "bench_asr",
        "machine": machine_before,
        "versions": versions("moonshine-voice", "faster-whisper", "onnxruntime"),
        "load_s_both_engines": load_s,
        "runs": args.runs,
        "voices": {},
    }
    for voice_name, speak in voices.items():
        utterances = [with_vad_padding(speak(s)) for s in SENTENCES]
        results["voices"][voice_name] = {e.name: bench_engine(e, utterances, args.runs) for e in engines}
    for e in engines:
        e.close()
    results["load_average_after"] = machine_record()["load_average"]

    print(f"CPU: {machine_before['cpu']}; load average before {machine_before['load_average']}, "
          f"after {results['load_average_after']}")
    for voice_name, by_engine in results["voices"].items():
        print(f"\n{voice_name} ({len(SENTENCES)} sentences, {args.runs} decodes each)")
        print(f"  {'engine':20} {'WER':>6} {'exact':>6} {'p50 ms':>7} {'p95 ms':>7} {'ms/s audio':>10}   "
              + "  ".join(f"{b:>13}" for b in next(iter(by_engine.values()))["latency_by_length"]))
        for name, r in by_engine.items():
            buckets = "  ".join(f"{v['p50_ms']:>6.0f}/{v['p95_ms']:<6.0f}"
                                for v in r["latency_by_length"].values())
            print(f"  {name:20} {100 * r['wer']:5.1f}% {r['exact_sentences']:>3}/{len(SENTENCES):<2} "
                  f"{r['p50_ms']:7.0f} {r['p95_ms']:7.0f} {r['ms_per_audio_second']:10.1f}   {buckets}")
    print("  (per-length columns: p50/p95 decode ms)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()

"""Spoken questions for load tests and benchmarks: synthesized once with Piper, cached as WAV.

The cache key holds the text, the voice file and the rate, so a different voice or question never
reuses stale audio. Files are written atomically (temp file + rename) because several test or
benchmark processes may fill the cache at the same time.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.audio import MODEL_RATE, read_wav, resample, write_wav

#: Short questions a caller might ask a voice assistant (answers stay short with the CPU profile).
QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Can you tell me a fun fact about cats?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "How do I make a cup of tea?",
    "What is the largest planet in our solar system?",
)

_lock = threading.Lock()


@dataclass(frozen=True)
class SpokenQuestion:
    """One question: its text and float32 mono speech at ``sample_rate``."""

    text: str
    audio: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.audio.size / self.sample_rate


def speech_dir() -> Path:
    """Where cached speech lives: ``<model cache>/speech``."""
    from services.models import cache_dir

    return cache_dir() / "speech"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "utterance"


def _key(text: str, voice_path: str, rate: int) -> str:
    return hashlib.sha1(f"{text}\0{Path(voice_path).name}\0{rate}".encode()).hexdigest()[:10]


def load_questions(texts: tuple[str, ...] | list[str] = QUESTIONS, sample_rate: int = MODEL_RATE,
                   folder: Path | None = None) -> list[SpokenQuestion]:
    """The spoken ``texts`` at ``sample_rate``; synthesizes (and caches) those not cached yet.

    Blocking. Cached questions are read with the standard library; Piper (``services.tts``, the
    server's TTS stack) is loaded only when a question is not cached yet: the first such call
    loads it (~0.5 s) and synthesizes ~0.3 s per question on CPU.
    """
    from services.models import default_tts_voice

    folder = folder or speech_dir()
    voice_path = default_tts_voice()
    out: list[SpokenQuestion] = []
    tts = None
    with _lock:
        for text in texts:
            path = folder / f"{_slug(text)}-{_key(text, voice_path, sample_rate)}.wav"
            if path.is_file():
                audio, rate = read_wav(path)
                if rate == sample_rate:
                    out.append(SpokenQuestion(text, audio.astype(np.float32), sample_rate))
                    continue
            if tts is None:
                from services.tts import PiperTTS

                tts = PiperTTS.load()
            audio = np.concatenate(list(tts.synthesize_blocking(text)))
            audio = resample(audio, tts.sample_rate, sample_rate).astype(np.float32)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.wav")
            write_wav(tmp, audio, sample_rate)
            os.replace(tmp, path)
            # Read back so the first run sends the same (PCM16-quantized) samples as later runs.
            out.append(SpokenQuestion(text, read_wav(path)[0], sample_rate))
    return out

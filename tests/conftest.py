"""Shared test helpers: environment for local Ray/vLLM runs, Piper speech, word error rate."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from deployments.server import set_local_env

ROOT = Path(__file__).resolve().parent.parent
# What the engines and Ray write lands in the project's .cache (ignored by git).
set_local_env(ROOT / ".cache")


@lru_cache(maxsize=1)
def _voice():  # type: ignore[no-untyped-def]
    from services.tts import PiperTTS

    return PiperTTS.load()


@lru_cache(maxsize=64)
def _say(text: str, rate: int) -> np.ndarray:
    from services.audio import resample

    voice = _voice()
    audio = np.concatenate(list(voice.synthesize_blocking(text)))
    return resample(audio, voice.sample_rate, rate)


def say(text: str, rate: int = 16000) -> np.ndarray:
    """``text`` spoken by the embedded Piper voice, float32 mono at ``rate`` (cached)."""
    return _say(text, rate).copy()


_NUM = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
        "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


def normalize(text: str) -> list[str]:
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()
    return [_NUM.get(w, w) for w in words]


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions + insertions + deletions)."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after lowercasing, dropping punctuation and spelling out small numbers."""
    ref = normalize(reference)
    return word_errors(ref, normalize(hypothesis)) / max(1, len(ref))


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate over the normalized words with spaces removed: robust to a split or
    merged word ("France is" heard as "Francis"), which costs two words but one letter."""
    ref = list("".join(normalize(reference)))
    return word_errors(ref, list("".join(normalize(hypothesis)))) / max(1, len(ref))

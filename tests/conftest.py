"""Shared test helpers: environment for local Ray/vLLM runs, Piper speech, word error rate."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

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


# --- helpers for tests against a running local voxserve app ---------------------------------------

APP_NAME = "voxserve"


def handle(name: str) -> Any:
    """A DeploymentHandle to one deployment of the local app."""
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP_NAME)


async def unfinished_llm_requests(within_s: float = 15.0) -> int:
    """Poll the LLM replica until vLLM tracks no request (or time runs out); return the count."""
    llm = handle("LLM")
    n = -1
    for _ in range(int(within_s / 0.25)):
        n = (await llm.stats.remote())["unfinished_requests"]
        if n == 0:
            return 0
        await asyncio.sleep(0.25)
    return n


async def converse(address: str, turns: list[Any], config: Any, **kwargs: Any) -> Any:
    """One whole conversation with the reference client (its channel closed afterwards)."""
    from clients.voice_client import VoiceClient

    client = VoiceClient(address)
    try:
        return await client.converse(turns, config, **kwargs)
    finally:
        await client.close()


async def until(check: Callable[[], object], within_s: float = 15.0) -> None:
    """Wait until ``check()`` is true (polled every 5 ms); AssertionError after ``within_s``."""
    for _ in range(int(within_s / 0.005)):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never met")

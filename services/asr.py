"""faster-whisper ASR engine.

``WhisperASR`` decodes whole utterances (already cut by our VAD) in a small dedicated thread
pool, so decodes never block an event loop and concurrent sessions queue instead of fighting
over the CPU. ``PartialTranscriber`` re-decodes a growing utterance for live partial text,
as best-effort work that yields to final decodes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.audio import MODEL_RATE
from services.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from services.models import default_asr_model, resolve


class ASRConfig(BaseModel):
    """Speech recognition settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="",
        description="CTranslate2 Whisper folder or hub id; '' = embedded whisper base.",
    )
    device: str = Field(default="cpu", description="'cpu', 'cuda' or 'auto'.")
    compute_type: str = Field(
        default="int8",
        description="CTranslate2 compute type (int8, float16, int8_float16...).",
    )
    cpu_threads: int = Field(
        default=2, ge=0,
        description="CTranslate2 CPU threads (0 = library default).",
    )
    beam_size: int = Field(default=1, ge=1, le=10, description="Beam width; 1 = greedy, fastest.")
    language: str | None = Field(
        default=None,
        description="Force a language (ISO 639-1); None = detect.",
    )
    partial_interval_ms: int = Field(
        default=700, ge=100,
        description="Min time between partial re-decodes.",
    )
    max_audio_s: float = Field(
        default=30.0, gt=0,
        description="Longest utterance accepted for one decode.",
    )
    max_concurrent: int = Field(
        default=0, ge=0, le=64,
        description="Decodes run at once (each a CTranslate2 worker); 0 = 1 on CPU, 2 on GPU. "
                    "More only helps with spare cores.",
    )
    max_queued: int = Field(
        default=64, ge=0,
        description="Decodes allowed to wait for a free worker; beyond this transcribe() raises "
                    "ResourceExhausted.",
    )
    allow_download: bool = Field(
        default=False,
        description="Let a hub id that is not in the local Hugging Face cache be downloaded.",
    )


@dataclass(frozen=True)
class Transcript:
    """Result of one decode."""

    text: str
    language: str
    duration_s: float
    """Length of the decoded audio."""
    decode_s: float
    """Wall time of the decode itself (queueing excluded)."""
    language_probability: float = 1.0


class WhisperASR:
    """One faster-whisper model shared by every session of a process (or replica)."""

    def __init__(self, model: Any, cfg: ASRConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.concurrency = cfg.max_concurrent or (2 if _is_gpu(cfg.device) else 1)
        # own pool: queued decodes must not occupy the loop's default executor threads
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="asr")
        # guards direct transcribe_sync callers from other threads as well
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self._pending = 0  # decodes submitted and not finished (running + queued)
        self.languages = frozenset(model.supported_languages)

    @classmethod
    def load(cls, cfg: ASRConfig | None = None) -> WhisperASR:
        cfg = cfg or ASRConfig()
        from faster_whisper import WhisperModel

        name = resolve(cfg.model, default_asr_model)
        local = Path(name)
        if local.is_absolute() or name.startswith("."):
            if not (local / "model.bin").is_file():
                raise NotFound(
                    f"no CTranslate2 Whisper model in {local} (model.bin missing); give a folder "
                    "made by ct2-transformers-converter, a hub id, or '' for the default"
                )
        workers = cfg.max_concurrent or (2 if _is_gpu(cfg.device) else 1)
        try:
            model = WhisperModel(
                name, device=cfg.device, compute_type=cfg.compute_type,
                cpu_threads=cfg.cpu_threads, num_workers=workers,
                local_files_only=not cfg.allow_download,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            # huggingface_hub raises OSError subclasses when a hub id is not cached
            if not local.exists() and not cfg.allow_download:
                raise NotFound(
                    f"Whisper model '{name}' is neither a local folder nor in the local Hugging "
                    "Face cache (downloads are off: set allow_download)"
                ) from exc
            raise InvalidArgument(f"cannot load Whisper model '{name}': {exc}") from exc
        return cls(model, cfg)

    @property
    def pending(self) -> int:
        """Decodes running or waiting right now."""
        return self._pending

    def check_audio(self, audio16k: np.ndarray) -> np.ndarray:
        x = np.asarray(audio16k, dtype=np.float32)
        if x.ndim != 1:
            raise InvalidArgument(f"expected mono 16 kHz audio (1-D array); got shape {x.shape}")
        if x.size == 0:
            raise InvalidArgument("cannot transcribe empty audio")
        seconds = x.size / MODEL_RATE
        if seconds > self.cfg.max_audio_s:
            raise OutOfRange(
                f"utterance of {seconds:.1f} s is longer than the {self.cfg.max_audio_s:g} s "
                "one decode accepts"
            )
        return x

    def _language(self, language: str | None) -> str | None:
        lang = language or self.cfg.language
        if lang and lang not in self.languages:
            raise InvalidArgument(
                f"language '{lang}' is not supported by this Whisper model; use one of: "
                + ", ".join(sorted(self.languages))
            )
        return lang or None

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        """Blocking decode (for threads and scripts); waits for a free decode slot."""
        x = self.check_audio(audio16k)
        lang = self._language(language)
        with self._slots:
            t0 = time.perf_counter()
            segments, info = self.model.transcribe(
                x, language=lang, beam_size=self.cfg.beam_size, best_of=1, temperature=0.0,
                condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
            )
            text = " ".join(s.text.strip() for s in segments).strip()  # decoding happens here
            decode_s = time.perf_counter() - t0
        return Transcript(text, info.language, x.size / MODEL_RATE, decode_s,
                          float(info.language_probability))

    def _reserve(self, best_effort: bool) -> bool:
        with self._lock:
            if best_effort and self._pending >= self.concurrency:
                return False
            if self._pending >= self.concurrency + self.cfg.max_queued:
                raise ResourceExhausted(
                    f"speech recognition is saturated ({self._pending} decodes in progress); "
                    "retry shortly"
                )
            self._pending += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    async def _run(self, x: np.ndarray, lang: str | None) -> Transcript:
        try:
            fut = self._pool.submit(self.transcribe_sync, x, lang)
        except RuntimeError as exc:  # pool shut down
            self._release()
            raise Unavailable("speech recognition engine is closed") from exc
        # released when the decode really finishes (or is dropped from the queue), not when a
        # cancelled caller stops waiting, so `pending` counts what occupies the workers
        fut.add_done_callback(lambda _: self._release())
        # cancelling the caller cancels a decode that has not started yet
        return await asyncio.wrap_future(fut)

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        """Decode one utterance in the ASR thread pool (queues behind running decodes)."""
        x = self.check_audio(audio16k)
        lang = self._language(language)
        self._reserve(best_effort=False)
        return await self._run(x, lang)

    async def try_transcribe(
        self, audio16k: np.ndarray, language: str | None = None
    ) -> Transcript | None:
        """Best-effort decode: None at once if every decode slot is busy (for partials)."""
        x = self.check_audio(audio16k)
        lang = self._language(language)
        if not self._reserve(best_effort=True):
            return None
        return await self._run(x, lang)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _is_gpu(device: str) -> bool:
    if device == "cuda":
        return True
    if device == "auto":
        try:
            import ctranslate2

            return bool(ctranslate2.get_cuda_device_count())
        except Exception:
            return False
    return False


class PartialTranscriber:
    """Live partial text for one growing utterance.

    Call ``update(buffer)`` as often as audio arrives (it is cheap when it has nothing to do).
    It decodes at most once per ``interval_ms`` of wall time, never twice at once for this
    utterance, and only when the ASR has a free slot, so partials never delay final decodes.
    It returns the new partial text, or None when it skipped or the text did not change. The
    last ``max_audio_s`` of the buffer is decoded if the utterance grows longer.
    """

    def __init__(self, asr: WhisperASR, interval_ms: int | None = None,
                 language: str | None = None, min_audio_ms: int = 300,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.asr = asr
        self.interval_s = (interval_ms or asr.cfg.partial_interval_ms) / 1000
        self.language = language
        self.min_samples = min_audio_ms * MODEL_RATE // 1000
        self.clock = clock
        self._busy = False
        self._last_start: float | None = None
        self._last_size = 0
        self.text = ""

    def reset(self) -> None:
        """A new utterance begins."""
        self._last_start, self._last_size, self.text = None, 0, ""

    def due(self, size: int) -> bool:
        if self._busy or size < self.min_samples or size <= self._last_size:
            return False
        now = self.clock()
        return self._last_start is None or now - self._last_start >= self.interval_s

    async def update(self, audio16k: np.ndarray) -> str | None:
        x = np.asarray(audio16k, dtype=np.float32)
        if not self.due(x.size):
            return None
        limit = int(self.asr.cfg.max_audio_s * MODEL_RATE)
        self._busy = True
        started = self.clock()
        try:
            result = await self.asr.try_transcribe(x[-limit:], self.language)
        finally:
            self._busy = False
        if result is None:  # ASR busy: try again on the next update
            return None
        self._last_start, self._last_size = started, x.size
        if not result.text or result.text == self.text:
            return None
        self.text = result.text
        return result.text

"""What every speech recognition engine shares: its settings (``ASRConfig``), its result
(``Transcript``), the interface the rest of voxserve uses (``ASREngine``), and the mechanics of a
pooled engine (``PooledASR``: input checks, a bounded priority queue in front of a cross-session
micro-batcher, best-effort decodes, warm-up).

The engines build on it: ``WhisperASR`` and the per-language ``ASRRouter`` (services/asr.py), and
``MoonshineASR`` (services/moonshine_asr.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.audio import MODEL_RATE
from services.batching import Deliver, MicroBatcher, Priority
from services.errors import InvalidArgument, OutOfRange

#: A session language (or ``default_language``) that asks for language detection.
DETECT = "auto"

EngineChoice = Literal["auto", "moonshine", "whisper"]


class ASRConfig(BaseModel):
    """Speech recognition settings."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineChoice = Field(
        default="auto",
        description="'auto' = Moonshine for English on CPU, Whisper for other languages, for "
                    "detection and on GPU; 'moonshine' = Moonshine only (English); 'whisper' = "
                    "Whisper for every session.",
    )
    model: str = Field(
        default="",
        description="Whisper: CTranslate2 folder or hub id; '' = embedded whisper base.",
    )
    moonshine_model: str = Field(
        default="",
        description="Moonshine model folder (*.ort files + tokenizer.bin); '' = embedded Tiny English.",
    )
    device: str = Field(default="cpu", description="Whisper: 'cpu', 'cuda' or 'auto' (Moonshine: CPU).")
    compute_type: str = Field(
        default="int8",
        description="Whisper: CTranslate2 compute type (int8, float16, int8_float16...).",
    )
    cpu_threads: int = Field(
        default=2, ge=0,
        description="Whisper: CTranslate2 CPU threads (0 = library default); Moonshine uses one.",
    )
    beam_size: int = Field(default=1, ge=1, le=10, description="Whisper beam width; 1 = greedy, fastest.")
    default_language: str | None = Field(
        default="en",
        description="Language (ISO 639-1) of sessions that give none; None or 'auto' = detect "
                    "(Whisper). A session asking for 'auto' is always detected.",
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
        description="Batches decoded at once per engine (one worker thread each); 0 = 1 on CPU, "
                    "2 for Whisper on GPU. More only helps with spare cores.",
    )
    max_batch: int = Field(
        default=0, ge=0, le=64,
        description="Most utterances of different sessions decoded together in one batch; 0 = "
                    "auto: 8 for Moonshine and for Whisper on GPU, 1 for Whisper on CPU (its fixed "
                    "30 s window makes a CPU batch cost as much as one decode after another).",
    )
    batch_wait_ms: float = Field(
        default=5.0, ge=0, le=100,
        description="How long an idle engine waits for more utterances to fill a batch.",
    )
    max_queued: int = Field(
        default=64, ge=0,
        description="Decodes allowed to wait for a batch, per engine; beyond this transcribe() "
                    "raises ResourceExhausted.",
    )
    allow_download: bool = Field(
        default=False,
        description="Whisper: let a hub id that is not in the local Hugging Face cache be downloaded.",
    )


def requested_language(language: str | None, cfg: ASRConfig) -> str | None:
    """The language a decode is for: the session's, else the configured default; None = detect."""
    lang = (language or cfg.default_language or DETECT).strip().lower()
    return None if lang == DETECT else lang


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
    engine: str = ""
    """Name of the engine that decoded it (e.g. 'moonshine-tiny-en', 'whisper-base')."""
    batch_size: int = 1
    """Utterances decoded together with this one (itself included)."""


@dataclass(frozen=True)
class DecodeRequest:
    """One utterance for ``decode_batch``: checked audio and the language (None = detect)."""

    audio: np.ndarray
    language: str | None


@runtime_checkable
class ASREngine(Protocol):
    """What sessions and deployments use: ``WhisperASR``, ``MoonshineASR`` and ``ASRRouter``."""

    name: str
    """Short model name for logs, metrics and info (e.g. 'moonshine-tiny-en')."""
    cfg: ASRConfig
    languages: frozenset[str]
    """ISO 639-1 codes this engine transcribes."""

    @property
    def pending(self) -> int:
        """Decodes running or waiting right now."""
        ...

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None,
                        priority: Priority | int | str = Priority.FINAL) -> Transcript:
        """Blocking decode (for threads and scripts); queues like ``transcribe``."""
        ...

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None,
                         priority: Priority | int | str = Priority.FINAL) -> Transcript:
        """Decode one utterance, batched with other sessions' utterances; more urgent
        ``priority`` goes first (FINAL before BARGE_IN before SPECULATIVE before PARTIAL)."""
        ...

    async def try_transcribe(
        self, audio16k: np.ndarray, language: str | None = None
    ) -> Transcript | None:
        """Best-effort decode at PARTIAL priority: None at once unless the engine has a free
        worker and a free seat in its next batch (for partials)."""
        ...

    def warm_up(self) -> float:
        """Decode once so the first real request is not slower (returns the seconds it took)."""
        ...

    def close(self) -> None:
        """Stop the decode threads; queued decodes are dropped."""
        ...


class PooledASR:
    """Shared mechanics of an engine: input checks, a bounded priority queue in front of a
    cross-session micro-batcher (``concurrency`` worker threads, up to ``max_batch`` utterances
    per decode), best-effort decodes that never wait, and warm-up.

    Subclasses set ``name``, ``languages`` and implement ``decode_batch``.
    """

    name = "asr"
    languages: frozenset[str] = frozenset()

    def __init__(self, cfg: ASRConfig, concurrency: int, max_batch: int = 1) -> None:
        self.cfg = cfg
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.batcher: MicroBatcher[DecodeRequest, Transcript] = MicroBatcher(
            self._run_batch, max_batch=max_batch, max_wait_s=cfg.batch_wait_ms / 1000,
            max_queued=cfg.max_queued, workers=concurrency, name="speech recognition")
        self.warm_up_s: float | None = None

    @property
    def pending(self) -> int:
        """Decodes running or waiting right now."""
        return self.batcher.pending

    def check_audio(self, audio16k: np.ndarray) -> np.ndarray:
        x = np.asarray(audio16k, dtype=np.float32)
        if x.ndim != 1:
            raise InvalidArgument(f"expected mono 16 kHz audio (1-D array); got shape {x.shape}")
        if x.size == 0:
            raise InvalidArgument("cannot transcribe empty audio")
        if not np.isfinite(x).all():
            raise InvalidArgument("audio contains NaN or infinite samples")
        seconds = x.size / MODEL_RATE
        if seconds > self.cfg.max_audio_s:
            raise OutOfRange(
                f"utterance of {seconds:.1f} s is longer than the {self.cfg.max_audio_s:g} s "
                "one decode accepts"
            )
        return x

    def _language(self, language: str | None) -> str | None:
        """Validated language of a request (None = detect); subclasses refine."""
        lang = requested_language(language, self.cfg)
        if lang and lang not in self.languages:
            raise InvalidArgument(
                f"language '{lang}' is not supported by {self.name}; use one of: "
                + ", ".join(sorted(self.languages))
            )
        return lang

    def request(self, audio16k: np.ndarray, language: str | None = None) -> DecodeRequest:
        """A checked ``DecodeRequest`` (raises InvalidArgument / OutOfRange for bad input)."""
        return DecodeRequest(self.check_audio(audio16k), self._language(language))

    def decode_batch(self, requests: Sequence[DecodeRequest],
                     deliver: Deliver | None = None) -> list[Transcript]:
        """Decode utterances together (blocking; results in order). ``deliver(i, transcript)``
        may be called as soon as one is done, before the others."""
        raise NotImplementedError

    def _run_batch(self, requests: list[DecodeRequest], deliver: Deliver) -> list[Transcript]:
        n = len(requests)

        def sized(i: int, t: Transcript) -> None:
            deliver(i, replace(t, batch_size=n))

        return [replace(r, batch_size=n) for r in self.decode_batch(requests, sized)]

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None,
                        priority: Priority | int | str = Priority.FINAL) -> Transcript:
        """Blocking decode (for threads and scripts); queues like ``transcribe``."""
        return self.batcher.run_sync(self.request(audio16k, language), Priority.parse(priority))

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None,
                         priority: Priority | int | str = Priority.FINAL) -> Transcript:
        """Decode one utterance, batched with other sessions' utterances; more urgent
        ``priority`` goes first. Cancelling the caller drops a decode that has not started."""
        return await self.batcher.submit(self.request(audio16k, language), Priority.parse(priority))

    async def try_transcribe(
        self, audio16k: np.ndarray, language: str | None = None
    ) -> Transcript | None:
        """Best-effort decode at PARTIAL priority: None at once unless the engine has a free
        worker and a free seat in its next batch, so partials never hold up final decodes."""
        return await self.batcher.try_submit(self.request(audio16k, language), Priority.PARTIAL)

    def warm_up(self) -> float:
        """One decode of a short tone sweep: the first decode allocates buffers and picks kernels
        (hundreds of ms), and the first caller should not pay for that."""
        lang = "en" if "en" in self.languages else min(self.languages, default=None)
        t0 = time.perf_counter()
        self.transcribe_sync(warm_up_audio(), lang)
        self.warm_up_s = time.perf_counter() - t0
        return self.warm_up_s

    def close(self) -> None:
        """Refuse new decodes and drop queued ones (Unavailable); a running batch finishes."""
        self.batcher.close()


def warm_up_audio(seconds: float = 2.0) -> np.ndarray:
    """A quiet rising tone: exercises the encoder on a realistic length, decodes few tokens."""
    t = np.arange(int(seconds * MODEL_RATE)) / MODEL_RATE
    return (0.05 * np.sin(2 * np.pi * (150 + 100 * t) * t)).astype(np.float32)

"""Speech recognition engines behind one interface, and the router that picks one per session.

``ASREngine`` is what the rest of voxserve uses. Two engines implement it:

- ``WhisperASR`` (faster-whisper): every language and language detection; the GPU engine. It
  decodes a fixed 30 s window, so even a short utterance costs ~1 s on a small CPU.
- ``MoonshineASR`` (services/moonshine_asr.py): English only, cost grows with the audio length
  (~45 ms per second of speech): the fast CPU default for English.

``ASRRouter`` loads what ``ASRConfig.engine`` needs and routes each call by language. Engines
decode whole utterances (already cut by our VAD) in a small dedicated thread pool, so decodes
never block an event loop and concurrent sessions queue instead of fighting over the CPU.
``PartialTranscriber`` re-decodes a growing utterance for live partial text, as best-effort work
that yields to final decodes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

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
        description="Decodes run at once per engine (each a worker with its own model state); "
                    "0 = 1 on CPU, 2 for Whisper on GPU. More only helps with spare cores.",
    )
    max_queued: int = Field(
        default=64, ge=0,
        description="Decodes allowed to wait for a free worker, per engine; beyond this "
                    "transcribe() raises ResourceExhausted.",
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

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        """Blocking decode (for threads and scripts); waits for a free decode slot."""
        ...

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        """Decode one utterance in the engine's thread pool (queues behind running decodes)."""
        ...

    async def try_transcribe(
        self, audio16k: np.ndarray, language: str | None = None
    ) -> Transcript | None:
        """Best-effort decode: None at once if every decode slot is busy (for partials)."""
        ...

    def warm_up(self) -> float:
        """Decode once so the first real request is not slower (returns the seconds it took)."""
        ...

    def close(self) -> None:
        """Stop the decode threads; queued decodes are dropped."""
        ...


class PooledASR:
    """Shared mechanics of an engine: input checks, a bounded queue in front of ``concurrency``
    decode threads, best-effort decodes that never wait, and warm-up.

    Subclasses set ``name``, ``languages`` and implement ``transcribe_sync``, which must itself
    wait for a free decode slot (it is also called directly from other threads).
    """

    name = "asr"
    languages: frozenset[str] = frozenset()

    def __init__(self, cfg: ASRConfig, concurrency: int) -> None:
        self.cfg = cfg
        self.concurrency = concurrency
        # own pool: queued decodes must not occupy the loop's default executor threads
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="asr")
        self._lock = threading.Lock()
        self._pending = 0  # decodes submitted and not finished (running + queued)
        self.warm_up_s: float | None = None

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

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        raise NotImplementedError

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
            fut = self._pool.submit(self.transcribe_sync, x, lang or DETECT)
        except RuntimeError as exc:  # pool shut down
            self._release()
            raise Unavailable("speech recognition engine is closed") from exc
        # released when the decode really finishes (or is dropped from the queue), not when a
        # cancelled caller stops waiting, so `pending` counts what occupies the workers
        fut.add_done_callback(lambda _: self._release())
        # cancelling the caller cancels a decode that has not started yet
        return await asyncio.wrap_future(fut)

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        """Decode one utterance in the engine's thread pool (queues behind running decodes)."""
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

    def warm_up(self) -> float:
        """One decode of a short tone sweep: the first decode allocates buffers and picks kernels
        (hundreds of ms), and the first caller should not pay for that."""
        lang = "en" if "en" in self.languages else min(self.languages, default=None)
        t0 = time.perf_counter()
        self.transcribe_sync(warm_up_audio(), lang)
        self.warm_up_s = time.perf_counter() - t0
        return self.warm_up_s

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def warm_up_audio(seconds: float = 2.0) -> np.ndarray:
    """A quiet rising tone: exercises the encoder on a realistic length, decodes few tokens."""
    t = np.arange(int(seconds * MODEL_RATE)) / MODEL_RATE
    return (0.05 * np.sin(2 * np.pi * (150 + 100 * t) * t)).astype(np.float32)


def whisper_name(model: str) -> str:
    """'whisper-base' for the embedded model, else 'whisper:<hub id or folder name>'."""
    if not model:
        return "whisper-base"
    local = Path(model).expanduser()
    return "whisper:" + (local.name if model.startswith(("/", ".", "~")) else model)


class WhisperASR(PooledASR):
    """One faster-whisper model shared by every session of a process (or replica)."""

    def __init__(self, model: Any, cfg: ASRConfig) -> None:
        super().__init__(cfg, cfg.max_concurrent or (2 if _is_gpu(cfg.device) else 1))
        self.model = model
        self.name = whisper_name(cfg.model)
        # guards direct transcribe_sync callers from other threads as well
        self._slots = threading.BoundedSemaphore(self.concurrency)
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
                          float(info.language_probability), self.name)


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


def engines_for(cfg: ASRConfig) -> tuple[str, ...]:
    """Names of the engine kinds a config loads: 'moonshine', 'whisper' or both."""
    if cfg.engine == "whisper":
        return ("whisper",)
    if cfg.engine == "moonshine":
        return ("moonshine",)
    # auto: Moonshine runs on the CPU only, and on a GPU Whisper is fast enough
    return ("whisper",) if _is_gpu(cfg.device) else ("moonshine", "whisper")


class ASRRouter:
    """The engines one config needs, behind the ``ASREngine`` interface: each call goes to
    ``engine_for(language)`` (English to Moonshine when it is loaded, anything else, including
    detection, to Whisper)."""

    def __init__(self, cfg: ASRConfig, moonshine: ASREngine | None = None,
                 whisper: ASREngine | None = None) -> None:
        if moonshine is None and whisper is None:
            raise InvalidArgument("an ASR router needs at least one engine")
        self.cfg = cfg
        self.moonshine = moonshine
        self.whisper = whisper
        self.engines: dict[str, ASREngine] = {e.name: e for e in (moonshine, whisper) if e is not None}
        self.name = "+".join(self.engines)
        self.languages = frozenset().union(*(e.languages for e in self.engines.values()))
        self.warm_up_s: dict[str, float] = {}

    @classmethod
    def load(cls, cfg: ASRConfig | None = None) -> ASRRouter:
        """Load every engine ``cfg.engine`` asks for (not warmed up: call ``warm_up``)."""
        cfg = cfg or ASRConfig()
        kinds = engines_for(cfg)
        moonshine: ASREngine | None = None
        if "moonshine" in kinds:
            from services.moonshine_asr import MoonshineASR

            moonshine = MoonshineASR.load(cfg)
        try:
            whisper = WhisperASR.load(cfg) if "whisper" in kinds else None
        except BaseException:
            if moonshine is not None:
                moonshine.close()
            raise
        return cls(cfg, moonshine, whisper)

    def engine_for(self, language: str | None) -> ASREngine:
        """The engine that decodes a session in ``language`` (None = the configured default,
        'auto' = detect). Raises InvalidArgument when no loaded engine can."""
        lang = requested_language(language, self.cfg)
        if self.moonshine is not None and lang in self.moonshine.languages:
            return self.moonshine
        if self.whisper is not None:
            return self.whisper
        wanted = f"language '{lang}'" if lang else "language detection"
        raise InvalidArgument(
            f"{wanted} needs Whisper, but this server runs Moonshine only (asr.engine="
            f"'moonshine', languages: {', '.join(sorted(self.languages))}); set asr.engine to "
            "'auto' or 'whisper', or give one of those languages"
        )

    @property
    def default_engine(self) -> ASREngine:
        """The engine of a session that gives no language."""
        return self.engine_for(None)

    @property
    def pending(self) -> int:
        return sum(e.pending for e in self.engines.values())

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        return self.engine_for(language).transcribe_sync(audio16k, language)

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        return await self.engine_for(language).transcribe(audio16k, language)

    async def try_transcribe(
        self, audio16k: np.ndarray, language: str | None = None
    ) -> Transcript | None:
        return await self.engine_for(language).try_transcribe(audio16k, language)

    def warm_up(self) -> float:
        """Warm every loaded engine (a session may need any of them); returns the total seconds."""
        self.warm_up_s = {name: e.warm_up() for name, e in self.engines.items()}
        return sum(self.warm_up_s.values())

    def describe(self) -> dict[str, Any]:
        """For ``info()``: the default engine's name under 'model', and every loaded engine."""
        try:
            default = self.default_engine.name
        except InvalidArgument:  # e.g. Moonshine only with default_language None
            default = self.name
        return {
            "model": default,
            "engines": {
                name: {"languages": _languages_text(e.languages), "warm_up_s": self.warm_up_s.get(name)}
                for name, e in self.engines.items()
            },
            "default_language": self.cfg.default_language,
        }

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


def _languages_text(languages: frozenset[str]) -> str:
    codes = sorted(languages)
    return ", ".join(codes) if len(codes) <= 8 else f"{len(codes)} languages"


class PartialTranscriber:
    """Live partial text for one growing utterance.

    Call ``update(buffer)`` as often as audio arrives (it is cheap when it has nothing to do).
    It decodes at most once per ``interval_ms`` of wall time, never twice at once for this
    utterance, and only when the ASR has a free slot, so partials never delay final decodes.
    It returns the new partial text, or None when it skipped or the text did not change. The
    last ``max_audio_s`` of the buffer is decoded if the utterance grows longer.
    """

    def __init__(self, asr: ASREngine, interval_ms: int | None = None,
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

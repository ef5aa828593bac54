"""Speech recognition engines behind one interface, and the router that picks one per session.

``ASREngine`` (services/asr_base.py, with ``ASRConfig``, ``Transcript`` and the pooled-engine
mechanics ``PooledASR``) is what the rest of voxserve uses. Two engines implement it:

- ``WhisperASR`` (faster-whisper): every language and language detection; the GPU engine. It
  decodes a fixed 30 s window, so even a short utterance costs ~1 s on a small CPU.
- ``MoonshineASR`` (services/moonshine_asr.py): English only, cost grows with the audio length
  (~45 ms per second of speech): the fast CPU default for English.

``ASRRouter`` loads what ``ASRConfig.engine`` needs and routes each call by language. Engines
decode whole utterances (already cut by our VAD) in worker threads behind a cross-session
micro-batcher (services/batching.py): utterances of different sessions that arrive together are
decoded in one batch, so decodes never block an event loop, concurrent sessions share model runs
instead of fighting over the CPU, and a final transcript goes before speculative work and
partials (``Priority``). ``PartialTranscriber`` re-decodes a growing utterance for live partial
text, as best-effort work that yields to final decodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.asr_base import ASRConfig, ASREngine, DecodeRequest, PooledASR, Transcript, requested_language
from services.audio import MODEL_RATE
from services.batching import Deliver, Priority
from services.errors import InvalidArgument, NotFound
from services.models import default_asr_model, resolve


def whisper_name(model: str) -> str:
    """'whisper-base' for the embedded model, else 'whisper:<hub id or folder name>'."""
    if not model:
        return "whisper-base"
    local = Path(model).expanduser()
    return "whisper:" + (local.name if model.startswith(("/", ".", "~")) else model)


class WhisperASR(PooledASR):
    """One faster-whisper model shared by every session of a process (or replica).

    A batch is one CTranslate2 ``encode`` and one ``generate`` over every utterance's 30 s
    window, with the same options and the same post-processing as ``WhisperModel.transcribe``
    (greedy or beam, temperature 0, no timestamps, no-speech check), so a batched transcript
    equals the one decoded alone.
    """

    def __init__(self, model: Any, cfg: ASRConfig) -> None:
        gpu = _is_gpu(cfg.device)
        super().__init__(cfg, cfg.max_concurrent or (2 if gpu else 1),
                         cfg.max_batch or (8 if gpu else 1))
        self.model = model
        self.name = whisper_name(cfg.model)
        self.languages = frozenset(model.supported_languages)
        self._suppress: list[int] | None = None

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

    def decode_one(self, request: DecodeRequest) -> Transcript:
        """``WhisperModel.transcribe`` on one utterance: the reference a batch must equal (and the
        path for audio longer than one 30 s window)."""
        x = request.audio
        t0 = time.perf_counter()
        segments, info = self.model.transcribe(
            x, language=request.language, beam_size=self.cfg.beam_size, best_of=1,
            temperature=0.0, condition_on_previous_text=False, without_timestamps=True,
            vad_filter=False,
        )
        text = " ".join(s.text.strip() for s in segments).strip()  # decoding happens here
        return Transcript(text, info.language, x.size / MODEL_RATE, time.perf_counter() - t0,
                          float(info.language_probability), self.name)

    def decode_batch(self, requests: Sequence[DecodeRequest],
                     deliver: Deliver | None = None) -> list[Transcript]:
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        wm = self.model
        fe = wm.feature_extractor
        t0 = time.perf_counter()
        out: list[Transcript | None] = [None] * len(requests)
        windows: list[int] = []  # requests that fit one 30 s window: decoded together
        features: list[np.ndarray] = []
        for i, r in enumerate(requests):
            f = fe(r.audio)
            if f.shape[-1] - 1 > fe.nb_max_frames:
                out[i] = self.decode_one(r)  # several windows: transcribe() seeks through them
            else:
                windows.append(i)
                features.append(f)
        if windows:
            languages = self._languages_of([requests[i].language for i in windows], features)
            tokenizers = {lang: Tokenizer(wm.hf_tokenizer, wm.model.is_multilingual,
                                          task="transcribe", language=lang)
                          for lang, _ in set(languages)}
            if self._suppress is None:
                self._suppress = list(get_suppressed_tokens(next(iter(tokenizers.values())), [-1]))
            # transcribe() drops the extractor's last frame, then pads the window to 30 s
            batch = np.stack([pad_or_trim(f[:, : f.shape[-1] - 1]) for f in features])
            encoded = wm.encode(batch)
            prompts = [[*tokenizers[lang].sot_sequence, tokenizers[lang].no_timestamps]
                       for lang, _ in languages]
            results = wm.model.generate(
                encoded, prompts, length_penalty=1, repetition_penalty=1, no_repeat_ngram_size=0,
                max_length=wm.max_length, return_scores=True, return_no_speech_prob=True,
                suppress_blank=True, suppress_tokens=self._suppress,
                max_initial_timestamp_index=round(1.0 / wm.time_precision),  # transcribe()'s 1 s
                beam_size=self.cfg.beam_size, patience=1,
            )
            decode_s = time.perf_counter() - t0
            for i, (lang, prob), result in zip(windows, languages, results, strict=True):
                tokens = result.sequences_ids[0]
                # transcribe()'s no-speech check: a likely silent window with unsure words is
                # empty (its temperature fallback has nothing to fall back to at temperature 0)
                avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
                silent = result.no_speech_prob > 0.6 and not avg_logprob > -1.0
                text = "" if silent else tokenizers[lang].decode(tokens).strip()
                x = requests[i].audio
                out[i] = Transcript(text, lang, x.size / MODEL_RATE, decode_s, prob, self.name,
                                    len(requests))
        return [t for t in out if t is not None]

    def _languages_of(self, wanted: list[str | None], features: list[np.ndarray]
                      ) -> list[tuple[str, float]]:
        """(language, probability) per window: the requested one, or detected as
        ``WhisperModel.detect_language`` does (first 30 s, features not trimmed)."""
        from faster_whisper.audio import pad_or_trim

        wm = self.model
        out = [(lang, 1.0) if lang else ("", 0.0) for lang in wanted]
        detect = [k for k, lang in enumerate(wanted) if not lang]
        if detect and not wm.model.is_multilingual:
            for k in detect:
                out[k] = ("en", 1.0)
        elif detect:
            n = wm.feature_extractor.nb_max_frames
            encoded = wm.encode(np.stack([pad_or_trim(features[k][:, :n]) for k in detect]))
            for k, ranked in zip(detect, wm.model.detect_language(encoded), strict=True):
                token, prob = ranked[0]
                out[k] = (token[2:-2], float(prob))
        return out


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

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None,
                        priority: Priority | int | str = Priority.FINAL) -> Transcript:
        return self.engine_for(language).transcribe_sync(audio16k, language, priority)

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None,
                         priority: Priority | int | str = Priority.FINAL) -> Transcript:
        return await self.engine_for(language).transcribe(audio16k, language, priority)

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
                name: {"languages": _languages_text(e.languages), "warm_up_s": self.warm_up_s.get(name),
                       "max_batch": getattr(e, "max_batch", 1)}
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

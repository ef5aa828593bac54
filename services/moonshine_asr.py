"""Moonshine ASR engine: fast English speech recognition on CPU.

Moonshine's encoder takes the audio as it is (no fixed 30 s window as in Whisper), so a 2 s
question decodes in ~100 ms where Whisper base takes ~1 s. The model runs on the ONNX Runtime
bundled in ``moonshine-voice`` (0.1.0, the last version that ships the weights); we import only
its transcriber (never its download helpers, nor sounddevice).
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.asr import ASRConfig, PooledASR, Transcript
from services.audio import MODEL_RATE
from services.errors import InvalidArgument, NotFound, Unavailable
from services.models import MOONSHINE_PIP, default_moonshine_model

#: Keeps each transcriber's ONNX Runtime on one thread: as fast as 4 threads on short clips
#: here, and it leaves the other core to the LLM. Read by libmoonshine when a model loads.
SINGLE_THREAD_ENV = "MOONSHINE_ORT_SINGLE_THREAD"

#: Options of the C transcriber. Our VAD has already cut the utterance, so Moonshine's own VAD
#: is off (threshold 0 = one segment): with it on, ~0.3 s of leading silence was transcribed as
#: "You", and a pause could split a sentence into separately decoded fragments ("Am not the
#: front door."). Its copy of the audio in every result line is not needed either.
TRANSCRIBER_OPTIONS = {"vad_threshold": "0", "return_audio_data": "false"}

#: Quiet a decode gets before and after the speech (zeros are added where the audio has less).
#: Speech starting at the first sample often got an invented prefix ("10. The quick brown
#: fox..."): 0.1-0.3 s of quiet before it removed that on Piper speech (WER 2.8% -> 0.5%).
#: With under ~0.5 s of quiet after it, 13-26% of finished sentences ended with a comma
#: instead of a full stop, which reads as "more to come" to the end-of-turn check; with 0.5 s,
#: none did. Our VAD's pre-roll usually provides the lead-in; a speculative decode started
#: 200 ms into the silence gets ~0.3 s added (~15 ms more decode).
LEAD_IN_S = 0.2
LEAD_OUT_S = 0.5
_QUIET = 0.01  # ~-40 dBFS
#: Moonshine Tiny sometimes wraps a whole line in quotes ('"\'Please turn off the lights.\'').
_QUOTES = "\"'“”‘’"

#: Architectures in a Moonshine model folder name (e.g. 'base-en'), most specific first.
_ARCHS = ("medium-streaming", "small-streaming", "base-streaming", "tiny-streaming", "base", "tiny")
_MODEL_FILES_HINT = "encoder_model.ort, decoder_model_merged.ort and tokenizer.bin"


def model_arch_name(folder: Path) -> str:
    """Architecture named by a model folder ('tiny-en' -> 'tiny'); 'tiny' when none is named."""
    name = folder.name.lower()
    return next((arch for arch in _ARCHS if arch in name), "tiny")


def model_language(folder: Path) -> str:
    """Language suffix of a model folder ('base-es' -> 'es'); English when there is none."""
    m = re.search(r"-([a-z]{2})$", folder.name.lower())
    return m.group(1) if m else "en"


def model_folder(value: str) -> Path:
    """The Moonshine model folder a config names: '' = embedded Tiny English, else a folder."""
    if not value:
        return Path(default_moonshine_model())
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise NotFound(
            f"Moonshine model folder not found: {value}. Give a local folder with "
            f"{_MODEL_FILES_HINT} (hub ids are not supported: downloads are off), or '' for the "
            "embedded Tiny English model"
        )
    if not (folder / "tokenizer.bin").is_file() or not any(folder.glob("*.ort")):
        raise NotFound(f"no Moonshine model in {folder}: expected {_MODEL_FILES_HINT}")
    return folder


def _transcriber_api() -> tuple[Any, Any]:
    try:
        from moonshine_voice.moonshine_api import ModelArch
        from moonshine_voice.transcriber import Transcriber
    except ImportError as exc:
        raise NotFound(
            f"Moonshine is not usable ({exc}); install it with: pip install {MOONSHINE_PIP}"
        ) from exc
    return Transcriber, ModelArch


def with_quiet_edges(x: np.ndarray) -> np.ndarray:
    """``x`` with zeros added so that speech starts at least ``LEAD_IN_S`` in and is followed by at
    least ``LEAD_OUT_S`` of quiet."""
    loud = np.flatnonzero(np.abs(x) > _QUIET)
    lead = int(loud[0]) if loud.size else x.size
    tail = x.size - 1 - int(loud[-1]) if loud.size else x.size
    before = max(0, int(LEAD_IN_S * MODEL_RATE) - lead)
    after = max(0, int(LEAD_OUT_S * MODEL_RATE) - tail)
    if not before and not after:
        return x
    return np.concatenate([np.zeros(before, np.float32), x, np.zeros(after, np.float32)])


#: Moonshine Tiny learned some old spellings ("to-night"); the LLM and our WER want today's.
_OLD_SPELLINGS = re.compile(r"\b([Tt])o-(day|night|morrow)\b")


def clean_line(text: str) -> str:
    """A decoded line without surrounding whitespace, without quotes wrapped around it all, and
    with 'to-night', 'to-morrow', 'to-day' spelled as one word."""
    text = text.strip()
    if text[:1] in _QUOTES:
        text = text.lstrip(_QUOTES).rstrip(_QUOTES).strip()
    return _OLD_SPELLINGS.sub(r"\1o\2", text)


def _decode_lines(transcriber: Any, x: np.ndarray) -> list[str]:
    """Text lines of one decode. The package's own method copies the samples into a ctypes array
    one Python float at a time (~2.5 ms per second of audio); hand it our buffer instead."""
    lib = getattr(transcriber, "_lib", None)
    if lib is None or not hasattr(transcriber, "_parse_transcript"):  # another package version
        result = transcriber.transcribe_without_streaming(x.tolist(), MODEL_RATE)
    else:
        from moonshine_voice.errors import check_error
        from moonshine_voice.moonshine_api import TranscriptC

        x = np.ascontiguousarray(x, dtype=np.float32)
        out = ctypes.POINTER(TranscriptC)()
        # ctypes releases the GIL for the call: other sessions' threads keep running
        check_error(lib.moonshine_transcribe_without_streaming(
            transcriber._handle, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), x.size,
            MODEL_RATE, 0, ctypes.byref(out)))
        result = transcriber._parse_transcript(out)
    return [line.text for line in result.lines]


class MoonshineASR(PooledASR):
    """Moonshine transcribers (one per decode slot) shared by every session of a process."""

    def __init__(self, transcribers: list[Any], cfg: ASRConfig, name: str,
                 languages: frozenset[str]) -> None:
        if not transcribers:
            raise InvalidArgument("MoonshineASR needs at least one transcriber")
        super().__init__(cfg, len(transcribers))
        self.name = name
        self.languages = languages
        # a transcriber is used by one thread at a time: the free ones wait in this queue
        self._free: queue.Queue[Any] = queue.Queue()
        for t in transcribers:
            self._free.put(t)
        self._closed = threading.Event()

    @classmethod
    def load(cls, cfg: ASRConfig | None = None) -> MoonshineASR:
        """Load ``cfg.moonshine_model`` ('' = embedded Tiny English), one copy per decode slot."""
        cfg = cfg or ASRConfig()
        folder = model_folder(cfg.moonshine_model)
        os.environ.setdefault(SINGLE_THREAD_ENV, "1")  # an explicit setting is the user's
        transcriber_cls, model_arch = _transcriber_api()
        from moonshine_voice.moonshine_api import string_to_model_arch

        arch_name = model_arch_name(folder)
        arch = string_to_model_arch(arch_name)
        assert isinstance(arch, model_arch)
        transcribers = []
        try:
            for _ in range(cfg.max_concurrent or 1):
                transcribers.append(transcriber_cls(str(folder), arch, options=TRANSCRIBER_OPTIONS))
        except Exception as exc:  # MoonshineError: bad or incomplete files
            for t in transcribers:
                t.close()
            raise InvalidArgument(
                f"cannot load the Moonshine model in {folder} as '{arch_name}': {exc}"
            ) from exc
        embedded = not cfg.moonshine_model
        name = "moonshine-tiny-en" if embedded else f"moonshine:{folder.name}"
        return cls(transcribers, cfg, name, frozenset({model_language(folder)}))

    def _language(self, language: str | None) -> str | None:
        lang = super()._language(language)
        if lang is None:
            raise InvalidArgument(
                f"{self.name} cannot detect the language (it transcribes "
                f"{', '.join(sorted(self.languages))}); give a language, or use Whisper "
                "(asr.engine 'auto' or 'whisper') for detection"
            )
        return lang

    def _acquire(self) -> Any:
        while True:
            if self._closed.is_set():
                raise Unavailable("speech recognition engine is closed")
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                continue

    def transcribe_sync(self, audio16k: np.ndarray, language: str | None = None) -> Transcript:
        """Blocking decode (for threads and scripts); waits for a free transcriber."""
        x = self.check_audio(audio16k)
        lang = self._language(language)
        assert lang is not None
        transcriber = self._acquire()
        try:
            t0 = time.perf_counter()
            lines = _decode_lines(transcriber, with_quiet_edges(x))
            decode_s = time.perf_counter() - t0
        finally:
            if self._closed.is_set():
                transcriber.close()
            else:
                self._free.put(transcriber)
        text = " ".join(filter(None, map(clean_line, lines)))
        return Transcript(text, lang, x.size / MODEL_RATE, decode_s, 1.0, self.name)

    def close(self) -> None:
        """Stop the decode threads and free the models (one still decoding is freed after it)."""
        self._closed.set()
        super().close()
        while True:
            try:
                self._free.get_nowait().close()
            except queue.Empty:
                break

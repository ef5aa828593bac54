"""Piper TTS engine: streaming synthesis off the event loop.

Piper (onnxruntime) produces one audio array per sentence, so latency is set by the size of the
text it is given: the conversation's ``TTSStream`` feeds it clause-sized chunks.

Each synthesis runs in its own thread that hands audio to the event loop through a bounded
handoff; the thread checks a stop flag before every sentence, so a cancelled consumer stops it
after at most one ONNX run. A shared semaphore caps how many ONNX runs execute at once, so
concurrent streams take turns instead of oversubscribing the CPU.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.chunking import ChunkerConfig
from services.deadline_slots import NO_DEADLINE, DeadlineSlots
from services.errors import (
    InternalError,
    InvalidArgument,
    NotFound,
    VoxError,
)
from services.models import default_tts_voice, resolve

#: Prefix of synthesis thread names (tests look for leftovers by it).
THREAD_PREFIX = "piper-synth"


def _default_chunker() -> ChunkerConfig:
    return ChunkerConfig()


class TTSConfig(BaseModel):
    """Speech synthesis settings."""

    model_config = ConfigDict(extra="forbid")

    voice: str = Field(
        default="", description="Piper voice .onnx path (its .json beside it); '' = embedded joe voice."
    )
    length_scale: float = Field(default=1.0, gt=0, description="Speaking rate: >1 slower, <1 faster.")
    speaker_id: int | None = Field(default=None, description="Speaker for multi-speaker voices.")
    use_cuda: bool = Field(default=False, description="Run the ONNX voice on CUDA.")
    noise_scale: float | None = Field(
        default=None, ge=0, description="Generator noise (expressiveness); None = the voice's value."
    )
    noise_w_scale: float | None = Field(
        default=None, ge=0, description="Phoneme duration noise; None = the voice's own value."
    )
    volume: float = Field(
        default=1.0, gt=0, le=4, description="Gain applied after Piper's peak normalization."
    )
    normalize_audio: bool = Field(
        default=True, description="Let Piper scale each sentence to full range."
    )
    num_threads: int = Field(
        default=1, ge=0, description="onnxruntime intra-op threads per voice (0 = all cores)."
    )
    max_concurrent: int = Field(
        default=2, ge=1,
        description="ONNX runs allowed at once per loaded voice; more syntheses wait their turn.",
    )
    scheduling: Literal["deadline", "fifo"] = Field(
        default="deadline",
        description="Which waiting synthesis gets a free ONNX slot: the one whose caller's audio runs "
                    "out first (deadline), or the first to ask (fifo, the order before issue 20).",
    )
    memory_arena: bool = Field(
        default=True,
        description="onnxruntime's CPU memory arena: 20-30% faster on long chunks (+8 ms on a "
                    "3-word one without it); it keeps the largest chunk's memory for good.",
    )
    audio_queue: int = Field(
        default=4, ge=1,
        description="Audio chunks a synthesis may run ahead of its consumer (bounded handoff).",
    )
    max_text_chars: int = Field(
        default=4000, ge=1, description="Longest text accepted by one synthesize() call."
    )
    max_pending_chunks: int = Field(
        default=64, ge=1,
        description="Text chunks a TTSStream may hold before push_text raises RESOURCE_EXHAUSTED.",
    )
    chunker: ChunkerConfig = Field(
        default_factory=_default_chunker,
        description="How TTSStream cuts incoming text deltas into chunks.",
    )


_DONE = object()


class PiperTTS:
    """A loaded Piper voice. Safe to share between concurrent syntheses and streams."""

    def __init__(self, voice: Any, config: TTSConfig, voice_path: str) -> None:
        from piper import SynthesisConfig

        self.voice = voice
        self.config = config
        self.voice_path = voice_path
        self._syn_config = SynthesisConfig(
            speaker_id=config.speaker_id,
            length_scale=config.length_scale,
            noise_scale=config.noise_scale,
            noise_w_scale=config.noise_w_scale,
            normalize_audio=config.normalize_audio,
            volume=config.volume,
        )
        self._onnx_slots = DeadlineSlots(config.max_concurrent, config.scheduling)
        self._active = 0
        self._active_lock = threading.Lock()
        self._ids = itertools.count()

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, config: TTSConfig | None = None) -> PiperTTS:
        """Load the voice named by ``config.voice`` (blocking, ~0.5 s; call it off the loop)."""
        import onnxruntime
        from piper import PiperConfig, PiperVoice

        cfg = config or TTSConfig()
        path = Path(resolve(cfg.voice, default_tts_voice))
        if not path.is_file():
            raise NotFound(
                f"Piper voice file not found: {path} (give the path of a voice .onnx file; "
                "voices are not downloaded)"
            )
        cfg_path = Path(f"{path}.json")
        if not cfg_path.is_file():
            raise NotFound(
                f"Piper voice config not found: {cfg_path} (it must lie beside {path.name})"
            )
        try:
            voice_cfg = PiperConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"cannot read Piper voice config {cfg_path}: {exc}") from exc
        if cfg.speaker_id is not None and not 0 <= cfg.speaker_id < max(voice_cfg.num_speakers, 1):
            raise InvalidArgument(
                f"speaker_id {cfg.speaker_id} out of range: voice {path.name} has "
                f"{voice_cfg.num_speakers} speaker(s)"
            )
        # Built here rather than by PiperVoice.load, which gives onnxruntime every core.
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = cfg.num_threads
        opts.inter_op_num_threads = 1
        # The arena never gives memory back, but turning it off did not stop the TTS replica's
        # growth under load (BENCHMARKS.md, Memory) and costs speed: it stays on by default.
        opts.enable_cpu_mem_arena = cfg.memory_arena
        providers = ["CUDAExecutionProvider"] if cfg.use_cuda else ["CPUExecutionProvider"]
        try:
            session = onnxruntime.InferenceSession(
                str(path), sess_options=opts, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
            raise InvalidArgument(f"cannot load Piper voice {path}: {exc}") from exc
        voice = PiperVoice(session=session, config=voice_cfg)
        return cls(voice, cfg, str(path))

    @property
    def sample_rate(self) -> int:
        """Output rate of the voice in Hz (22050 for the default voice)."""
        return int(self.voice.config.sample_rate)

    @property
    def active_syntheses(self) -> int:
        """Synthesis threads still running (including ones stopping after a cancel)."""
        with self._active_lock:
            return self._active

    async def wait_idle(self, within_s: float = 10.0) -> bool:
        """Wait until no synthesis thread runs; False if some still do after ``within_s``."""
        deadline = time.monotonic() + within_s
        while self.active_syntheses:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # --- synthesis -------------------------------------------------------------------------

    def _check_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument("text to synthesize is empty")
        if len(text) > self.config.max_text_chars:
            raise InvalidArgument(
                f"text to synthesize has {len(text)} characters; the limit is "
                f"{self.config.max_text_chars} (split it, or stream it through TTSStream)"
            )
        return text.strip()

    def synthesize_blocking(
        self, text: str, stop: threading.Event | None = None, deadline: float = NO_DEADLINE
    ) -> Iterator[np.ndarray]:
        """Synthesize in the calling thread: one float32 array per sentence.

        Stops before the next sentence once ``stop`` is set. Each ONNX run holds one of the
        voice's ``max_concurrent`` slots; waiting runs get them earliest ``deadline`` (a
        ``time.monotonic()`` value: when the caller's audio runs out) first.
        """
        text = self._check_text(text)
        chunks = iter(self.voice.synthesize(text, syn_config=self._syn_config))
        while True:
            # Waiting for a slot keeps checking the flag, so a cancelled synthesis never runs.
            if not self._onnx_slots.acquire(deadline, stop):
                return
            try:
                if stop is not None and stop.is_set():
                    return
                # Piper's generator phonemizes on the first step and runs ONNX on every step.
                chunk = next(chunks, None)
            finally:
                self._onnx_slots.release()
            if chunk is None:
                return
            yield np.asarray(chunk.audio_float_array, dtype=np.float32)

    def synthesize(self, text: str, deadline: float = NO_DEADLINE) -> AsyncGenerator[np.ndarray, None]:
        """Stream float32 audio (one array per sentence) for ``text``, without blocking the loop.

        ``deadline`` (``time.monotonic()``; see ``services.deadline_slots.deadline_in``) orders this
        synthesis among those waiting for the CPU: the caller whose audio runs out first goes first.

        The text is checked now (InvalidArgument for empty text); synthesis starts at the first
        iteration. Closing or cancelling the iterator stops the synthesis thread before its next
        sentence; use ``contextlib.aclosing`` when you may stop iterating early.
        """
        text = self._check_text(text)
        return self._synthesize(text, deadline)

    async def _synthesize(self, text: str, deadline: float) -> AsyncGenerator[np.ndarray, None]:
        loop = asyncio.get_running_loop()
        maxsize = self.config.audio_queue
        # The slots bound the handoff; the queue itself never holds more than maxsize items.
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=maxsize)
        slots = threading.Semaphore(maxsize)
        stop = threading.Event()

        def post(item: Any) -> bool:
            while not slots.acquire(timeout=0.05):
                if stop.is_set():
                    return False
            if stop.is_set():
                return False
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed under us
                return False
            return True

        def work() -> None:
            try:
                for audio in self.synthesize_blocking(text, stop, deadline):
                    if not post(audio):
                        return
                post(_DONE)
            except BaseException as exc:
                post(exc)
            finally:
                with self._active_lock:
                    self._active -= 1

        thread = threading.Thread(
            target=work, name=f"{THREAD_PREFIX}-{next(self._ids)}", daemon=True
        )
        with self._active_lock:
            self._active += 1
        try:
            thread.start()
        except BaseException:
            with self._active_lock:
                self._active -= 1
            raise
        try:
            while True:
                item = await queue.get()
                slots.release()
                if item is _DONE:
                    return
                if isinstance(item, VoxError):
                    raise item
                if isinstance(item, BaseException):
                    raise InternalError(f"speech synthesis failed: {item}") from item
                yield item
        finally:
            # Not joined: the thread exits by itself before its next sentence, and waiting for
            # the ONNX run in progress would only delay the caller's cancellation.
            stop.set()
            self._onnx_slots.wake()  # a stopped waiter first in line leaves now, not at its next poll

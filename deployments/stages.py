"""Thin Ray Serve deployments around the four engines (one autoscaled deployment per stage).

Options here are defaults; a Serve config's ``deployments:`` entries (deployments/profiles)
override them per profile (replicas, CPUs, GPU fractions).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve

from services.asr import ASRConfig, WhisperASR
from services.audio import StreamResampler, float_to_pcm16
from services.llm import LLMConfig, LLMEngine
from services.tts import PiperTTS, TTSConfig
from services.vad import SileroModel, VADConfig, VADState


@serve.deployment(name="VAD", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
class VADDeployment:
    """Stateless silero scoring: callers carry the per-stream ``VADState``."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.model = SileroModel.load(VADConfig.model_validate(config or {}))

    async def probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        return self.model.probs(audio16k, state)  # ~0.1 ms per window: cheaper inline than a thread


@serve.deployment(name="ASR", max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
class ASRDeployment:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = ASRConfig.model_validate(config or {})
        self.asr = WhisperASR.load(self.config)

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None) -> dict[str, Any]:
        result = await self.asr.transcribe(audio16k, language)
        return {"text": result.text, "language": result.language,
                "duration_s": result.duration_s, "decode_s": result.decode_s}

    async def partial(self, audio16k: np.ndarray, language: str | None = None) -> str | None:
        """Best effort: None at once when every decode slot is busy, so finals never wait."""
        result = await self.asr.try_transcribe(audio16k, language)
        return result.text if result is not None else None

    async def info(self) -> dict[str, str]:
        return {"model": self.config.model or "whisper-base (embedded)"}


@serve.deployment(name="LLM", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class LLMDeployment:
    async def __init__(self, config: dict[str, Any] | None = None) -> None:  # type: ignore[misc]
        self.config = LLMConfig.model_validate(config or {})
        self.engine = await LLMEngine.create(self.config)  # vLLM starts in a thread (~15 s on CPU)

    async def generate(self, messages: list[dict[str, str]], max_tokens: int | None = None,
                       audio: np.ndarray | None = None) -> AsyncIterator[str]:
        # A cancelled caller cancels this generator, which aborts the vLLM request.
        kwargs: dict[str, Any] = {"max_tokens": max_tokens}
        if audio is not None:
            kwargs["audio"] = audio
        async for delta in self.engine.stream_chat(messages, **kwargs):
            yield delta

    async def num_unfinished(self) -> int:
        return self.engine.num_unfinished_requests()

    async def info(self) -> dict[str, Any]:
        return {"model": self.config.model or "SmolLM2-135M-Instruct (embedded)",
                "speech_native": bool(getattr(self.engine, "supports_audio", False))}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment(name="TTS", max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
class TTSDeployment:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.tts = PiperTTS.load(TTSConfig.model_validate(config or {}))

    async def synthesize(self, text: str, sample_rate: int = 0) -> AsyncIterator[bytes]:
        """PCM16 for ``text`` at ``sample_rate`` (0 = the voice's own), one piece per sentence."""
        rate = sample_rate or self.tts.sample_rate
        resampler = StreamResampler(self.tts.sample_rate, rate)
        # aclosing: a cancelled stream stops the synthesis thread now, not at garbage collection
        async with contextlib.aclosing(self.tts.synthesize(text)) as audio_stream:
            async for audio in audio_stream:
                yield float_to_pcm16(resampler.push(audio))
        if (tail := resampler.flush()).size:
            yield float_to_pcm16(tail)

    async def sample_rate(self) -> int:
        return self.tts.sample_rate



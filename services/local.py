"""``Stages`` backed by engines in this process: the demo, benchmarks and tests without Ray."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.asr import ASRConfig, Transcript, WhisperASR
from services.audio import StreamResampler, float_to_pcm16
from services.llm import LLMConfig, LLMEngine
from services.tts import PiperTTS, TTSConfig
from services.vad import SileroModel, VADConfig, VADState


@dataclass
class LocalStages:
    """All four engines loaded here; implements ``services.session.Stages``."""

    vad: SileroModel
    asr: WhisperASR
    llm: LLMEngine
    tts: PiperTTS

    @classmethod
    def load(cls, vad: VADConfig | None = None, asr: ASRConfig | None = None,
             llm: LLMConfig | None = None, tts: TTSConfig | None = None) -> LocalStages:
        return cls(SileroModel.load(vad or VADConfig()), WhisperASR.load(asr or ASRConfig()),
                   LLMEngine.create_sync(llm or LLMConfig()), PiperTTS.load(tts or TTSConfig()))

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        return self.vad.probs(audio16k, state)

    async def transcribe(self, audio16k: np.ndarray, language: str | None) -> Transcript:
        return await self.asr.transcribe(audio16k, language)

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        result = await self.asr.try_transcribe(audio16k, language)
        return result.text if result is not None else None

    async def generate(self, messages: list[dict[str, str]], *, max_tokens: int | None,
                       audio: np.ndarray | None = None) -> AsyncIterator[str]:
        kwargs: dict[str, Any] = {"audio": audio} if audio is not None else {}
        async for delta in self.llm.stream_chat(messages, max_tokens=max_tokens, **kwargs):
            yield delta

    async def synthesize(self, text: str, *, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        resampler = StreamResampler(self.tts.sample_rate, sample_rate or self.tts.sample_rate)
        async with contextlib.aclosing(self.tts.synthesize(text)) as audio_stream:
            async for audio in audio_stream:
                yield float_to_pcm16(resampler.push(audio))
        if (tail := resampler.flush()).size:
            yield float_to_pcm16(tail)

    def shutdown(self) -> None:
        self.llm.shutdown()

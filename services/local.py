"""``Stages`` backed by engines in this process: benchmarks and tests without Ray."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.asr import ASRConfig, ASRRouter, Transcript
from services.audio import StreamResampler, float_to_pcm16
from services.batching import Priority
from services.deadline_slots import deadline_in
from services.llm import ChatEngine, LLMConfig
from services.llm_engines import ToolEngine, create_llm_engine_sync
from services.tools import ToolCallDelta, ToolChoice, ToolSpec
from services.tts import PiperTTS, TTSConfig
from services.turn_detection import SmartTurnModel, TurnDetectorConfig
from services.vad import SileroModel, VADConfig, VADState


@dataclass
class LocalStages:
    """Every engine loaded here; implements ``services.conversation.Stages``."""

    vad: SileroModel
    asr: ASRRouter
    llm: ChatEngine
    tts: PiperTTS
    turn_model: SmartTurnModel | None = None
    tool_engines: ToolEngine = field(default_factory=lambda: ToolEngine(None))

    @classmethod
    def load(cls, vad: VADConfig | None = None, asr: ASRConfig | None = None,
             llm: LLMConfig | None = None, tts: TTSConfig | None = None,
             turn: TurnDetectorConfig | None = None) -> LocalStages:
        router = ASRRouter.load(asr or ASRConfig())
        router.warm_up()
        turn_model = SmartTurnModel.load(turn or TurnDetectorConfig())
        turn_model.warm_up()
        llm = llm or LLMConfig()
        return cls(SileroModel.load(vad or VADConfig()), router, create_llm_engine_sync(llm),
                   PiperTTS.load(tts or TTSConfig()), turn_model, ToolEngine(llm))

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        return self.vad.probs(audio16k, state)

    async def transcribe(self, audio16k: np.ndarray, language: str | None,
                         priority: Priority = Priority.FINAL) -> Transcript:
        return await self.asr.transcribe(audio16k, language, priority)

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        result = await self.asr.try_transcribe(audio16k, language)
        return result.text if result is not None else None

    async def end_of_turn(self, audio16k: np.ndarray) -> float | None:
        if self.turn_model is None:
            return None
        return await self.turn_model.apredict(audio16k)

    async def generate(self, messages: list[dict[str, Any]], *, max_tokens: int | None,
                       audio: np.ndarray | None = None, tools: list[ToolSpec] | None = None,
                       tool_choice: ToolChoice | None = None, words_only: bool = False,
                       ) -> AsyncIterator[str | ToolCallDelta]:
        kwargs: dict[str, Any] = {"audio": audio} if audio is not None else {}
        engine = await self.tool_engines.engine_for(self.llm, tools)
        async with engine.stream_chat(messages, max_tokens=max_tokens, tools=tools, tool_choice=tool_choice,
                                      words_only=words_only, **kwargs) as stream:
            async for delta in stream:
                yield delta

    async def synthesize(self, text: str, *, voice: str, sample_rate: int,
                         slack_s: float | None = None) -> AsyncIterator[bytes]:
        resampler = StreamResampler(self.tts.sample_rate, sample_rate or self.tts.sample_rate)
        async with contextlib.aclosing(self.tts.synthesize(text, deadline_in(slack_s))) as audio_stream:
            async for audio in audio_stream:
                yield float_to_pcm16(resampler.push(audio))
        if (tail := resampler.flush()).size:
            yield float_to_pcm16(tail)

    async def count_tokens(self, text: str) -> int:
        return self.llm.count_tokens(text)

    async def info(self) -> dict[str, Any]:
        return {"voice_rate": self.tts.sample_rate, "llm_model": self.llm.model,
                "asr_model": self.asr.describe()["model"], "speech_native": self.llm.supports_audio}

    async def replicas_running(self) -> None:
        """In-process engines: they run as long as this process does."""

    def shutdown(self) -> None:
        self.llm.shutdown()
        self.tool_engines.shutdown()

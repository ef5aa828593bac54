"""Thin Ray Serve deployments around the four engines (one autoscaled deployment per stage).

Options here are defaults; a Serve config's ``deployments:`` entries (deployments/profiles)
override them per profile (replicas, CPUs, GPU fractions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve

from deployments.autoscaling import InFlight, RecentValues
from deployments.checkpoints import fix_checkpoint
from deployments.metrics import StageMetrics
from services.asr import ASRConfig, ASRRouter
from services.audio import StreamResampler, float_to_pcm16
from services.batching import Priority
from services.deadline_slots import deadline_in
from services.errors import FailedPrecondition
from services.llm import ChatEngine, LLMConfig, coalesce_deltas
from services.llm_engines import ToolEngine, create_llm_engine
from services.models import EMBEDDED_LLMS
from services.tools import ToolCallDelta, ToolChoice, ToolSpec
from services.tts import PiperTTS, TTSConfig
from services.vad import SileroModel, VADConfig, VADState


@serve.deployment(name="VAD", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
class VADDeployment:
    """Stateless silero scoring: callers carry the per-stream ``VADState``."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.model = SileroModel.load(VADConfig.model_validate(config or {}))

    async def probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        return self.model.probs(audio16k, state)  # ~0.1 ms per window: cheaper inline than a thread


# Each stage runs one small request before it takes traffic: first runs allocate buffers and
# pick kernels (seconds on CPU), and the first caller should not pay for that.
WARMUP_TEXT = "Hello there."


@serve.deployment(name="ASR", max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
class ASRDeployment:
    """Every ASR engine the config needs (Moonshine for English on CPU, Whisper for the rest),
    routed per call by the session's language."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = ASRConfig.model_validate(config or {})
        self.asr = ASRRouter.load(self.config)
        self.metrics = StageMetrics("asr")
        self.asr.warm_up()  # every loaded engine: a session in any language gets a warm one
        # autoscaling signals (record_autoscaling_stats)
        self.utterances = InFlight()
        self.wait_ms = RecentValues()
        self.batch_fill = RecentValues()

    async def transcribe(self, audio16k: np.ndarray, language: str | None = None,
                         priority: int | str = 0) -> dict[str, Any]:
        """One utterance, batched with the other sessions' utterances on this replica.
        ``priority`` (services.batching.Priority, as int or name): 0 final (default),
        1 barge-in, 2 speculative, 3 partial; more urgent work is decoded first."""
        t0 = time.perf_counter()
        with self.metrics.time("transcribe"), self.utterances:
            result = await self.asr.transcribe(audio16k, language, Priority.parse(priority))
        # time spent waiting for a decoder, not decoding: what another replica would take away
        self.wait_ms.add(max(0.0, 1000 * (time.perf_counter() - t0 - result.decode_s)))
        engine = self.asr.engines.get(result.engine)
        self.batch_fill.add(result.batch_size / max(1, getattr(engine, "max_batch", 1)))
        return {"text": result.text, "language": result.language, "engine": result.engine,
                "duration_s": result.duration_s, "decode_s": result.decode_s,
                "batch_size": result.batch_size}

    async def partial(self, audio16k: np.ndarray, language: str | None = None) -> str | None:
        """Best effort: None at once unless the engine has a free worker and a free seat in its
        next batch, so finals never wait for partials."""
        result = await self.asr.try_transcribe(audio16k, language)
        return result.text if result is not None else None

    async def info(self) -> dict[str, Any]:
        """'model': the engine of sessions that give no language; 'engines': every loaded one
        with its languages and warm-up time."""
        return self.asr.describe()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Utterances in this replica now (decoding or waiting), p95 wait for a decoder (ms) and
        mean batch fill of the last 10 s (deployments.autoscaling)."""
        return {"utterances": float(self.utterances.now), "wait_ms": self.wait_ms.p95(),
                "batch_fill": self.batch_fill.mean()}


def _fixed(cfg: LLMConfig) -> LLMConfig:
    """``cfg`` pointing at a checkpoint vLLM can load (a repaired copy where one is needed)."""
    if not cfg.model or cfg.model in EMBEDDED_LLMS:
        return cfg  # the embedded models need nothing
    return cfg.model_copy(update={"model": fix_checkpoint(cfg.model)})


@serve.deployment(name="LLM", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class LLMDeployment:
    """Text turns on ``llm``; audio turns (speech-native) on ``speech_llm``, or on ``llm`` when
    that model is itself an audio LLM (an audio LLM answers text turns too)."""

    async def __init__(self, config: dict[str, Any] | None = None,  # type: ignore[misc]
                       speech_config: dict[str, Any] | None = None) -> None:
        self.config = LLMConfig.model_validate(config or {})
        self.metrics = StageMetrics("llm")
        # llm.engine picks CTranslate2 or vLLM (logged); either starts in a thread (vLLM ~15 s on CPU)
        self.engine = await create_llm_engine(_fixed(self.config))
        self.audio_engine: ChatEngine | None = self.engine if self.engine.supports_audio else None
        self.tool_engine = ToolEngine(_fixed(self.config))
        self.ttft_ms = RecentValues()  # autoscaling signal: time to first piece of each stream
        try:
            # sessions with tools: the tool model, loaded now so the first call does not wait for it
            await self.tool_engine.load()
            if not self.tool_engine.separate:
                await asyncio.to_thread(self.engine.warm_tools)
            if speech_config is not None:
                self.audio_engine = await create_llm_engine(_fixed(LLMConfig.model_validate(speech_config)))
                if not self.audio_engine.supports_audio:
                    raise ValueError(f"speech_llm model {self.audio_engine.model} is not an audio LLM")
            async with self.engine.stream_chat([{"role": "user", "content": WARMUP_TEXT}], max_tokens=2) as warm:
                _ = [d async for d in warm]
        except BaseException:
            self._shutdown_engines()  # a replica that fails to start must not leave its engines to the collector
            raise

    async def generate(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
                       audio: np.ndarray | None = None, tools: list[ToolSpec] | None = None,
                       tool_choice: ToolChoice | None = None, words_only: bool = False,
                       ) -> AsyncIterator[str | ToolCallDelta]:
        """Text deltas (and ``ToolCallDelta`` items when ``tools`` are offered: the tool model answers)."""
        # A cancelled caller cancels this generator; closing the stream aborts the engine's request.
        if audio is None:
            engine = await self.tool_engine.engine_for(self.engine, tools)
            stream = engine.stream_chat(messages, max_tokens=max_tokens, tools=tools, tool_choice=tool_choice,
                                        words_only=words_only)
        elif self.audio_engine is None:
            raise FailedPrecondition("this deployment has no audio LLM for speech-native turns")
        else:
            stream = self.audio_engine.stream_chat(messages, max_tokens=max_tokens, audio=audio)
        cfg = self.config
        t0, first = time.perf_counter(), True
        with self.metrics.time("generate"):
            async with stream:
                # Each item is a Ray hop: after the first words, join tokens into timed pieces.
                async for piece in coalesce_deltas(stream, cfg.delta_interval_ms / 1000, cfg.delta_eager_words):
                    if first:
                        self.ttft_ms.add(1000 * (time.perf_counter() - t0))
                        first = False
                    yield piece

    def _engines(self) -> list[ChatEngine]:
        extra = [e for e in (self.audio_engine, self.tool_engine.engine) if e is not None and e is not self.engine]
        return [self.engine, *extra]

    async def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for the text LLM (the gateway checks system prompts with it)."""
        return self.engine.count_tokens(text)

    def _unfinished(self) -> int:
        return sum(e.num_unfinished_requests() for e in self._engines())

    async def stats(self) -> dict[str, Any]:
        """What the engines hold now (operators, autoscaling): requests the engines still track, running
        or queued (0 once every stream ended or was aborted: a hang-up leaves none behind), and
        answers that waited for one behind them (CTranslate2 pacing): how many, and how long."""
        paced = [e.pacing() for e in self._engines()]
        return {"unfinished_requests": self._unfinished(), "yields": sum(p.get("yields", 0) for p in paced),
                "yielded_s": round(sum(p.get("yielded_s", 0) for p in paced), 3)}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Requests the engines hold (running and waiting) and p95 time to first piece of the
        last 10 s, in ms (deployments.autoscaling)."""
        return {"requests": float(self._unfinished()), "ttft_ms": self.ttft_ms.p95()}

    async def info(self) -> dict[str, Any]:
        return {"model": self.config.model or "SmolLM2-135M-Instruct (embedded)", "engine": self.engine.name,
                "tool_model": self.tool_engine.engine.model if self.tool_engine.engine else self.engine.model,
                "speech_model": self.audio_engine.model if self.audio_engine else "",
                "speech_native": self.audio_engine is not None}

    def _shutdown_engines(self) -> None:
        """Stop the LLM engines (idempotent)."""
        tools = getattr(self, "tool_engine", None)
        engines = (getattr(self, "engine", None), getattr(self, "audio_engine", None),
                   tools.engine if tools is not None else None)
        for engine in {id(e): e for e in engines if e is not None}.values():
            engine.shutdown()

    def __del__(self) -> None:
        # Serve's shutdown hook: it calls __del__ when it stops a replica.
        self._shutdown_engines()


@serve.deployment(name="TTS", max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
class TTSDeployment:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.tts = PiperTTS.load(TTSConfig.model_validate(config or {}))
        self.metrics = StageMetrics("tts")
        self.syntheses = InFlight()  # autoscaling signals (record_autoscaling_stats)
        self.rtf = RecentValues()
        for _ in self.tts.synthesize_blocking(WARMUP_TEXT):  # warm-up
            pass

    async def synthesize(self, text: str, sample_rate: int = 0, slack_s: float | None = None) -> AsyncIterator[bytes]:
        """PCM16 for ``text`` at ``sample_rate`` (0 = the voice's own), one piece per sentence.
        ``slack_s``: seconds until the caller's audio runs out (None: no deadline); waiting
        syntheses get the CPU smallest slack first (``TTSConfig.scheduling``)."""
        deadline = deadline_in(slack_s)  # taken on arrival: the caller's clock is not ours
        rate = sample_rate or self.tts.sample_rate
        resampler = StreamResampler(self.tts.sample_rate, rate)
        # aclosing: a cancelled stream stops the synthesis thread now, not at garbage collection
        t0, audio_s = time.perf_counter(), 0.0
        with self.metrics.time("synthesize"), self.syntheses:
            async with contextlib.aclosing(self.tts.synthesize(text, deadline)) as audio_stream:
                async for audio in audio_stream:
                    audio_s += audio.size / self.tts.sample_rate
                    yield float_to_pcm16(resampler.push(audio))
        if audio_s > 0:
            # wall time per second of speech, waiting for a synthesis slot included
            self.rtf.add((time.perf_counter() - t0) / audio_s)
        if (tail := resampler.flush()).size:
            yield float_to_pcm16(tail)

    async def sample_rate(self) -> int:
        return self.tts.sample_rate

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Syntheses in this replica now (running or waiting for a slot) and p95 real-time factor
        of the last 10 s (deployments.autoscaling)."""
        return {"syntheses": float(self.syntheses.now), "rtf": self.rtf.p95()}



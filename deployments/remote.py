"""``Stages`` over DeploymentHandles: how the gateway reaches the stage deployments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from services.vad import SileroModel, VADState


async def _stream(gen: DeploymentResponseGenerator | DeploymentResponse) -> AsyncIterator[Any]:
    """Iterate a streaming handle call; if the consumer stops early, cancel the remote call.

    Serve does not cancel the replica's generator when the awaiting task is cancelled, so the
    cancel is explicit: it reaches the replica as a CancelledError, which aborts vLLM's request.
    """
    assert isinstance(gen, DeploymentResponseGenerator), "call with .options(stream=True)"
    finished = False
    try:
        async for item in gen:
            yield item
        finished = True
    finally:
        if not finished:
            gen.cancel()


async def _call(response: DeploymentResponse | DeploymentResponseGenerator) -> Any:
    """Await a unary handle call; a cancelled caller cancels the call on the replica too."""
    assert isinstance(response, DeploymentResponse)
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class RemoteStages:
    """The conversation's four stages as Ray Serve deployments (VAD optionally in-process)."""

    def __init__(self, vad: DeploymentHandle, asr: DeploymentHandle, llm: DeploymentHandle,
                 tts: DeploymentHandle, local_vad: SileroModel | None = None) -> None:
        self.vad, self.asr, self.llm, self.tts = vad, asr, llm, tts
        self.local_vad = local_vad

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        if self.local_vad is not None:
            return self.local_vad.probs(audio16k, state)
        result: tuple[np.ndarray, VADState] = await self.vad.probs.remote(audio16k, state)
        return result

    async def transcribe(self, audio16k: np.ndarray, language: str | None) -> Any:
        return SimpleNamespace(**await _call(self.asr.transcribe.remote(audio16k, language)))

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        text: str | None = await _call(self.asr.partial.remote(audio16k, language))
        return text

    async def generate(self, messages: list[dict[str, str]], *, max_tokens: int | None,
                       audio: np.ndarray | None = None) -> AsyncIterator[str]:
        gen = self.llm.options(stream=True).generate.remote(messages, max_tokens, audio)
        async for delta in _stream(gen):
            yield delta

    async def synthesize(self, text: str, *, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        gen = self.tts.options(stream=True).synthesize.remote(text, sample_rate)
        async for pcm in _stream(gen):
            yield pcm

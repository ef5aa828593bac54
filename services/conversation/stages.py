"""What a conversation needs from the stages, and the deadlines it puts on every call.

``Stages`` is implemented in one process (``services.local.LocalStages``: demo, benchmarks,
tests without Ray) and over Ray Serve handles (``deployments.remote.RemoteStages``). The
conversation never calls a stage without a deadline: ``within`` bounds a call, ``deadline_stream``
bounds the first item and every gap of a stream, and closes the stream whatever happens (which
cancels the remote call and aborts a vLLM request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

import numpy as np

from services.batching import Priority
from services.errors import DeadlineExceeded
from services.tools import ToolCallDelta, ToolChoice, ToolSpec
from services.vad import VADState

T = TypeVar("T")


class Stages(Protocol):
    """The stages of the voice pipeline, as one conversation sees them."""

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        """Speech probability per 512-sample window, and the carried detector state."""
        ...

    async def transcribe(self, audio16k: np.ndarray, language: str | None,
                         priority: Priority = Priority.FINAL) -> Any:
        """Transcript (an object with ``text`` and ``language``) of one utterance; the ASR decodes
        more urgent work first (finals, then barge-in checks, then speculation, then partials)."""
        ...

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        """Best-effort transcript of a growing utterance; None when the ASR is busy (finals first)."""
        ...

    async def end_of_turn(self, audio16k: np.ndarray) -> float | None:
        """Probability that the user's turn is complete (end-of-turn model); None if there is none."""
        ...

    def generate(self, messages: list[dict[str, Any]], *, max_tokens: int | None,
                 audio: np.ndarray | None = None, tools: list[ToolSpec] | None = None,
                 tool_choice: ToolChoice | None = None, words_only: bool = False,
                 ) -> AsyncIterator[str | ToolCallDelta]:
        """LLM text deltas; ``audio`` (16 kHz) is the user's turn in speech-native mode. With
        ``tools`` the model may call them: ``ToolCallDelta`` items come between the text deltas
        (a session with tools is answered by ``llm.tool_model``). ``words_only``: the answer after
        tool results, with no JSON in it (see ``ChatEngine.stream_chat``)."""
        ...

    def synthesize(self, text: str, *, voice: str, sample_rate: int,
                   slack_s: float | None = None) -> AsyncIterator[bytes]:
        """PCM16 audio for ``text`` at ``sample_rate``, streamed. ``slack_s``: seconds until the
        caller's audio runs out (negative: already waiting; None: no deadline, after all work
        that has one); the TTS serves the smallest slack first when it has more work than CPU."""
        ...


async def within(aw: Awaitable[T], seconds: float, what: str) -> T:
    """Await ``aw`` for at most ``seconds``; DeadlineExceeded (naming ``what``) after that."""
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        raise DeadlineExceeded(f"{what} did not answer within {seconds:g} s") from None


async def deadline_stream(stream: AsyncIterator[T], first_s: float, stall_s: float,
                          what: str) -> AsyncIterator[T]:
    """Items of ``stream``; DeadlineExceeded if the first takes over ``first_s`` or any later
    one over ``stall_s``. The stream is closed on every way out (end, error, cancel)."""
    started = False
    try:
        while True:
            limit = stall_s if started else first_s
            try:
                async with asyncio.timeout(limit):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{what} {'stalled' if started else 'did not start'} within {limit:g} s") from None
            started = True
            yield item
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):  # "already running": it is closing itself
                await aclose()

"""The TTS stream the conversation drives: LLM text deltas in, audio pieces out, in order.

Text is cut into clause-sized chunks by ``TextChunker``. Up to ``lookahead`` chunks are asked of
the synthesizer at once: chunk n+1 is already waiting in the TTS stage's queue (with its own
deadline) while chunk n is synthesized, so a busy TTS hands its next free slot to the caller who
needs it, not to whoever happened to ask in the gap between two chunks. Audio comes out in
order through a bounded queue (run-ahead).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.chunking import ChunkerConfig, TextChunker
from services.conversation.aio import cancel_and_wait
from services.errors import FailedPrecondition, ResourceExhausted


@dataclass(frozen=True)
class SynthesizedAudio:
    """One piece of a TTSStream's output."""

    pcm: np.ndarray | bytes
    """Mono float32 samples in [-1, 1] (local voice) or PCM16 bytes (a remote TTS stage)."""
    sample_rate: int
    """Samples per second of ``pcm`` (the voice's rate)."""
    text: str
    """The text chunk this audio speaks (the same for every piece of one chunk)."""
    is_first_in_segment: bool
    """True for the first audio of a segment (stream start, or the first after ``flush``)."""
    chunk_index: int = 0
    """Index of the text chunk in the stream, from 0."""
    is_last_in_chunk: bool = True
    """True for the last audio piece of its text chunk (the chunk's text is then fully spoken)."""

    @property
    def duration_s(self) -> float:
        samples = len(self.pcm) // 2 if isinstance(self.pcm, bytes) else self.pcm.size
        return samples / self.sample_rate


_DONE = object()


#: Synthesis of one text chunk: audio pieces (float32 arrays or PCM16 bytes), streamed.
Synthesize = Callable[[str], AsyncIterator[Any]]


class TTSStream:
    """Streaming text in, audio out: push LLM deltas, iterate ``SynthesizedAudio`` in order.

    Text is cut into chunks by ``TextChunker``; chunk n+1 is synthesized while chunk n's audio
    waits in a bounded queue for the consumer (run-ahead). ``end_input`` lets iteration finish
    after the last chunk; ``aclose`` cancels everything pending. ``synthesize`` is any per-chunk
    synthesis: a local voice (``PiperTTS.synthesize``) or a remote TTS stage (the conversation).
    """

    def __init__(self, synthesize: Synthesize, *, sample_rate: int, chunker: ChunkerConfig | None = None,
                 audio_queue: int = 4, max_pending_chunks: int = 64,
                 buffer_ms: Callable[[], float | None] | None = None, lookahead: int = 2,
                 cut_lead_ms: float = 0.0) -> None:
        """``buffer_ms``: the listener's audio in hand now (None: unknown); it sizes the chunks
        (``ChunkerConfig.adaptive``). ``lookahead``: chunks being synthesized at once (1 = one
        after the other). ``cut_lead_ms``: with nothing being synthesized and less audio than this
        in hand, the complete words pushed so far are spoken at once (``TextChunker.cut``; 0: off)."""
        if lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        self._lookahead = lookahead
        self._synthesize = synthesize
        self._rate = sample_rate
        self._max_pending = max_pending_chunks
        self._chunker = TextChunker(chunker or ChunkerConfig(), buffer_ms)
        self._buffer_ms = buffer_ms
        self._cut_lead_ms = cut_lead_ms
        self._pending: collections.deque[tuple[str, bool, int]] = collections.deque()
        # Each chunk in flight: its synthesis task, the pieces it made so far (None ends them),
        # its text, whether it starts a segment, and its index.
        self._flight: collections.deque[tuple[asyncio.Task[None], asyncio.Queue[Any], str, bool, int]] = \
            collections.deque()
        self._wake = asyncio.Event()
        self._out: asyncio.Queue[Any] = asyncio.Queue(maxsize=audio_queue)
        self._new_segment = True
        self._chunks = 0
        self._ended = False
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tts-stream")

    @property
    def sample_rate(self) -> int:
        return self._rate

    def push_text(self, delta: str) -> None:
        """Add a text delta (any size, may end mid-word)."""
        self._check_open()
        self._enqueue(self._chunker.push(delta))
        if self._cut_lead_ms > 0 and not self._pending and not self._flight and self._buffer_ms is not None:
            # Nothing on its way to the listener and little left to play: a slow word (many
            # tokens) must not hold back the words before it while the buffer runs dry.
            buffer = self._buffer_ms()
            if buffer is not None and buffer < self._cut_lead_ms:
                self._enqueue(self._chunker.cut())

    def flush(self) -> None:
        """Speak everything pushed so far; the next text starts a new segment."""
        self._check_open()
        self._enqueue(self._chunker.flush())
        self._new_segment = True

    def end_input(self) -> None:
        """No more text: flush, and let iteration stop after the last audio."""
        if self._ended:
            return
        self.flush()
        self._ended = True
        self._wake.set()

    async def aclose(self) -> None:
        """Cancel pending text and any synthesis in progress."""
        self._closed = True
        self._ended = True
        self._pending.clear()
        try:
            # the caller's own cancel while waiting goes through (no suppress around the await)
            await cancel_and_wait(self._task)
        finally:
            # Wake a consumer blocked in __anext__: drop undelivered audio, leave the end marker.
            while not self._out.empty():
                self._out.get_nowait()
            self._out.put_nowait(_DONE)

    async def __aenter__(self) -> TTSStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> TTSStream:
        return self

    async def __anext__(self) -> SynthesizedAudio:
        if self._closed:
            raise StopAsyncIteration
        item = await self._out.get()
        if item is _DONE:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def _check_open(self) -> None:
        if self._ended:
            raise FailedPrecondition("text pushed to a TTS stream after end_input() or aclose()")

    def _enqueue(self, chunks: list[str]) -> None:
        if not chunks:
            return
        if len(self._pending) + len(chunks) > self._max_pending:
            raise ResourceExhausted(
                f"TTS stream has more than {self._max_pending} text chunks "
                "waiting; the consumer is not reading audio fast enough"
            )
        for text in chunks:
            self._pending.append((text, self._new_segment, self._chunks))
            self._new_segment = False
            self._chunks += 1
        self._start_ready()  # at once, even while the loop waits for audio or hands it over
        self._wake.set()

    async def _run(self) -> None:
        carry_first = False
        flight = self._flight
        try:
            while True:
                if not flight:
                    if self._ended:
                        await self._out.put(_DONE)
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                task, pieces, text, first, index = flight[0]
                first = first or carry_first
                prev: Any = None
                # Hold back one piece so the last piece of the chunk can be marked as such.
                while (pcm := await pieces.get()) is not None:
                    if prev is not None:
                        await self._out.put(self._piece(prev, text, first, index, False))
                        first = False
                    prev = pcm
                flight.popleft()
                task.result()  # a failed synthesis fails the stream
                self._start_ready()  # a place in flight is free
                if prev is not None:
                    await self._out.put(self._piece(prev, text, first, index, True))
                    first = False
                # A chunk with nothing to say ("...") passes its segment start to the next one.
                carry_first = first
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._out.put(exc)
        finally:
            for task, *_ in flight:
                task.cancel()
            await asyncio.gather(*(task for task, *_ in flight), return_exceptions=True)
            flight.clear()

    def _start_ready(self) -> None:
        """Start synthesis of waiting chunks while fewer than ``lookahead`` are in flight."""
        while len(self._flight) < self._lookahead and self._pending:
            text, first, index = self._pending.popleft()
            pieces: asyncio.Queue[Any] = asyncio.Queue()  # bounded by the chunk's sentences
            task = asyncio.get_running_loop().create_task(self._synthesize_chunk(text, pieces))
            self._flight.append((task, pieces, text, first, index))

    async def _synthesize_chunk(self, text: str, pieces: asyncio.Queue[Any]) -> None:
        try:
            async with contextlib.aclosing(self._synthesize(text)) as audio:  # type: ignore[type-var]
                async for pcm in audio:
                    pieces.put_nowait(pcm)
        finally:
            pieces.put_nowait(None)

    def _piece(
        self, pcm: np.ndarray | bytes, text: str, first: bool, index: int, last: bool
    ) -> SynthesizedAudio:
        return SynthesizedAudio(pcm, self._rate, text, first, index, last)

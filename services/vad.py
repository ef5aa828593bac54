"""Silero VAD (ONNX): the model and its cross-session batcher.

``SileroModel`` is stateless per call (the recurrent state travels in a small picklable
``VADState``), so one instance, or one Ray replica, serves many streams. Turning probabilities
into utterances is the conversation's job (``services/conversation/vad_stream.py``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.audio import MODEL_RATE
from services.batching import BatchStats
from services.errors import InvalidArgument, NotFound, Unavailable
from services.models import default_vad_model, resolve

#: Samples per model step at 16 kHz (32 ms); silero only accepts this size at 16 kHz.
WINDOW = 512
#: Samples of the previous window the model sees in front of each new one.
CONTEXT = 64
#: Shape of silero's recurrent state for one stream.
STATE_SHAPE = (2, 1, 128)


class VADConfig(BaseModel):
    """Voice activity detection settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="",
        description="Path to a silero VAD ONNX file; '' = embedded default.",
    )
    threshold: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Speech probability that starts speech.",
    )
    neg_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Probability below which speech ends; None = threshold - 0.15.",
    )
    min_silence_ms: int = Field(
        default=500, ge=0, le=10_000,
        description="Silence that ends an utterance.",
    )
    min_speech_ms: int = Field(
        default=200, ge=0, le=10_000,
        description="Shorter speech bursts are dropped.",
    )
    pre_roll_ms: int = Field(
        default=300, ge=0, le=2_000,
        description="Audio kept before the start trigger.",
    )
    max_utterance_s: float = Field(
        default=30.0, gt=0,
        description="An utterance is force-ended at this length (its audio, pre-roll included, "
                    "never exceeds it).",
    )
    num_threads: int = Field(default=1, ge=1, description="onnxruntime intra-op threads.")
    post_roll_ms: int = Field(
        default=200, ge=0, le=2_000,
        description="Audio kept after the detected end of speech (capped by min_silence_ms); "
                    "trailing consonants are often scored as silence.",
    )
    batch_tick_ms: float = Field(
        default=8.0, ge=0, le=50,
        description="Gateway: chunks of all sessions arriving within this many ms are scored in "
                    "one model call (VADBatcher); 0 = each chunk scored inline on its own.",
    )
    max_batch_streams: int = Field(
        default=64, ge=1, le=1024,
        description="Gateway: most streams scored in one batched model call.",
    )

    def effective_neg_threshold(self) -> float:
        if self.neg_threshold is not None:
            return min(self.neg_threshold, self.threshold)
        return max(self.threshold - 0.15, 0.01)


# --- model --------------------------------------------------------------------------------------


@dataclass
class VADState:
    """Everything one stream carries between ``SileroModel.probs`` calls (small, picklable)."""

    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    rnn: np.ndarray = field(default_factory=lambda: np.zeros(STATE_SHAPE, np.float32))
    leftover: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """Samples (< WINDOW) not yet scored; they lead the next call's audio."""


class SileroModel:
    """Silero VAD on onnxruntime (CPU). Thread-safe: sessions may run concurrently."""

    def __init__(self, path: str, num_threads: int = 1, cfg: VADConfig | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                path, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own non-exported exception types
            if "NO_SUCHFILE" in str(exc) or "does not exist" in str(exc):
                raise NotFound(f"silero VAD model not found: {path}") from exc
            raise InvalidArgument(f"cannot load {path} as a silero VAD ONNX model: {exc}") from exc
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise InvalidArgument(
                f"{path} does not look like silero VAD v5/v6 (inputs {sorted(names)}, "
                "expected input, state, sr)"
            )
        self.path = path
        self.cfg = cfg or VADConfig()
        self._sr = np.array(MODEL_RATE, dtype=np.int64)

    @classmethod
    def load(cls, cfg: VADConfig | None = None) -> SileroModel:
        cfg = cfg or VADConfig()
        return cls(resolve(cfg.model, default_vad_model), cfg.num_threads, cfg)

    def probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        """Speech probability of each whole 512-sample window of ``state.leftover + audio16k``.

        Returns one probability per window and the state to pass with the next chunk; samples
        that do not fill a window stay in the returned state's ``leftover``.
        """
        x = as_mono_f32(audio16k)
        joined = np.concatenate([state.leftover, x]) if state.leftover.size else x
        n = joined.size // WINDOW
        out = np.empty(n, np.float32)
        context, rnn = state.context, state.rnn
        for i in range(n):
            frame = np.concatenate([context, joined[i * WINDOW : (i + 1) * WINDOW]])[None, :]
            prob, rnn = self.session.run(None, {"input": frame, "state": rnn, "sr": self._sr})
            out[i] = prob[0, 0]
            context = frame[0, -CONTEXT:]
        return out, VADState(context.copy(), rnn, joined[n * WINDOW :].copy())

    async def score(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        """``probs`` as a ``VADScorer`` (inline: ~0.1 ms per window costs less than a thread hop)."""
        return self.probs(audio16k, state)

    def probs_many(
        self, items: list[tuple[np.ndarray, VADState]]
    ) -> list[tuple[np.ndarray, VADState]]:
        """``probs`` for many streams at once: one batched model step per window index.

        For a server that gathers chunks of many streams (``VADBatcher``); results equal
        separate ``probs`` calls (the model is float32 and scores each row on its own).
        """
        joined = []
        for audio, st in items:
            x = as_mono_f32(audio)
            joined.append(np.concatenate([st.leftover, x]) if st.leftover.size else x)
        counts = np.array([j.size // WINDOW for j in joined], np.int64)
        n = len(items)
        steps = int(counts.max(initial=0))
        # every stream's windows side by side, and its context and recurrent state as batch rows
        windows = np.zeros((n, steps, WINDOW), np.float32)
        for k, (j, c) in enumerate(zip(joined, counts, strict=True)):
            windows[k, :c] = j[: c * WINDOW].reshape(c, WINDOW)
        ctx = np.stack([st.context for _, st in items]) if n else np.zeros((0, CONTEXT), np.float32)
        rnn = (np.concatenate([st.rnn for _, st in items], axis=1) if n
               else np.zeros((STATE_SHAPE[0], 0, STATE_SHAPE[2]), np.float32))
        outs = np.zeros((n, steps), np.float32)
        for step in range(steps):
            live = np.flatnonzero(counts > step)
            every = live.size == n
            frame = windows[:, step] if every else windows[live, step]
            frames = np.concatenate([ctx if every else ctx[live], frame], axis=1)
            prob, new_state = self.session.run(
                None, {"input": frames, "state": rnn if every else rnn[:, live], "sr": self._sr}
            )
            outs[live, step] = prob[:, 0]
            rnn[:, live] = new_state
            ctx[live] = frame[:, -CONTEXT:]
        return [
            (outs[k, : counts[k]].copy(),
             VADState(ctx[k].copy(), rnn[:, k : k + 1].copy(), joined[k][counts[k] * WINDOW :].copy()))
            for k in range(n)
        ]


class VADBatcher:
    """Scores the chunks of every stream that asks within one tick (``batch_tick_ms``) with one
    ``probs_many`` call: one model run per window index for all of them, instead of one per
    stream and window.

    A ``VADScorer`` (``await batcher(audio, state)``); each stream must wait for its result
    before sending its next chunk (the state travels with the result). The batch runs on the
    event loop, like the per-stream calls it replaces: ~0.1 ms per window is less than a hop to
    a worker thread and back (through a thread, CPU per window went up at 8 streams).
    """

    def __init__(self, model: SileroModel, tick_ms: float | None = None,
                 max_streams: int | None = None) -> None:
        self.model = model
        self.tick_s = (model.cfg.batch_tick_ms if tick_ms is None else tick_ms) / 1000
        self.max_streams = max_streams or model.cfg.max_batch_streams
        self.stats = BatchStats()
        # chunks waiting for the tick, per event loop (one in a gateway; tests run several)
        self._waiting: dict[asyncio.AbstractEventLoop, list[_VADCall]] = {}
        self._closed = False

    async def score(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        """Speech probabilities of the whole windows of ``state.leftover + audio16k`` and the next
        state, as ``SileroModel.probs`` (batched with other streams' chunks)."""
        if self._closed:
            raise Unavailable("voice activity detection is closed")
        x = as_mono_f32(audio16k)  # a bad chunk fails its own call, not the whole batch
        if x.size + state.leftover.size < WINDOW:  # no whole window: nothing to score
            return np.zeros(0, np.float32), VADState(state.context, state.rnn,
                                                     np.concatenate([state.leftover, x]))
        loop = asyncio.get_running_loop()
        call = _VADCall(x, state, loop.create_future())
        calls = self._waiting.setdefault(loop, [])
        calls.append(call)
        if len(calls) >= self.max_streams:
            self._flush(loop, calls)
        elif len(calls) == 1:
            loop.call_later(self.tick_s, self._flush, loop, calls)
        return await call.result

    __call__ = score

    def _flush(self, loop: asyncio.AbstractEventLoop, calls: list[_VADCall]) -> None:
        if self._waiting.get(loop) is not calls:
            return  # scored already (the batch filled before its tick)
        del self._waiting[loop]
        live = [c for c in calls if not c.result.done()]  # a cancelled caller is skipped
        if not live:
            return
        try:
            results = self.model.probs_many([(c.audio, c.state) for c in live])
        except Exception as exc:  # e.g. the model failed: every caller of this tick hears it
            for c in live:
                c.result.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.sizes[len(live)] += 1
        for c, r in zip(live, results, strict=True):
            c.result.set_result(r)

    def close(self) -> None:
        """Refuse new chunks; chunks waiting for their tick fail with Unavailable (call from the
        event loop, or once it has stopped)."""
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for calls in waiting.values():
            for c in calls:
                if not c.result.done():
                    c.result.set_exception(Unavailable("voice activity detection is closed"))


@dataclass
class _VADCall:
    audio: np.ndarray
    state: VADState
    result: asyncio.Future[tuple[np.ndarray, VADState]]


def as_mono_f32(audio: np.ndarray) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidArgument(f"expected mono 16 kHz audio (1-D array); got shape {x.shape}")
    return x

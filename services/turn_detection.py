"""Semantic end of turn: has the user finished, or only paused?

``SmartTurnModel`` runs Smart Turn v3.2 (Pipecat's open model, BSD-2; an 8.7 MB ONNX Whisper-tiny
encoder with a classifier head) on the last 8 s of a turn's audio and returns the probability
that the turn is complete. It hears intonation and filler sounds ("um"), but not grammar: on
Piper speech it scored "What is the capital of" complete (0.94). The text half of the decision
(``transcript_looks_incomplete``) is the conversation's (``services/conversation/policies.py``),
which combines both with a longer fallback silence.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.audio import MODEL_RATE
from services.batching import MicroBatcher, Priority
from services.errors import InvalidArgument, NotFound, Unavailable
from services.models import default_turn_model

#: The model hears the last 8 s of the turn, left-padded with zeros when shorter.
WINDOW_S = 8
WINDOW = WINDOW_S * MODEL_RATE
N_MELS = 80
N_FRAMES = 800  # 10 ms hop over 8 s


class TurnDetectorConfig(BaseModel):
    """End-of-turn model settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="", description="Smart Turn ONNX file; '' = embedded Smart Turn v3.2 (CPU)."
    )
    threshold: float = Field(
        default=0.5, gt=0, lt=1,
        description="Probability above which the turn counts as complete.",
    )
    num_threads: int = Field(
        default=1, ge=1, le=16,
        description="ONNX Runtime threads per call (one keeps the other core for the LLM).",
    )
    max_batch: int = Field(
        default=1, ge=1, le=256,
        description="Most turns of different sessions scored in one ONNX call. The model takes a "
                    "batch, but on CPU a batch costs as much per turn as single calls and answers "
                    "later (scripts/bench_batching.py); it may help on a GPU.",
    )
    max_concurrent: int = Field(
        default=1, ge=1, le=16,
        description="Turns scored at once (one thread each); more uses more cores, which on a "
                    "small machine the LLM and ASR need.",
    )
    batch_wait_ms: float = Field(
        default=5.0, ge=0, le=100,
        description="With max_batch > 1: how long an idle detector waits for more turns to batch.",
    )


def check_turn_audio(audio16k: np.ndarray) -> np.ndarray:
    """``audio16k`` as float32, or InvalidArgument when it cannot be scored."""
    x = np.asarray(audio16k, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidArgument(f"expected mono 16 kHz audio (1-D array); got shape {x.shape}")
    if x.size == 0:
        raise InvalidArgument("cannot score an empty turn")
    if not np.isfinite(x[-WINDOW:]).all():
        raise InvalidArgument("audio contains NaN or infinite samples")
    return x


class SmartTurnModel:
    """One Smart Turn session shared by every conversation of a process (thread-safe: ONNX
    Runtime sessions accept concurrent ``run`` calls)."""

    def __init__(self, session: Any, cfg: TurnDetectorConfig, path: str) -> None:
        self.session = session
        self.cfg = cfg
        self.path = path
        self.name = "smart-turn-v3.2" if not cfg.model else f"smart-turn:{Path(path).name}"
        # turns of many sessions queue here (one thread) instead of crowding the CPU; a caller
        # that gives up (the user spoke again) takes its turn out of the queue
        self.batcher: MicroBatcher[np.ndarray, float] = MicroBatcher(
            lambda items, _: self.predict_many(items), max_batch=cfg.max_batch,
            max_wait_s=cfg.batch_wait_ms / 1000 if cfg.max_batch > 1 else 0.0,
            max_queued=64, workers=cfg.max_concurrent, name="the turn detector")
        self._closed = threading.Event()
        self.warm_up_s: float | None = None
        from faster_whisper.feature_extractor import FeatureExtractor

        # numpy Whisper log-mel; matches pipecat's own extractor within 3e-7 (tests check it)
        self._features = FeatureExtractor(feature_size=N_MELS, chunk_length=WINDOW_S)

    @classmethod
    def load(cls, cfg: TurnDetectorConfig | None = None) -> SmartTurnModel:
        cfg = cfg or TurnDetectorConfig()
        path = cfg.model and str(Path(cfg.model).expanduser())
        if not path:
            path = default_turn_model()
        elif not Path(path).is_file():
            raise NotFound(f"Smart Turn model file not found: {cfg.model} (give an .onnx file, or '' "
                           "for the embedded Smart Turn v3.2)")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InvalidArgument(f"cannot load the Smart Turn model {path}: {exc}") from exc
        inputs = {i.name: i.shape for i in session.get_inputs()}
        if list(inputs) != ["input_features"] or list(inputs["input_features"])[1:] != [N_MELS, N_FRAMES]:
            raise InvalidArgument(f"{path} is not a Smart Turn v3 model: its inputs are {inputs}, "
                                  f"expected input_features [batch, {N_MELS}, {N_FRAMES}]")
        return cls(session, cfg, path)

    def features(self, audio16k: np.ndarray) -> np.ndarray:
        """[80, 800] log-mel of the last 8 s, as the model was trained: the waveform is left-padded
        with zeros to 8 s, then normalised to zero mean and unit variance as a whole."""
        x = check_turn_audio(audio16k)[-WINDOW:]
        if x.size < WINDOW:
            x = np.concatenate([np.zeros(WINDOW - x.size, np.float32), x])
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        mel: np.ndarray = self._features(x, padding=0)
        return mel.astype(np.float32, copy=False)

    def predict(self, audio16k: np.ndarray) -> float:
        """Probability (0-1) that the turn ending with this audio is complete."""
        return self.predict_many([audio16k])[0]

    def predict_many(self, audios: list[np.ndarray]) -> list[float]:
        """One probability per turn, for many sessions at once; up to ``max_batch`` turns per
        ONNX call."""
        if self._closed.is_set():
            raise Unavailable("the turn detector is closed")
        if not audios:
            return []
        out: list[float] = []
        for start in range(0, len(audios), self.cfg.max_batch):
            batch = np.stack([self.features(a) for a in audios[start : start + self.cfg.max_batch]])
            probs = self.session.run(["logits"], {"input_features": batch})[0]  # already sigmoid
            out.extend(float(p) for p in np.asarray(probs).reshape(-1))
        return out

    def is_complete(self, probability: float) -> bool:
        return probability > self.cfg.threshold

    async def apredict(self, audio16k: np.ndarray,
                       priority: Priority | int = Priority.FINAL) -> float:
        """``predict`` in the detector's own thread (never on the event loop), batched with other
        sessions' turns up to ``max_batch``; cancelling the caller drops a turn still queued."""
        x = check_turn_audio(audio16k)  # a bad input fails its own call, not the whole batch
        return await self.batcher.submit(x[-WINDOW:], priority)

    def warm_up(self) -> float:
        """One call on a short tone so the first real turn does not pay for kernel set-up."""
        t = np.arange(MODEL_RATE) / MODEL_RATE
        t0 = time.perf_counter()
        self.predict((0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
        self.warm_up_s = time.perf_counter() - t0
        return self.warm_up_s

    def close(self) -> None:
        self._closed.set()
        self.batcher.close()

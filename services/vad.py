"""Silero VAD (ONNX) streaming detector.  (stub: the engines work fills this in)"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class VADConfig(BaseModel):
    """Voice activity detection settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="Path to a silero VAD ONNX file; '' = embedded default.")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Speech probability that starts speech.")
    neg_threshold: float | None = Field(None, ge=0.0, le=1.0, description="Probability below which speech ends; None = threshold - 0.15.")
    min_silence_ms: int = Field(500, ge=0, le=10_000, description="Silence that ends an utterance.")
    min_speech_ms: int = Field(200, ge=0, le=10_000, description="Shorter speech bursts are dropped.")
    pre_roll_ms: int = Field(300, ge=0, le=2_000, description="Audio kept before the start trigger.")
    max_utterance_s: float = Field(30.0, gt=0, description="An utterance is force-ended at this length.")
    num_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads.")

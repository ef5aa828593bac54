"""Piper TTS engine.  (stub: the engines work fills this in)"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TTSConfig(BaseModel):
    """Speech synthesis settings."""

    model_config = ConfigDict(extra="forbid")

    voice: str = Field("", description="Piper voice .onnx path (its .json beside it); '' = embedded joe voice.")
    length_scale: float = Field(1.0, gt=0, description="Speaking rate: >1 slower, <1 faster.")
    speaker_id: int | None = Field(None, description="Speaker for multi-speaker voices.")
    use_cuda: bool = Field(False, description="Run the ONNX voice on CUDA.")

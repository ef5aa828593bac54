"""faster-whisper ASR engine.  (stub: the engines work fills this in)"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ASRConfig(BaseModel):
    """Speech recognition settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="CTranslate2 Whisper folder or hub id; '' = embedded whisper base.")
    device: str = Field("cpu", description="'cpu', 'cuda' or 'auto'.")
    compute_type: str = Field("int8", description="CTranslate2 compute type (int8, float16, int8_float16...).")
    cpu_threads: int = Field(2, ge=0, description="CTranslate2 CPU threads (0 = library default).")
    beam_size: int = Field(1, ge=1, le=10, description="Beam width; 1 = greedy, fastest.")
    language: str | None = Field(None, description="Force a language (ISO 639-1); None = detect.")
    partial_interval_ms: int = Field(700, ge=100, description="Min time between partial re-decodes.")
    max_audio_s: float = Field(30.0, gt=0, description="Longest utterance accepted for one decode.")

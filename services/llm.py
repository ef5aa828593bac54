"""vLLM AsyncLLM engine.  (stub: the engines work fills this in)"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Answer in one or two short spoken sentences. "
    "Do not use lists, markdown or emojis."
)


class LLMConfig(BaseModel):
    """Language model settings (vLLM)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="HF folder or hub id of the text LLM; '' = embedded SmolLM2-135M.")
    max_model_len: int = Field(2048, ge=128, description="Context length (prompt + answer) in tokens.")
    kv_cache_gib: float = Field(0.25, gt=0, description="KV cache size on CPU (GiB); ignored on GPU.")
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1, description="Share of GPU memory vLLM may use (GPU only).")
    dtype: str = Field("bfloat16", description="Weights/activations dtype.")
    enforce_eager: bool = Field(True, description="Skip graph compilation (fast start; same speed on small CPU models).")
    max_tokens: int = Field(96, ge=1, le=4096, description="Default cap on answer tokens.")
    temperature: float = Field(0.3, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling.")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="Default system prompt.")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint.")

"""Which LLM engine serves a model, and the CTranslate2 copy of a model in the cache.

``llm.engine: auto`` picks CTranslate2 for text LLMs on machines without a GPU, and vLLM with a
GPU or for audio LLMs (speech-native turns need vLLM's multimodal inputs). The choice is logged
at start-up. CTranslate2 needs the model converted once: ``voxserve models prepare`` does it for
the embedded default and for ``--llm MODEL`` (the same local folder or hub id vLLM would take);
an engine that finds no converted copy converts it at start, into the same cache folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from pathlib import Path

from services.llm import ChatEngine, LLMConfig
from services.llm_ctranslate2 import CT2Engine, convert, is_ctranslate2_folder
from services.llm_vllm import LLMEngine
from services.models import EMBEDDED_LLMS, PrepareResult, cache_dir, resolve_llm
from services.tools import ToolSpec

log = logging.getLogger(__name__)

_STAMP = ".voxserve-ct2.json"


def has_gpu() -> bool:
    """A CUDA device is visible to torch (False where torch is missing)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_engine(cfg: LLMConfig, model: str) -> str:
    """'vllm' or 'ctranslate2' for ``model`` under ``cfg.engine`` (see the module doc)."""
    if cfg.engine != "auto":
        return cfg.engine
    if is_ctranslate2_folder(model):
        return "ctranslate2"
    from services.speech_llm import detect_audio_arch

    if detect_audio_arch(model) is not None:
        return "vllm"
    return "vllm" if has_gpu() else "ctranslate2"


def ct2_folder(source: str, quantization: str, cache: Path | None = None) -> Path:
    """Where the CTranslate2 copy of ``source`` lives in the cache (beside an embedded model's folder)."""
    cache = cache or cache_dir()
    embedded = {str(cache / folder) for folder, _ in EMBEDDED_LLMS.values()}
    if source in embedded:
        return Path(f"{source}-ct2-{quantization}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.strip("/"))[-48:]
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return cache / "ct2" / f"{slug}-{digest}-{quantization}"


def prepare_ct2(source: str, quantization: str = "int8", cache: Path | None = None) -> PrepareResult:
    """Convert ``source`` (HF folder or hub id) into the cache once; later calls find it."""
    out = ct2_folder(source, quantization, cache)
    stamp = out / _STAMP
    if is_ctranslate2_folder(str(out)) and stamp.is_file():
        return PrepareResult("llm-ct2", str(out), "already prepared")
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(source, out, quantization)
    stamp.write_text(json.dumps({"source": source, "quantization": quantization, "created": time.time()}))
    return PrepareResult("llm-ct2", str(out), "prepared", time.monotonic() - t0)


def create_llm_engine_sync(cfg: LLMConfig) -> ChatEngine:
    """Start the engine ``cfg`` asks for (blocks the calling thread while the model loads)."""
    model = resolve_llm(cfg.model)
    engine = choose_engine(cfg, model)
    log.info("LLM engine: %s for %s (llm.engine=%s)", engine, model, cfg.engine)
    if engine == "vllm":
        return LLMEngine.create_sync(cfg)
    folder = model if is_ctranslate2_folder(model) else prepare_ct2(model).path
    return CT2Engine.create_sync(cfg, folder)


def ct2_status(source: str) -> tuple[str, str, str]:
    """(name, state, path) of the CTranslate2 copy of ``source``, for `voxserve models list`."""
    out = ct2_folder(source, "int8")
    ready = is_ctranslate2_folder(str(out)) and (out / _STAMP).is_file()
    return "llm-ct2", "ready" if ready else "not prepared", str(out)


async def create_llm_engine(cfg: LLMConfig) -> ChatEngine:
    """``create_llm_engine_sync`` in a worker thread: the event loop keeps serving meanwhile."""
    return await asyncio.to_thread(create_llm_engine_sync, cfg)


class ToolEngine:
    """The engine of sessions that offer tools: ``llm.tool_model`` when it is another model than
    ``llm.model`` (the embedded SmolLM2 cannot call tools; the embedded Qwen can), loaded on
    first use or by ``load()`` at start; otherwise the main engine answers them too."""

    def __init__(self, cfg: LLMConfig | None) -> None:
        self.cfg = cfg
        self.engine: ChatEngine | None = None
        self._lock = asyncio.Lock()
        self._separate: bool | None = None

    @property
    def separate(self) -> bool:
        """A model of its own serves tool sessions (decided once: it looks at the model folders)."""
        if self._separate is None:
            cfg = self.cfg
            self._separate = cfg is not None and bool(cfg.tool_model) and \
                resolve_llm(cfg.tool_model) != resolve_llm(cfg.model)
        return self._separate

    def _config(self) -> LLMConfig:
        assert self.cfg is not None
        return self.cfg.model_copy(update={"model": self.cfg.tool_model})

    async def load(self) -> ChatEngine | None:
        """Start the tool model now (None if the main engine serves tool sessions)."""
        if not self.separate:
            return None
        async with self._lock:
            if self.engine is None:
                engine = await create_llm_engine(self._config())
                await asyncio.to_thread(engine.warm_tools)
                self.engine = engine
            return self.engine

    async def engine_for(self, main: ChatEngine, tools: list[ToolSpec] | None) -> ChatEngine:
        """``main`` for a turn without tools; the tool model for one with tools."""
        if not tools:
            return main
        return await self.load() or main

    def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()

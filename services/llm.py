"""The LLM engine interface for chat turns, streamed as text deltas, and what engines share.

``ChatEngine`` holds what every engine has: chat templating, history trimmed to the context by
tokens, token counting, request checks (the same errors whichever engine runs) and the record of
recent requests. ``ChatStream`` is one request's stream of deltas. Two engines implement it:
vLLM (``services/llm_vllm.py``: GPUs and audio LLMs) and CTranslate2
(``services/llm_ctranslate2.py``: text LLMs on CPUs); ``services/llm_engines.py`` picks one.

Cancellation: a ``ChatStream`` that is closed (``aclose()``, ``async with`` exit) or whose
consumer task is cancelled while it waits for the next delta aborts its request in the engine,
which frees its memory at once (barge-in, client disconnect). ``abort(request_id)`` does it from
outside.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    Unavailable,
)
from services.tools import (
    CALL_START,
    ConstrainedCallReader,
    ToolCallDelta,
    ToolCallReader,
    ToolChoice,
    ToolSpec,
    call_schema,
    check_tools,
    parse_calls,
)

if TYPE_CHECKING:
    from services.speech_llm import AudioArch

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Answer in one or two short spoken sentences. "
    "Do not use lists, markdown or emojis."
)

#: Finished or aborted requests an engine remembers (``ChatEngine.recent``).
RECENT_REQUESTS = 64
_ROLES = frozenset({"system", "user", "assistant", "tool"})


class LLMConfig(BaseModel):
    """Language model settings (vLLM on GPUs and for audio LLMs, CTranslate2 on CPUs)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="", description="HF folder or hub id of the text LLM (or a converted CTranslate2 folder); "
        "'' = embedded SmolLM2-135M; 'qwen2.5-coder-0.5b-instruct' = the larger embedded Qwen."
    )
    engine: Literal["auto", "vllm", "ctranslate2"] = Field(
        default="auto",
        description="Which engine serves the model: 'auto' = CTranslate2 for text LLMs on machines without a GPU, "
        "vLLM with a GPU or for audio LLMs.",
    )
    ct2_compute_type: str = Field(
        default="auto", description="CTranslate2 only: weights type ('auto' = int8 on CPU; int8_float32, float32)."
    )
    ct2_cached_prompts: int = Field(
        default=16, ge=0, le=1024,
        description="CTranslate2 only: distinct first messages (system prompt with its tools) whose KV cache is kept "
        "(each ~10-25 MB, kept for good); a session's turns then prefill only what follows it.")
    max_parallel: int = Field(
        default=8, ge=1, le=64,
        description="CTranslate2 only: answers generated at once (each on cpu_threads cores; more than the cores "
        "share them, so none waits for another's whole answer); more wait their turn.",
    )
    yield_lead_s: float = Field(
        default=3.0, ge=0, le=60,
        description="CTranslate2 only: an answer with more speech than this (s) written ahead of its playback "
        "waits between tokens while another answer is behind (0 = never waits).")
    urgent_lead_s: float = Field(
        default=1.0, ge=0, le=60,
        description="CTranslate2 only: an answer with less speech than this (s) ahead of its playback, or none "
        "written yet, is behind: answers over yield_lead_s wait for it.")
    speech_chars_per_s: float = Field(
        default=15.0, gt=0, le=100,
        description="Characters of answer text spoken per second (pacing's measure of how far text is ahead).")
    max_model_len: int = Field(
        default=2048, ge=128, description="Context length (prompt + answer) in tokens."
    )
    kv_cache_gib: float = Field(
        default=0.25, gt=0, description="vLLM only: KV cache size on CPU (GiB); ignored on GPU."
    )
    gpu_memory_utilization: float = Field(
        default=0.6, gt=0, le=1, description="Share of GPU memory vLLM may use (GPU only)."
    )
    dtype: str = Field(
        default="auto",
        description="vLLM only: weights/activations dtype; 'auto' = chosen from the CPU at start-up (bfloat16 "
        "only with AMX, else float32); on GPU the model's default.",
    )
    enforce_eager: bool = Field(
        default=True,
        description="vLLM only: skip graph compilation (fast start; same speed on small CPU models).",
    )
    max_tokens: int = Field(default=96, ge=1, le=4096, description="Default cap on answer tokens.")
    max_tool_call_tokens: int = Field(
        default=256, ge=16, le=4096, description="Least token cap of an answer that must be a tool call "
        "(tool_choice required or named): its arguments are never cut off by a short answer cap.")
    tool_prompt: str = Field(
        default="Call a function only when the request needs it, using the user's own words for its arguments. "
        "Greetings, thanks and questions no function answers get a short spoken answer.",
        description="Added to the system prompt when tools are offered ('' = nothing): on 33 typed requests the "
        "embedded Qwen 0.5B is right on 23 with it, 19 without, and calls a tool where none fits 2 times of 9, "
        "4 without.")
    tool_parser: str = Field(
        default="hermes",
        description="vLLM tool parser that reads the tool model's call format: hermes (<tool_call> JSON: Qwen 2.5, "
        "Hermes), llama3_json (Llama 3.1+), mistral, ... (any name vLLM registers); used for either engine.")
    tool_model: str = Field(
        default="qwen2.5-coder-0.5b-instruct",
        description="Model for sessions that offer tools, when it differs from ``model`` ('' = ``model``): "
        "the embedded SmolLM2 cannot call tools, the embedded Qwen can (same engine choice, same settings).")
    temperature: float = Field(default=0.3, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling.")
    system_prompt: str = Field(
        default=DEFAULT_SYSTEM_PROMPT,
        description="System prompt put first when a request's messages have none ('' = none).",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the checkpoint."
    )
    cpu_multiprocessing: bool = Field(
        default=False,
        description="CPU only: run the model in a separate worker process under vLLM's engine-core "
        "process (VLLM_ENABLE_V1_MULTIPROCESSING=1). Off keeps one engine-core process holding "
        "the model: less memory, same speed. The event loop is not affected either way.",
    )
    cpu_threads: int = Field(
        default=0,
        ge=0,
        description="CPU only: compute threads per answer. vLLM single-process mode: its engine process's "
        "OMP_NUM_THREADS, 0 = all usable cores but one (on 2 cores ~6x faster than both). CTranslate2: "
        "threads per generation, 0 = 1 (answers run in parallel instead).",
    )
    max_num_seqs: int = Field(
        default=16, ge=1, description="vLLM only: most requests generated together in one batch."
    )
    repetition_penalty: float = Field(
        default=1.1, gt=0, le=2,
        description="Penalty on tokens already in the prompt or answer (>1 discourages loops and parroting "
        "earlier answers, which small models fall into over a long conversation)."
    )
    frequency_penalty: float = Field(
        default=0.3, ge=-2, le=2, description="vLLM only: penalty growing with how often a token was already generated."
    )
    history_tokens: int = Field(
        default=768, ge=0,
        description="Most tokens of earlier turns put in a prompt (oldest dropped first): keeps prefill short "
        "and small models on topic.",
    )
    max_num_batched_tokens: int = Field(
        default=512, ge=64,
        description="vLLM only: tokens one engine step may prefill: longer prompts are prefilled in chunks "
        "between other requests' decode steps, so one long prompt cannot stall every session.",
    )
    delta_interval_ms: int = Field(
        default=100, ge=0,
        description="Where deltas cross a process boundary (Ray), they are joined into pieces at least this "
        "far apart after the first few words: fewer hops per answer (0 = one piece per token).",
    )
    delta_eager_words: int = Field(
        default=4, ge=0,
        description="Words sent token by token before pieces are joined: the first TTS chunk must not wait.",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="vLLM only: reuse the KV cache of prompt prefixes (system prompt and history shared by a "
        "session's turns); CTranslate2 keeps the configured system prompt's KV cache only.",
    )
    seed: int | None = Field(
        default=None, description="Sampling seed for reproducible answers; None = random."
    )
    max_audio_s: float = Field(
        default=30.0, gt=0, le=240,
        description="Audio LLMs only: longest user utterance taken as audio (speech-native mode).",
    )

    @model_validator(mode="after")
    def _pacing_marks(self) -> LLMConfig:
        if self.yield_lead_s > 0 and self.urgent_lead_s >= self.yield_lead_s:
            raise ValueError(f"llm.urgent_lead_s ({self.urgent_lead_s}) must be below llm.yield_lead_s "
                             f"({self.yield_lead_s}): an answer that waits must have more speech in hand than "
                             "one it waits for")
        return self


@dataclass
class GenerationStats:
    """Timing of one finished (or aborted) stream, measured in this process.

    ``ttft_s`` runs from the ``stream_chat`` call to the first non-empty delta; ``tokens_per_s``
    is end to end (generated tokens over ``total_s``), ``decode_tokens_per_s`` excludes the first
    token's latency.
    """

    request_id: str
    prompt_tokens: int
    tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    finish_reason: str | None = None  # "stop", "length", "abort" (cancelled), "error"
    audio_samples: int = 0  # speech-native: 16 kHz samples of the user's audio in the prompt
    finished_at: float = 0.0  # wall clock (time.time) when the stream ended
    yielded_s: float = 0.0  # time it waited for answers behind it (CTranslate2 pacing)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        if self.ttft_s is None or self.tokens < 2 or self.total_s <= self.ttft_s:
            return 0.0
        return (self.tokens - 1) / (self.total_s - self.ttft_s)


async def coalesce_deltas(stream: AsyncIterator[Any], interval_s: float, eager_words: int = 0,
                          clock: Callable[[], float] = time.monotonic) -> AsyncIterator[Any]:
    """Text deltas joined into pieces at least ``interval_s`` apart, except the first
    ``eager_words`` words, which pass one delta at a time (the first TTS chunk waits for them).

    A joined piece is sent when the next delta arrives late enough, or at the end: text is never
    held longer than one token interval past ``interval_s``. Other items (tool calls) pass at
    once, after the text before them.
    """
    pending, last, words = "", -1e18, 0
    async for delta in stream:
        if not isinstance(delta, str):
            if pending:
                yield pending
                pending = ""
            yield delta
            continue
        pending += delta
        now = clock()
        if words < eager_words or now - last >= interval_s:
            words += len(pending.split())
            yield pending
            pending, last = "", now
    if pending:
        yield pending


class _Result:
    """What a finished stream leaves behind; shared so the generator need not hold the stream
    (no reference cycle: a dropped, unclosed stream is finalized and aborted promptly)."""

    __slots__ = ("stats", "text")

    def __init__(self) -> None:
        self.stats: GenerationStats | None = None
        self.text = ""


class ChatStream:
    """Async iterator of text deltas for one request; ``stats`` is set once it ends.

    Use ``async with engine.stream_chat(...) as stream: async for delta in stream: ...`` (or call
    ``aclose()``) so that leaving early aborts the request deterministically; a task cancelled
    while awaiting the next delta aborts it too.
    """

    def __init__(self, start: Callable[[_Result], AsyncGenerator[str, None]], request_id: str,
                 prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._result = _Result()
        self._gen = start(self._result)

    @property
    def stats(self) -> GenerationStats | None:
        """Timing of the request once the stream has ended (finished, aborted or failed)."""
        return self._result.stats

    @property
    def text(self) -> str:
        """Concatenation of the deltas yielded so far."""
        return self._result.text

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


class ParsedStream(ChatStream):
    """A stream whose text is split into spoken text and tool calls (``services.tools``): items
    are ``str`` or ``ToolCallDelta``. Closing it closes (and aborts) the engine's stream."""

    def __init__(self, inner: ChatStream, items: Callable[[ChatStream], AsyncGenerator[Any, None]]) -> None:
        self.request_id = inner.request_id
        self.prompt_tokens = inner.prompt_tokens
        self._inner = inner
        self._result = inner._result
        self._gen = items(inner)

    async def __anext__(self) -> str | ToolCallDelta:  # type: ignore[override]
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            await self._inner.aclose()


class ChatEngine:
    """What every LLM engine shares: chat templating, history fitting, token counting, request
    checks and the record of recent requests. An engine adds how a prompt is generated
    (``_stream``), how a request is aborted, and shutdown."""

    #: The engine's name in ``llm.engine`` and in logs.
    name = ""

    def __init__(self, cfg: LLMConfig, model: str, tokenizer: Any, max_model_len: int,
                 audio_arch: AudioArch | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.audio_arch = audio_arch
        #: The latest requests, finished or aborted (operators: what happened to them, and why)
        self.recent: collections.deque[GenerationStats] = collections.deque(maxlen=RECENT_REQUESTS)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._closed = False
        self._markup: list[str] | None = None
        if not getattr(self.tokenizer, "chat_template", None):
            self.shutdown()
            raise FailedPrecondition(
                f"model {model} has no chat template in its tokenizer; use an instruct/chat "
                "checkpoint or add chat_template.jinja to its folder"
            )

    # --- what an engine implements -------------------------------------------------------------

    def num_unfinished_requests(self) -> int:
        """Requests still generating or queued; 0 once every stream ended or aborted."""
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        """Abort a request by the id its stream reports (no-op if it already finished)."""
        raise NotImplementedError

    def _stream(self, request_id: str, prompt: Any, prompt_tokens: int, max_tokens: int,
                temperature: float, guide: dict[str, Any] | None = None, words_only: bool = False) -> ChatStream:
        """A stream generating ``prompt`` (token ids, or an engine-specific audio prompt);
        ``guide``: a JSON schema the whole answer must match (constrained decoding);
        ``words_only``: no token that opens JSON or a tool call (an answer spoken after tool
        results, which small models otherwise echo as JSON)."""
        raise NotImplementedError

    def _audio_prompt(self, messages: list[dict[str, str]], audio: np.ndarray) -> tuple[Any, int]:
        raise FailedPrecondition(
            f"the {self.name} engine's model {self.model} takes no audio input; speech-native mode needs "
            "an audio LLM (Ultravox or Qwen2-Audio architecture) on vLLM")

    def pacing(self) -> dict[str, float]:
        """Answers that waited for one behind them, and for how long (engines that pace them)."""
        return {}

    def shutdown(self) -> None:
        """Stop the engine and free its model; it cannot be used afterwards."""
        self._closed = True

    # --- shared ---------------------------------------------------------------------------------

    def _finish(self, result: _Result, stats: GenerationStats, t0: float) -> None:
        """Close a stream's record: an unfinished one was aborted (cancelled, closed, dropped)."""
        if stats.finish_reason is None:
            stats.finish_reason = "abort"
        stats.total_s = time.monotonic() - t0
        stats.finished_at = time.time()
        result.stats = stats
        self.recent.append(stats)

    @property
    def supports_audio(self) -> bool:
        """True for an audio LLM (speech-native turns); text turns work either way."""
        return self.audio_arch is not None


    def prompt_ids(self, messages: list[dict[str, Any]], tools: Sequence[ToolSpec] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (+ answer prefix),
        with ``tools`` offered in the template's own way.

        A configured system prompt is put first when ``messages`` has none.
        """
        self._check_roles(messages)
        if messages[0]["role"] != "system" and self.cfg.system_prompt:
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        extra: dict[str, Any] = {"tools": [t.openai() for t in tools]} if tools else {}
        if tools and self.cfg.tool_prompt:
            if messages[0]["role"] == "system":
                messages = [{**messages[0], "content": f"{messages[0]['content']} {self.cfg.tool_prompt}".strip()},
                            *messages[1:]]
            else:
                messages = [{"role": "system", "content": self.cfg.tool_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **extra
        )
        # The template already writes the special tokens.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @staticmethod
    def _check_roles(messages: list[dict[str, Any]]) -> None:
        if not messages:
            raise InvalidArgument("messages is empty: send at least one user message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(
                m.get("content"), str
            ):
                raise InvalidArgument(
                    f"messages[{i}] must be {{'role': system|user|assistant|tool, 'content': str}}"
                )
            calls = m.get("tool_calls")
            if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
                raise InvalidArgument(
                    f"messages[{i}].tool_calls must be a list of {{'id', 'function': {{'name', 'arguments'}}}} "
                    "on an assistant message")

    def fit_messages(self, messages: list[dict[str, Any]], max_tokens: int,
                     tools: Sequence[ToolSpec] | None = None) -> list[dict[str, Any]]:
        """``messages`` with the oldest turns dropped until earlier turns take at most
        ``history_tokens`` and the prompt leaves room for an answer in ``max_model_len``.

        The system prompt, the newest user message and what follows it (tool calls, their results)
        are always kept (if they alone do not fit, ``stream_chat`` reports OUT_OF_RANGE); the kept
        window starts with a user message.
        """
        self._check_roles(messages)
        head = messages[:1] if messages[0]["role"] == "system" else []
        turns = list(messages[len(head):])
        room = self.max_model_len - min(max_tokens, max(1, self.max_model_len // 8))
        costs = [self.count_tokens(m["content"]) + 4 for m in turns]  # + role tags, roughly
        # the newest user message and what follows it (tool calls, results) are kept whole
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        keep = len(turns) - users[-1] if users else 1
        while len(turns) > keep:
            if sum(costs[:len(costs) - keep]) <= self.cfg.history_tokens and \
                    len(self.prompt_ids(head + turns, tools)) <= room:
                break
            turns.pop(0)
            costs.pop(0)
            while len(turns) > keep and turns[0]["role"] != "user":
                turns.pop(0)
                costs.pop(0)
        return head + turns

    def warm_tools(self) -> None:
        """Load what tool calls need (vLLM's parser, the grammar compiler) before the first
        call pays for it (blocks: run it in a thread)."""
        ToolCallReader(self.tokenizer, [], parser=self.cfg.tool_parser)
        self._warm_guide()

    def _warm_guide(self) -> None:
        """Engine-specific part of ``warm_tools`` (constrained decoding)."""

    def markup_tokens(self) -> list[str]:
        """Vocabulary entries that open JSON or a tool call ('{', ' {"', '<tool_call>', ...): what
        a ``words_only`` answer may not contain."""
        if self._markup is None:
            convert = self.tokenizer.convert_tokens_to_string
            self._markup = [t for t in self.tokenizer.get_vocab()
                            if convert([t]).lstrip().startswith(("{", "[{", "<tool"))]
        return self._markup

    def markup_token_ids(self) -> list[int]:
        """``markup_tokens`` as token ids."""
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(self.markup_tokens())]

    def count_tokens(self, text: str) -> int:
        """Token count of plain text (for ChatHistory budgets)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        request_id: str | None = None,
        audio: np.ndarray | None = None,
        tools: Sequence[ToolSpec] | None = None,
        tool_choice: ToolChoice | None = None,
        words_only: bool = False,
    ) -> ChatStream:
        """Start a chat completion; iterate the returned stream for text deltas.

        ``audio`` (float32, 16 kHz, mono) is the user's current turn for an audio LLM
        (speech-native mode): it goes to vLLM as multimodal input, with the architecture's
        placeholder put in the last user message. Text-only models reject it
        (FailedPrecondition).

        Validation happens here, before anything is queued: InvalidArgument for empty or
        malformed messages and bad sampling values, OutOfRange when the prompt leaves no room in
        ``max_model_len`` (trim the history first). ``max_tokens`` is clamped to what fits.

        ``tools`` (with ``tool_choice``, default auto) are offered to the model: the stream then
        yields ``ToolCallDelta`` items for its calls between the text deltas (see
        ``services.tools``). With required or a named function the answer is one call, decoded
        under its JSON schema; with none the tools are not offered. ``words_only`` (the answer
        after tool results): no token that opens JSON or a call, and greedy unless a
        ``temperature`` is given (the result is read out, not varied).
        """
        if self._closed:
            raise Unavailable("the LLM engine is shut down")
        explicit_temperature = temperature is not None
        max_tokens = self.cfg.max_tokens if max_tokens is None else max_tokens
        temperature = self.cfg.temperature if temperature is None else temperature
        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be at least 1, got {max_tokens}")
        if not 0 <= temperature <= 2:
            raise InvalidArgument(f"temperature must be within [0, 2], got {temperature}")
        choice = tool_choice or ToolChoice()
        offered = list(tools or []) if choice.mode != "none" else []
        if offered:
            if audio is not None:
                raise FailedPrecondition("tools are offered to text turns only (not in speech-native mode)")
            check_tools(offered, choice)
        prompt: Any
        prefix = ""
        if audio is None:
            prompt = self.prompt_ids(self.fit_messages(messages, max_tokens, offered), offered)
            if choice.constrained and self.cfg.tool_parser == "hermes":
                prefix = CALL_START + "\n"  # the answer is a call: its opening tag is written for the model
                prompt = prompt + list(self.tokenizer.encode(prefix, add_special_tokens=False))
            n_prompt = len(prompt)
        else:
            prompt, n_prompt = self._audio_prompt(messages, audio)
        room = self.max_model_len - n_prompt
        if room < 1:
            raise OutOfRange(
                f"the conversation is {n_prompt} tokens but the model's context holds "
                f"{self.max_model_len} (prompt + answer); drop older turns and retry"
            )
        rid, n = request_id or uuid.uuid4().hex, min(max_tokens, room)
        if not offered:
            if words_only and not explicit_temperature:
                temperature = 0.0
            return self._stream(rid, prompt, n_prompt, n, temperature, words_only=words_only)
        if choice.constrained:
            # a call is a few dozen tokens: an answer cap meant for speech must not cut it off
            n = min(max(n, self.cfg.max_tool_call_tokens), room)
        inner = self._stream(rid, prompt, n_prompt, n, temperature,
                             guide=call_schema(offered, choice) if choice.constrained else None)
        reader = ConstrainedCallReader() if choice.constrained else \
            ToolCallReader(self.tokenizer, offered, parser=self.cfg.tool_parser)
        return ParsedStream(inner, lambda stream: parse_calls(stream, reader))

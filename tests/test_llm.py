"""The LLM engines: real SmolLM2-135M through vLLM (CPU build here) and through CTranslate2 (int8).

Both engines run the same tests: one contract (streaming deltas, abort proven by the engine's
state, token counting, history trimmed to the context, the same errors)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.conversation.history import ChatHistory
from services.errors import InvalidArgument, NotFound, OutOfRange
from services.llm import ChatEngine, LLMConfig
from services.llm_ctranslate2 import CT2Engine
from services.llm_engines import choose_engine, create_llm_engine, prepare_ct2
from services.llm_vllm import LLMEngine, _cpu_env
from services.models import default_llm_model
from services.tools import ToolCallDelta, ToolChoice, ToolSpec, check_arguments

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parent.parent
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["vllm", "ctranslate2"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[ChatEngine]:
    tmp = ROOT / ".cache" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        # vLLM's engine process inherits these: its scratch files stay in the project cache.
        mp.setenv("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
        mp.setenv("TMPDIR", str(tmp))
        eng = await create_llm_engine(LLMConfig(engine=request.param, max_model_len=512, seed=0))
    assert eng.name == request.param
    yield eng
    eng.shutdown()


async def wait_idle(engine: ChatEngine, seconds: float = 5.0) -> int:
    """Poll until vLLM tracks no request (or time runs out); returns the last count."""
    for _ in range(int(seconds / 0.05)):
        if engine.num_unfinished_requests() == 0:
            return 0
        await asyncio.sleep(0.05)
    return engine.num_unfinished_requests()


async def test_factual_answer(engine: ChatEngine) -> None:
    async with engine.stream_chat(FRANCE, temperature=0) as stream:
        text = "".join([d async for d in stream])
    assert "Paris" in text
    assert stream.stats is not None
    assert stream.stats.finish_reason == "stop"
    assert stream.stats.tokens > 0 and stream.stats.ttft_s is not None
    assert stream.stats.prompt_tokens == stream.prompt_tokens > 0


async def test_deltas_concatenate_to_final_text(engine: ChatEngine) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    stream = engine.stream_chat(STORY, max_tokens=16, temperature=0)
    deltas = [d async for d in stream]
    stop.set()
    await task
    assert len(deltas) > 3
    assert all(deltas)
    assert "".join(deltas) == stream.text
    assert stream.stats is not None and stream.stats.finish_reason == "length"
    assert stream.stats.tokens == 16
    # generation runs in vLLM's engine process or CTranslate2's threads: this loop kept running
    assert ticks > len(deltas)


async def test_cancel_consumer_task_aborts_request(engine: ChatEngine) -> None:
    got_first = asyncio.Event()
    stream = engine.stream_chat(STORY, max_tokens=400)

    async def consume() -> None:
        async for _ in stream:
            got_first.set()

    task = asyncio.create_task(consume())
    await got_first.wait()
    assert engine.num_unfinished_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_idle(engine) == 0
    assert stream.stats is not None and stream.stats.finish_reason == "abort"
    assert stream.stats.tokens < 400
    # the engine still answers
    async with engine.stream_chat(FRANCE, temperature=0) as again:
        assert "Paris" in "".join([d async for d in again])


async def test_aclose_after_first_delta_aborts(engine: ChatEngine) -> None:
    async with engine.stream_chat(STORY, max_tokens=400) as stream:
        async for _ in stream:
            break
    assert await wait_idle(engine) == 0
    assert stream.stats is not None and stream.stats.finish_reason == "abort"


async def test_dropped_stream_is_aborted(engine: ChatEngine) -> None:
    stream = engine.stream_chat(STORY, max_tokens=400)
    await stream.__anext__()
    del stream  # no aclose: the asyncio generator finalizer must still abort it
    assert await wait_idle(engine) == 0


async def test_explicit_abort_by_request_id(engine: ChatEngine) -> None:
    stream = engine.stream_chat(STORY, max_tokens=400, request_id="abort-me")
    assert stream.request_id == "abort-me"
    seen: list[str] = []

    async def consume() -> None:
        async for d in stream:
            seen.append(d)
            if len(seen) == 1:
                await engine.abort("abort-me")

    await asyncio.wait_for(consume(), timeout=60)  # the stream ends instead of running on
    assert await wait_idle(engine) == 0
    assert stream.stats is not None and stream.stats.finish_reason == "abort"


async def test_two_concurrent_streams_complete(engine: ChatEngine) -> None:
    async def run(messages: list[dict[str, str]]) -> str:
        async with engine.stream_chat(messages, max_tokens=24, temperature=0) as s:
            out = "".join([d async for d in s])
        assert s.stats is not None and s.stats.finish_reason in ("stop", "length")
        return out

    a, b = await asyncio.gather(
        run(FRANCE), run([{"role": "user", "content": "Name a primary color."}])
    )
    assert "Paris" in a
    assert b.strip()
    assert await wait_idle(engine) == 0


async def test_bad_input(engine: ChatEngine) -> None:
    with pytest.raises(InvalidArgument):
        engine.stream_chat([])
    with pytest.raises(InvalidArgument):
        engine.stream_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(InvalidArgument):
        engine.stream_chat(FRANCE, max_tokens=0)
    with pytest.raises(InvalidArgument):
        engine.stream_chat(FRANCE, temperature=5)
    long = [{"role": "user", "content": "word " * 1000}]
    with pytest.raises(OutOfRange, match="context"):
        engine.stream_chat(long)
    assert engine.num_unfinished_requests() == 0


async def test_history_trimmed_to_context_fits(engine: ChatEngine) -> None:
    history = ChatHistory(engine.cfg.system_prompt)
    for i in range(40):
        history.add_user(f"Remember the number {i} and tell me something about it in detail.")
        history.add_assistant("Sure. " + "It is a fine number. " * 10)
    history.add_user("What is the capital of France?")
    messages = history.messages()
    fitted = engine.fit_messages(messages, 32)
    assert fitted[0]["role"] == "system" and fitted[1]["role"] == "user" and fitted[-1] == messages[-1]
    assert sum(engine.count_tokens(m["content"]) for m in fitted[1:-1]) <= engine.cfg.history_tokens
    assert fitted[1:] == messages[len(messages) - len(fitted) + 1:]  # the newest turns, in order
    # stream_chat trims by itself: the whole history is accepted (defect 4: trimmed by tokens)
    async with engine.stream_chat(messages, max_tokens=32, temperature=0) as s:
        assert "".join([d async for d in s])
        assert s.prompt_tokens <= engine.cfg.history_tokens + 200


async def test_missing_model_folder() -> None:
    with pytest.raises(NotFound):
        await LLMEngine.create(LLMConfig(model=os.path.join("/nonexistent", "model")))


def test_cpu_engine_leaves_a_core_free() -> None:
    cores = len(os.sched_getaffinity(0))
    assert _cpu_env(LLMConfig()) == {"OMP_NUM_THREADS": str(max(1, cores - 1))}
    assert _cpu_env(LLMConfig(cpu_threads=3)) == {"OMP_NUM_THREADS": "3"}
    assert _cpu_env(LLMConfig(cpu_multiprocessing=True)) == {}


async def test_deltas_are_joined_after_the_first_words() -> None:
    """Fewer Ray hops per answer: token deltas cross in timed pieces once the first words are out."""
    from services.llm import coalesce_deltas

    now = [0.0]

    async def tokens():  # type: ignore[no-untyped-def]
        for i, tok in enumerate(["The", " sky", " is", " blue", " and", " the", " sun", " is", " warm", "."]):
            now[0] = i * 0.02  # a token every 20 ms
            yield tok

    pieces = [p async for p in coalesce_deltas(tokens(), 0.1, eager_words=3, clock=lambda: now[0])]
    assert pieces[:3] == ["The", " sky", " is"]  # one by one until 3 words are out
    assert "".join(pieces) == "The sky is blue and the sun is warm."
    assert len(pieces) < 10 and all(len(p.split()) >= 1 for p in pieces)
    passthrough = [p async for p in coalesce_deltas(tokens(), 0.0, clock=lambda: now[0])]
    assert len(passthrough) == 10


async def test_audio_goes_to_vllm_only(engine: ChatEngine) -> None:
    import numpy as np

    from services.errors import FailedPrecondition

    # an earlier test's cancelled generation may still be stopping in its thread: compare with it
    before = engine.num_unfinished_requests()
    with pytest.raises(FailedPrecondition, match="audio"):
        engine.stream_chat(FRANCE, audio=np.zeros(16000, np.float32))
    assert engine.num_unfinished_requests() <= before  # the refused call started nothing


def test_auto_engine_is_ctranslate2_for_text_llms_without_a_gpu(tmp_path: Path) -> None:
    import json

    text_model = default_llm_model()
    assert choose_engine(LLMConfig(), text_model) == "ctranslate2"  # no GPU on these machines
    assert choose_engine(LLMConfig(engine="vllm"), text_model) == "vllm"
    audio_model = tmp_path / "ultravox"
    audio_model.mkdir()
    (audio_model / "config.json").write_text(json.dumps({"model_type": "ultravox"}))
    assert choose_engine(LLMConfig(), str(audio_model)) == "vllm"  # speech-native needs vLLM
    converted = prepare_ct2(text_model)
    assert choose_engine(LLMConfig(), converted.path) == "ctranslate2"


def test_ctranslate2_conversion_is_done_once() -> None:
    first = prepare_ct2(default_llm_model())
    again = prepare_ct2(default_llm_model())
    assert again.action == "already prepared" and again.path == first.path
    engine = CT2Engine.create_sync(LLMConfig(), again.path)
    try:
        assert engine.name == "ctranslate2" and engine.num_unfinished_requests() == 0
    finally:
        engine.shutdown()  # a CTranslate2 model left to interpreter exit aborts the process


async def test_the_larger_embedded_model_answers_on_the_cpu_engine() -> None:
    """llm.model names the embedded Qwen2.5-Coder-0.5B-Instruct (prepared by the bootstrap)."""
    engine = await create_llm_engine(LLMConfig(model="qwen2.5-coder-0.5b-instruct", seed=0))
    try:
        assert engine.name == "ctranslate2" and engine.model.endswith("qwen2.5-coder-0.5b-instruct-ct2-int8")
        async with engine.stream_chat(FRANCE, temperature=0) as stream:
            assert "Paris" in "".join([d async for d in stream])
        assert stream.stats is not None and stream.stats.finish_reason == "stop"
    finally:
        engine.shutdown()


async def test_a_consumer_that_stops_reading_still_gets_the_whole_answer(engine: ChatEngine) -> None:
    """A paused or held answer stops reading for a while; generation runs ahead (CTranslate2: up to
    its handoff bound) and the answer must still end, not hang waiting for a lost end marker."""
    async with engine.stream_chat(STORY, max_tokens=100, temperature=0) as stream:
        first = await stream.__anext__()
        await asyncio.sleep(2.0)  # ~100 tokens' time at this model's speed: the thread waits for room
        rest = await asyncio.wait_for(_drain(stream), timeout=60)
    assert first and rest
    assert stream.stats is not None and stream.stats.finish_reason == "length" and stream.stats.tokens == 100
    assert await wait_idle(engine) == 0


async def test_abort_while_the_consumer_is_not_reading(engine: ChatEngine) -> None:
    if engine.name != "ctranslate2":
        pytest.skip("vLLM's abort of an unread request is covered by test_explicit_abort_by_request_id")
    stream = engine.stream_chat(STORY, max_tokens=400, request_id="slow-reader")
    await stream.__anext__()
    await asyncio.sleep(1.5)  # the worker thread now waits for room in the handoff
    await engine.abort("slow-reader")
    await asyncio.wait_for(_drain(stream), timeout=30)  # ends instead of hanging
    assert stream.stats is not None and stream.stats.finish_reason == "abort"
    assert await wait_idle(engine) == 0


async def _drain(stream: Any) -> str:
    return "".join([d async for d in stream])


# --- tools -----------------------------------------------------------------------------------------

WEATHER = ToolSpec(name="get_weather", description="Current weather in a city",
                   parameters={"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False})
CONVERT = ToolSpec(name="convert_units", description="Convert a value from one unit to another",
                   parameters={"type": "object", "properties": {
                       "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
                       "required": ["value", "from_unit", "to_unit"], "additionalProperties": False})


async def _items(engine: ChatEngine, text: str, tools: list[ToolSpec], choice: ToolChoice | None = None,
                 messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> tuple[str, list[ToolCallDelta]]:
    async with engine.stream_chat(messages or [{"role": "user", "content": text}], temperature=0, tools=tools,
                                  tool_choice=choice, **kwargs) as stream:
        items = [d async for d in stream]
    return "".join(i for i in items if isinstance(i, str)), [i for i in items if not isinstance(i, str) and i.done]


async def test_a_required_call_matches_its_schema_on_either_engine(engine: ChatEngine) -> None:
    """Constrained decoding (vLLM's structured outputs; xgrammar around CTranslate2): even the
    135M model, whose template does not show it the tools, writes arguments that parse and match,
    past a short answer cap. (Strings are bounded: an unbounded string lets a model this small
    ramble inside the quotes until the cap.)"""
    bounded = [ToolSpec(name=t.name, description=t.description, parameters={
        **t.parameters, "properties": {k: {**v, "maxLength": 24} if v["type"] == "string" else v
                                       for k, v in t.parameters["properties"].items()}}) for t in (WEATHER, CONVERT)]
    for question in ("What is the weather like in Paris?", "Convert 3 miles to kilometers.", "Hello!"):
        text, calls = await _items(engine, question, bounded, ToolChoice("required"), max_tokens=8)
        assert not text.strip() and len(calls) == 1, (text, calls)
        tool = {t.name: t for t in bounded}[calls[0].name]
        check_arguments(tool, calls[0].arguments)
    assert await wait_idle(engine) == 0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tool_engine() -> AsyncIterator[ChatEngine]:
    """The default tool model (``llm.tool_model``): the embedded Qwen on CTranslate2."""
    eng = await create_llm_engine(LLMConfig(model=LLMConfig().tool_model, seed=0))
    yield eng
    eng.shutdown()


async def test_the_tool_model_calls_a_tool_in_its_own_format_and_answers_otherwise(tool_engine: ChatEngine) -> None:
    text, calls = await _items(tool_engine, "What is the weather like in Paris?", [WEATHER, CONVERT])
    assert not text.strip() and [c.name for c in calls] == ["get_weather"]
    assert "paris" in json.loads(calls[0].arguments)["city"].lower()
    text, calls = await _items(tool_engine, "How many kilometers are 10 miles?", [WEATHER, CONVERT])
    assert [c.name for c in calls] == ["convert_units"] and json.loads(calls[0].arguments)["value"] == 10
    text, calls = await _items(tool_engine, "Hello!", [WEATHER, CONVERT])
    assert text.strip() and not calls


async def test_required_calls_are_schema_valid_ten_of_ten(tool_engine: ChatEngine) -> None:
    asks = ["Weather in Oslo?", "Is it raining in Lima?", "Convert 5 feet to meters.", "Tell me a joke.",
            "How warm is Cairo today?", "Turn 100 fahrenheit into celsius.", "What's up?",
            "Do I need an umbrella in London?", "Convert 2 pounds to kilograms.", "Good morning!"]
    for ask in asks:
        text, calls = await _items(tool_engine, ask, [WEATHER, CONVERT], ToolChoice("required"))
        assert len(calls) == 1 and not text.strip(), (ask, text, calls)
        check_arguments({"get_weather": WEATHER, "convert_units": CONVERT}[calls[0].name], calls[0].arguments)


async def test_the_grammar_corrects_arguments_the_model_gets_wrong(tool_engine: ChatEngine) -> None:
    """A pattern the model does not follow by itself ('Paris' against ^[A-Z]+$): the refused
    tokens are masked and the arguments match anyway."""
    shout = ToolSpec(name="shout_city", description="Say a city's name",
                     parameters={"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z]+$"}},
                                 "required": ["city"]})
    assert isinstance(tool_engine, CT2Engine)
    before = tool_engine._guides.masked_steps
    _, calls = await _items(tool_engine, "Shout Paris", [shout], ToolChoice("function", "shout_city"))
    assert json.loads(calls[0].arguments)["city"].isupper()
    assert tool_engine._guides.masked_steps > before


async def test_a_cancelled_tool_call_aborts_the_generation(tool_engine: ChatEngine) -> None:
    stream = tool_engine.stream_chat([{"role": "user", "content": "Weather in Paris and Rome and Oslo?"}],
                                     tools=[WEATHER], tool_choice=ToolChoice("required"))
    await stream.__anext__()
    await stream.aclose()
    assert await wait_idle(tool_engine) == 0


async def test_the_answer_after_a_result_is_words_not_json(tool_engine: ChatEngine) -> None:
    """After a tool result the model answers without tools offered (tool_choice none, words_only):
    no token that opens JSON or a call is allowed (small models echo the call and the result otherwise)."""
    messages = [{"role": "user", "content": "What's the weather like in Madrid?"},
                {"role": "assistant", "content": "", "tool_calls": [{
                    "id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Madrid"}}}]},
                {"role": "tool", "content": '{"city": "Madrid", "sky": "partly cloudy", "temperature_celsius": 18}',
                 "tool_call_id": "c1"}]
    text, calls = await _items(tool_engine, "", [WEATHER], ToolChoice("none"), messages=messages, words_only=True)
    assert not calls and "{" not in text and "18" in text, text

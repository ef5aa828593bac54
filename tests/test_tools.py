"""Function tools: the definitions, the model's call format, and the conversation's rules on fake
stages (call, result, continue; parallel calls; filler; barge-in, late result, timeout, unknown id,
invalid arguments; the history). The real models and the protocols are tested in test_llm.py,
test_realtime_graph.py and test_grpc.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from services.conversation import events as ev
from services.conversation.history import ChatHistory, ToolCallRecord
from services.conversation.settings import SessionSettings, ToolCalling
from services.errors import FailedPrecondition, InvalidArgument, NotFound
from services.tools import ToolCallReader, ToolChoice, ToolSpec, call_schema, check_arguments, check_tools
from tests.fakes import FakeStages, call, silence
from tests.test_conversation import Harness, question

WEATHER = ToolSpec(name="get_weather", description="Current weather in a city",
                   parameters={"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False})
CLOCK = ToolSpec(name="get_time", description="The time now", parameters={"type": "object", "properties": {}})


class ToolHarness(Harness):
    """The conversation harness, counting tool outcomes too."""

    def tool_call(self, outcome: str, seconds: float | None = None) -> None:
        self._count(f"tool_{outcome}")


def harness(stages: FakeStages, **tool_calling: Any) -> ToolHarness:
    tool_calling.setdefault("filler_after_ms", 150)
    return ToolHarness(stages, tools=[WEATHER, CLOCK], tool_calling=ToolCalling(**tool_calling))


def roles(h: Harness) -> list[str]:
    return [m["role"] for m in h.conv.history.messages() if m["role"] != "system"]


# --- definitions ---------------------------------------------------------------------------------------


def test_tool_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="name"):
        ToolSpec(name="get weather")
    with pytest.raises(ValueError, match="JSON schema"):
        ToolSpec(name="f", parameters={"type": "object", "properties": {"x": {"type": "nope"}}})
    with pytest.raises(ValueError, match="object"):
        ToolSpec(name="f", parameters={"type": "string"})
    with pytest.raises(ValueError, match="points nowhere"):
        ToolSpec(name="f", parameters={"type": "object", "properties": {"x": {"$ref": "#/nope"}}})
    with pytest.raises(ValueError, match="inside themselves"):
        ToolSpec(name="f", parameters={"type": "object", "properties": {"x": {"$ref": "https://e.com/s"}}})
    with pytest.raises(ValueError, match="keyword"):
        ToolSpec(name="required")
    local = ToolSpec(name="f", parameters={"type": "object", "$defs": {"c": {"type": "string"}},
                                           "properties": {"x": {"$ref": "#/$defs/c"}}})
    assert check_arguments(local, '{"x": "a"}') == {"x": "a"}
    with pytest.raises(InvalidArgument, match="schema"):
        check_arguments(local, '{"x": 1}')
    with pytest.raises(InvalidArgument, match="unique"):
        check_tools([WEATHER, WEATHER], ToolChoice())
    with pytest.raises(InvalidArgument, match="not among"):
        check_tools([WEATHER], ToolChoice.parse({"type": "function", "name": "nope"}))
    with pytest.raises(InvalidArgument, match="needs at least one tool"):
        check_tools([], ToolChoice("required"))
    with pytest.raises(InvalidArgument, match="tool_choice"):
        ToolChoice.parse(42)
    assert ToolChoice.parse({"type": "function", "function": {"name": "get_weather"}}) == \
        ToolChoice("function", "get_weather")
    with pytest.raises(ValueError, match="not among"):
        SessionSettings(tools=[WEATHER], tool_choice={"type": "function", "name": "get_time"})


def test_arguments_are_checked_against_the_schema() -> None:
    assert check_arguments(WEATHER, '{"city": "Paris"}') == {"city": "Paris"}
    with pytest.raises(InvalidArgument, match="not JSON"):
        check_arguments(WEATHER, '{"city": "Par')
    with pytest.raises(InvalidArgument, match="city"):
        check_arguments(WEATHER, "{}")
    with pytest.raises(InvalidArgument, match="schema"):
        check_arguments(WEATHER, '{"city": 3}')
    schema = call_schema([WEATHER, CLOCK], ToolChoice("function", "get_weather"))
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert len(call_schema([WEATHER, CLOCK], ToolChoice("required"))["anyOf"]) == 2


def _read(reader: ToolCallReader, text: str, step: int = 3) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(text), step):
        out += reader.feed(text[i:i + step])
    return out + reader.finish()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from services.models import default_llm_model

    return AutoTokenizer.from_pretrained(default_llm_model())


def test_the_models_own_call_format_is_parsed_as_it_streams(tokenizer: Any) -> None:
    """vLLM's Hermes parser, for either engine: tagged calls, bare JSON calls (small models write
    those), text before a call, parallel calls; the argument pieces add up to the done item's."""
    tagged = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    items = _read(ToolCallReader(tokenizer, [WEATHER]), tagged)
    text = "".join(i for i in items if isinstance(i, str))
    assert text.strip() == "Let me check."
    done = [i for i in items if not isinstance(i, str) and i.done]
    assert [(d.name, json.loads(d.arguments)) for d in done] == [("get_weather", {"city": "Paris"})]
    pieces = "".join(i.arguments_delta for i in items if not isinstance(i, str))
    assert pieces == done[0].arguments
    bare = _read(ToolCallReader(tokenizer, [WEATHER]), '{"name": "get_weather", "arguments": {"city": "Rome"}}')
    assert not any(isinstance(i, str) for i in bare)
    assert [i.arguments for i in bare if i.done] == ['{"city": "Rome"}']
    two = _read(ToolCallReader(tokenizer, [WEATHER]), "".join(
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>\n'
        for c in ("Oslo", "Lima")), step=5)
    assert [(i.index, i.arguments) for i in two if not isinstance(i, str) and i.done] == \
        [(0, '{"city": "Oslo"}'), (1, '{"city": "Lima"}')]
    plain = _read(ToolCallReader(tokenizer, [WEATHER]), "It is sunny in Paris today.")
    assert "".join(plain) == "It is sunny in Paris today."
    not_a_call = _read(ToolCallReader(tokenizer, [WEATHER]), '{"sky": "sunny"}', step=2)
    assert "".join(i for i in not_a_call if isinstance(i, str)) == '{"sky": "sunny"}'
    spaced = _read(ToolCallReader(tokenizer, [WEATHER]), ' { "name" : "get_weather", "arguments": {"city": "Rome"}}', 1)
    assert [i.arguments for i in spaced if not isinstance(i, str) and i.done] == ['{"city": "Rome"}']


def test_the_parser_is_vllms_for_the_models_format(tokenizer: Any) -> None:
    with pytest.raises(InvalidArgument, match="not a vLLM tool parser"):
        ToolCallReader(tokenizer, [WEATHER], parser="nope")
    with pytest.raises(FailedPrecondition, match="does not fit"):  # Llama's format, SmolLM2's tokenizer
        ToolCallReader(tokenizer, [WEATHER], parser="llama3_json")


def test_history_pairs_calls_with_results_and_renders_them() -> None:
    h = ChatHistory("system")
    h.add_user("weather in paris?")
    h.add_assistant("", tool_calls=[ToolCallRecord("call_1", "get_weather", '{"city": "Paris"}')])
    h.add_tool_result("call_1", '{"error": "cancelled"}')
    h.add_tool_result("call_1", '{"sky": "sunny"}')  # a late result replaces the cancellation
    h.add_assistant("It is sunny.")
    messages = h.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"] == [{"id": "call_1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[3] == {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": "call_1"}


# --- the conversation's rules --------------------------------------------------------------------------


async def test_call_result_and_continue_by_itself() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "It is sunny in Paris"]
    async with harness(stages) as h:
        await h.conv.push_text("what is the weather like in paris")
        await h.until(lambda: h.of(ev.ToolCallDone))
        started, done = h.of(ev.ToolCallStarted)[0], h.of(ev.ToolCallDone)[0]
        assert started.call_id == done.call_id and done.name == "get_weather" and not done.error
        assert "".join(a.delta for a in h.of(ev.ToolCallArguments)) == done.arguments == '{"city": "Paris"}'
        assert h.conv.pending_tool_calls == [done.call_id]
        assert stages.llm_tools[0][0] == [WEATHER, CLOCK]
        await h.conv.submit_tool_result(done.call_id, '{"sky": "sunny", "celsius": 21}')
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        assert h.of(ev.ResponseDone)[1].text == "It is sunny in Paris"
        assert h.of(ev.ToolResultAccepted)[0].call_id == done.call_id
        await h.conv.end_input()
    # the model saw its call and the result before it answered, in that order
    seen = stages.llm_calls[1]
    assert [m["role"] for m in seen[-3:]] == ["user", "assistant", "tool"]
    assert seen[-1]["content"] == '{"sky": "sunny", "celsius": 21}'
    assert roles(h) == ["user", "assistant", "tool", "assistant"]
    assert h.counts["tool_made"] == 1 and h.counts["tool_result"] == 1


async def test_realtime_style_waits_for_create_response() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "Sunny"]
    async with harness(stages, auto_continue=False, filler=False) as h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: h.of(ev.ToolCallDone) and h.of(ev.ResponseDone))
        await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[0].call_id, '"sunny"')
        await asyncio.sleep(0.2)
        assert len(h.of(ev.ResponseDone)) == 1 and len(stages.llm_calls) == 1
        await h.conv.create_response()
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)


async def test_parallel_calls_continue_once_every_result_is_in() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Oslo"}', 0) + call("get_time", "{}", 1), "Cold and late"]
    async with harness(stages, filler=False) as h:
        await h.conv.push_text("weather in oslo and the time")
        await h.until(lambda: len(h.of(ev.ToolCallDone)) == 2)
        first, second = h.of(ev.ToolCallDone)
        assert first.call_id != second.call_id
        await h.conv.submit_tool_result(second.call_id, '"22:00"')
        await asyncio.sleep(0.2)
        assert len(stages.llm_calls) == 1  # one result is not all of them
        await h.conv.submit_tool_result(first.call_id, '"-3 C"')
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        await h.conv.end_input()
    assert [m["role"] for m in stages.llm_calls[1][-3:]] == ["assistant", "tool", "tool"]


async def test_filler_after_the_wait_when_the_model_said_nothing() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "Sunny"]
    async with harness(stages, filler_after_ms=200, filler_text="One moment.") as h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: h.of(ev.ToolCallDone))
        t_call = asyncio.get_running_loop().time()
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        waited = asyncio.get_running_loop().time() - t_call
        filler = h.of(ev.ResponseDone)[1]
        assert filler.text == "One moment." and filler.audio_ms > 0 and waited >= 0.15
        await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[0].call_id, '"sunny"')
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 3)
        await h.conv.end_input()
    assert h.counts["tool_filler"] == 1
    assert len(stages.llm_calls) == 2  # the filler is not the model's


async def test_no_filler_when_the_model_spoke_or_the_result_came_fast() -> None:
    stages = FakeStages()
    stages.answers = [["Let", " me", " check.", *call("get_weather", '{"city": "Paris"}')], "Sunny", "Sunny"]
    async with harness(stages, filler_after_ms=100) as h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: h.of(ev.ToolCallDone))
        await asyncio.sleep(0.3)
        assert [d.text for d in h.of(ev.ResponseDone)] == ["Let me check."]
        await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[0].call_id, '"sunny"')
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        await h.conv.end_input()
    assert "tool_filler" not in h.counts
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "Sunny"]
    async with harness(stages, filler_after_ms=1000) as h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: h.of(ev.ToolCallDone))
        await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[0].call_id, '"sunny"')
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        assert h.of(ev.ResponseDone)[1].text == "Sunny"
        await asyncio.sleep(1.2)
        await h.conv.end_input()
    assert "tool_filler" not in h.counts and len(h.of(ev.ResponseDone)) == 2


async def test_barge_in_cancels_the_wait_and_a_late_result_is_recorded_not_spoken() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "what else"]
    async with harness(stages, filler=False) as h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: h.of(ev.ToolCallDone))
        cid = h.of(ev.ToolCallDone)[0].call_id
        await h.feed(np.concatenate([question(0.8, "stop please what about spain"), silence(0.6)]))
        await h.until(lambda: h.of(ev.ToolCallCancelled))
        assert h.of(ev.ToolCallCancelled)[0].call_id == cid and h.of(ev.ToolCallCancelled)[0].reason == "barge_in"
        assert h.conv.pending_tool_calls == []
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        calls_before = len(stages.llm_calls)
        await h.conv.submit_tool_result(cid, '"sunny"')
        await asyncio.sleep(0.2)
        assert h.of(ev.ToolResultAccepted)[0].late and len(stages.llm_calls) == calls_before
        with pytest.raises(FailedPrecondition, match="already"):
            await h.conv.submit_tool_result(cid, '"again"')
        await h.conv.end_input()
    tool = [m for m in h.conv.history.messages() if m["role"] == "tool"]
    assert tool == [{"role": "tool", "content": '"sunny"', "tool_call_id": cid}]
    assert h.counts["tool_cancelled"] == 1 and h.counts["tool_result_after_cancel"] == 1


async def test_hang_up_cancels_pending_calls_and_leaves_nothing_running() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}')]
    h = harness(stages, filler=False)
    async with h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: h.of(ev.ToolCallDone))
    assert h.counts["tool_cancelled"] == 1 and h.conv.pending_tool_calls == []
    assert stages.llm_running == 0


async def test_a_result_that_never_comes_times_out_and_the_model_says_so() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "Sorry I could not get the weather"]
    async with harness(stages, filler=False, result_timeout_s=0.3) as h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: h.of(ev.ToolCallDone))
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        assert [e.code for e in h.of(ev.ErrorEvent)] == ["DEADLINE_EXCEEDED"]
        assert h.of(ev.ToolCallCancelled)[0].reason == "timeout"
        assert "no result" in stages.llm_calls[1][-1]["content"]
        await h.conv.push_text("ok thanks")  # the conversation goes on
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 3)
        await h.conv.end_input()


async def test_unknown_call_id_is_a_clear_error() -> None:
    async with harness(FakeStages()) as h:
        with pytest.raises(NotFound, match="no tool call 'call_nope'"):
            await h.conv.submit_tool_result("call_nope", "{}")
        await h.conv.end_input()


async def test_invalid_arguments_are_an_error_event_and_no_call() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"town": 3}'), call("launch_rockets", "{}"), "fine"]
    async with harness(stages, filler=False) as h:
        await h.conv.push_text("weather")
        await h.until(lambda: h.of(ev.ResponseDone))
        await h.conv.push_text("rockets")
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        errors = [d.error for d in h.of(ev.ToolCallDone)]
        assert "city" in errors[0] and "not among" in errors[1]
        assert [e.code for e in h.of(ev.ErrorEvent)] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
        assert h.conv.pending_tool_calls == []
        await h.conv.push_text("ok")
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 3)
        await h.conv.end_input()
    assert all(not m.get("tool_calls") for m in h.conv.history.messages())


async def test_required_choice_is_passed_and_relaxed_after_results() -> None:
    """A continuation after results may speak, or the model would call tools forever."""
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "Sunny"]
    stages.answers += [call("get_weather", '{"city": "Rome"}'), "Warm"]
    h = ToolHarness(stages, tools=[WEATHER], tool_choice="required",
                    tool_calling=ToolCalling(filler=False, tools_after_results=True))
    async with h:
        for city, n in (("paris", 2), ("rome", 4)):
            await h.conv.push_text(f"weather in {city}")
            await h.until(lambda n=n: len(h.of(ev.ToolCallDone)) == n // 2)
            await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[-1].call_id, '"sunny"')
            await h.until(lambda n=n: len(h.of(ev.ResponseDone)) == n)
            if city == "paris":
                await h.conv.update_settings(h.conv.settings.model_copy(update={
                    "tool_calling": ToolCalling(filler=False, tools_after_results=False)}))
        await h.conv.end_input()
    assert [c.mode for _, c in stages.llm_tools] == ["required", "auto", "required", "none"]


async def test_a_result_before_the_second_parallel_call_waits_for_it() -> None:
    """The model answers once every call of its response has a result, not when the first
    call's result beats the second call."""
    stages = FakeStages(word_s=0.05)
    stages.answers = [call("get_weather", '{"city": "Oslo"}', 0) + call("get_time", "{}", 1), "Cold and late"]
    async with harness(stages, filler=False) as h:
        await h.conv.push_text("weather in oslo and the time")
        await h.until(lambda: len(h.of(ev.ToolCallDone)) == 1)
        await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[0].call_id, '"-3 C"')
        await h.until(lambda: len(h.of(ev.ToolCallDone)) == 2)
        await asyncio.sleep(0.2)
        assert len(stages.llm_calls) == 1
        await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[1].call_id, '"22:00"')
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)
        await asyncio.sleep(0.2)
        await h.conv.end_input()
    assert len(stages.llm_calls) == 2
    assert [m["role"] for m in stages.llm_calls[1][-3:]] == ["assistant", "tool", "tool"]


async def test_hang_up_with_a_client_that_stopped_reading_does_not_hang() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}')]
    h = harness(stages, filler=False)
    h.conv = type(h.conv)(stages, h.conv.settings.model_copy(update={"send_queue": 4}), history=ChatHistory("s"),
                          observer=h)
    await h.conv.start()
    await h.conv.push_text("weather in paris")  # nobody reads: the queue fills up
    await asyncio.sleep(0.5)
    async with asyncio.timeout(5):
        await h.conv.aclose()
    assert h.conv.closed and h.conv.pending_tool_calls == []


async def test_a_long_result_keeps_its_question_and_call_in_the_prompt_and_fillers_stay_out() -> None:
    stages = FakeStages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "Sunny"]
    async with harness(stages, filler_after_ms=50) as h:
        await h.conv.push_text("weather in paris")
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 2)  # the call, then the filler
        assert h.of(ev.ResponseDone)[1].filler
        await h.conv.submit_tool_result(h.of(ev.ToolCallDone)[0].call_id, json.dumps({"report": "x" * 3900}))
        await h.until(lambda: len(h.of(ev.ResponseDone)) == 3)
        await h.conv.end_input()
    roles = [m["role"] for m in stages.llm_calls[1] if m["role"] != "system"]
    assert roles == ["user", "assistant", "tool"], roles
    assert "One moment." not in json.dumps(h.conv.history.messages())
    with pytest.raises(InvalidArgument, match="characters"):
        await h.conv._tools.submit("x", "y" * 5000)

"""/v1/realtime over the real Ray Serve app and models, driven by clients nobody here wrote: the
official `openai` SDK's realtime client, and the browser page in Debian's chromium (headless,
Playwright, a fake microphone fed from a WAV of a Piper question). The gRPC API is served by the
same Gateway deployment beside it.

Set VOXSERVE_UPDATE_SCREENSHOT=1 to refresh docs/realtime-page.png from the browser test (otherwise
the screenshot goes to .cache/, so that a test run leaves the tree clean).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.audio import float_to_pcm16, pcm16_to_float, resample
from tests.conftest import ROOT, cer, handle, say, wer

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1200)]

RATE = 24000
CHUNK_S = 0.1
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    from deployments.profiles import load_serve_config
    from deployments.server import free_port
    from tests.graph_app import start_observed

    srv = start_observed(load_serve_config("cpu"), grpc_port=free_port(), app_overrides={
        "gateway": {"max_sessions": 4, "max_stream_s": 120}})
    yield srv
    srv.stop()


class Session:
    """An SDK realtime connection whose events are read all the time (as a real client's are)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[Any] = []
        self.arrived: list[float] = []
        self._new = asyncio.Event()
        self._cursor = 0
        self._reader = asyncio.create_task(self._read())
        self.mic_open = True
        self.session_id = ""
        self.strict = True  # an error event fails the wait

    async def _read(self) -> None:
        try:
            async for event in self.conn:
                self.events.append(event)
                self.arrived.append(time.monotonic())
                self._new.set()
        finally:
            self._new.set()

    async def until(self, type_: str, where: Callable[[Any], bool] = lambda e: True, within_s: float = 120) -> Any:
        async with asyncio.timeout(within_s):
            while True:
                while self._cursor < len(self.events):
                    event = self.events[self._cursor]
                    self._cursor += 1
                    if event.type == "error" and type_ != "error" and self.strict:
                        raise AssertionError(f"error event: {event.error}")
                    if event.type == type_ and where(event):
                        return event
                if self._reader.done():
                    raise AssertionError(f"connection closed before {type_}")
                self._new.clear()
                await self._new.wait()

    def of(self, type_: str) -> list[Any]:
        return [e for e in self.events if e.type == type_]

    async def speak(self, audio24k: np.ndarray) -> None:
        """Microphone audio at real-time pace, in 100 ms appends."""
        step = int(RATE * CHUNK_S)
        for i in range(0, audio24k.size, step):
            await self.conn.input_audio_buffer.append(
                audio=base64.b64encode(float_to_pcm16(audio24k[i:i + step])).decode())
            await asyncio.sleep(CHUNK_S)

    async def open_mic(self) -> None:
        """A live microphone between turns: silence, until closed."""
        while self.mic_open:
            await self.speak(np.zeros(int(RATE * CHUNK_S), np.float32))

    async def close(self) -> None:
        self.mic_open = False
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@asynccontextmanager
async def realtime(server: Any, **session: Any) -> AsyncIterator[Session]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="sk-no-key-needed-on-loopback", base_url=f"http://127.0.0.1:{server.http_port}/v1")
    async with client.realtime.connect(model="voxserve") as conn:
        s = Session(conn)
        try:
            created = await s.until("session.created")
            s.session_id = created.session.id.removeprefix("sess_")
            await conn.session.update(session={
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                    "transcription": {"model": "whisper-1", "language": "en"},
                                    "turn_detection": {"type": "semantic_vad"}},
                          "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "marin"}},
                **session})
            await s.until("session.updated")
            yield s
        finally:
            await s.close()


def answer_audio(s: Session, response_id: str) -> np.ndarray:
    pcm = b"".join(base64.b64decode(e.delta) for e in s.of("response.output_audio.delta")
                   if e.response_id == response_id)
    return pcm16_to_float(pcm)


async def test_openai_sdk_spoken_question_gets_transcript_and_spoken_answer(server) -> None:  # type: ignore[no-untyped-def]
    from services.asr import WhisperASR

    question = "What is the capital of France?"
    async with realtime(server) as s:
        await s.speak(say(question, RATE))
        mic = asyncio.create_task(s.open_mic())
        try:
            done = await s.until("response.done")
        finally:
            s.mic_open = False
            await mic
    response = done.response
    assert response.status == "completed", response.status_details
    transcript = s.of("conversation.item.input_audio_transcription.completed")[0].transcript
    assert wer(question, transcript) < 0.2, transcript
    said = s.of("response.output_audio_transcript.done")[0].transcript
    assert said.strip() and response.output[0].content[0].transcript == said
    audio = answer_audio(s, response.id)
    assert audio.size / RATE > 0.5, "no answer audio"
    assert float(np.sqrt(np.mean(audio ** 2))) > 0.01, "the answer audio is silent"
    heard = await WhisperASR.load().transcribe(resample(audio, RATE, 16000), "en")
    assert cer(said, heard.text) <= 0.2, (said, heard.text)  # the audio says the transcript
    assert response.usage.output_tokens > 0
    latency = response.model_extra["voxserve"]["latency"]
    assert latency["voice_to_voice_ms"] > 0 and latency["llm_tokens"] > 0, latency


async def test_openai_sdk_phone_call_in_g711_mulaw_both_ways(server) -> None:  # type: ignore[no-untyped-def]
    """Telephony audio: an 8 kHz mu-law question is understood and answered in mu-law."""
    from services.codecs import float_to_mulaw, mulaw_to_float

    question = "How many days are in a week?"
    phone = {"format": {"type": "audio/pcmu"}}
    async with realtime(server, audio={"input": {**phone, "transcription": {"model": "whisper-1", "language": "en"},
                                                 "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}},
                                       "output": phone}) as s:
        audio = np.concatenate([say(question, 8000), np.zeros(8000 * 2, np.float32)])
        for i in range(0, audio.size, 800):  # 100 ms of 8 kHz mu-law per append
            await s.conn.input_audio_buffer.append(audio=base64.b64encode(float_to_mulaw(audio[i:i + 800])).decode())
            await asyncio.sleep(CHUNK_S)
        done = await s.until("response.done")
    assert done.response.status == "completed"
    assert done.response.audio.output.format.type == "audio/pcmu"
    transcript = s.of("conversation.item.input_audio_transcription.completed")[0].transcript
    assert wer(question, transcript) < 0.25, transcript
    answer = mulaw_to_float(b"".join(base64.b64decode(e.delta) for e in s.of("response.output_audio.delta")))
    assert answer.size / 8000 > 0.5 and float(np.sqrt(np.mean(answer ** 2))) > 0.01


async def test_openai_sdk_barge_in_truncate_and_cancel_keep_what_was_heard(server) -> None:  # type: ignore[no-untyped-def]
    async with realtime(server, max_output_tokens=150) as s:
        s.strict = False  # the server may end the answer itself before our cancel: checked below
        await s.speak(say("Tell me a long story about a brave knight who fights a dragon.", RATE))
        mic = asyncio.create_task(s.open_mic())
        first = (await s.until("response.created")).response
        await s.until("response.output_audio.delta")
        playing_since = time.monotonic()  # this client plays the answer as it arrives
        await asyncio.sleep(1.5)
        s.mic_open = False
        await mic
        barge = asyncio.create_task(s.speak(np.concatenate([say("Stop. What is two plus two?", RATE),
                                                            np.zeros(RATE * 3, np.float32)])))
        await s.until("input_audio_buffer.speech_started")
        received_ms = 1000 * answer_audio(s, first.id).size / RATE
        played_ms = int(min(received_ms, 1000 * (time.monotonic() - playing_since)))
        item_id = s.of("response.output_item.added")[0].item.id
        # what a client does when the user talks over the answer: stop, say what was heard
        await s.conn.response.cancel(response_id=first.id)
        await s.conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played_ms)
        done = await s.until("response.done", lambda e: e.response.id == first.id)
        assert done.response.status == "cancelled", done.response.status_details
        truncated = await s.until("conversation.item.truncated")
        assert truncated.item_id == item_id and truncated.audio_end_ms == played_ms
        await barge
        mic = asyncio.create_task(s.open_mic())
        second = await s.until("response.done", lambda e: e.response.id != first.id)
        s.mic_open = False
        await mic
        assert second.response.status == "completed"
        await asyncio.sleep(1000 * answer_audio(s, second.response.id).size / RATE / 1000)  # hear it out
        errors = [e.error for e in s.of("error")]
        # the server may have ended the answer itself (speech over it) before the cancel arrived
        assert all(e.code == "response_cancel_not_active" for e in errors), errors
    generated = "".join(e.delta for e in s.of("response.output_audio_transcript.delta")
                        if e.response_id == first.id).split()
    history = await handle("Gateway").session_history.remote(s.session_id)
    chat = [m for m in history if m["role"] != "system"]
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"], chat
    heard = chat[1]["content"].split()
    assert chat[1]["interrupted"] and 0 < len(heard) < len(generated), (heard, generated)
    assert heard == generated[:len(heard)], (heard, generated)
    assert wer("Stop. What is two plus two?", chat[2]["content"]) < 0.34, chat[2]
    transcripts = [e.transcript for e in s.of("conversation.item.input_audio_transcription.completed")]
    assert len(transcripts) == 2, transcripts


async def test_openai_sdk_bad_events_get_errors_and_the_session_goes_on(server) -> None:  # type: ignore[no-untyped-def]
    async with realtime(server) as s:
        await s.conn.send_raw('{"type": "response.make_it_so"}')
        err = await s.until("error")
        assert err.error.code == "invalid_value" and err.error.param == "type", err.error
        await s.conn.send_raw("{not json")
        err = await s.until("error")
        assert err.error.code == "invalid_json", err.error
        await s.conn.send_raw('{"type": "input_audio_buffer.append", "audio": "@@@"}')
        assert (await s.until("error")).error.code == "invalid_value"
        await s.conn.conversation.item.create(item={"type": "message", "role": "user",
                                                    "content": [{"type": "input_text", "text": "Say hello."}]})
        await s.conn.response.create()
        done = await s.until("response.done")
        assert done.response.status == "completed" and done.response.output[0].content[0].transcript.strip()


async def test_grpc_is_served_by_the_same_gateway(server) -> None:  # type: ignore[no-untyped-def]
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.voxserve.v1 import voice_pb2 as pb
    from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        chunks = [c async for c in pb_grpc.VoiceAssistantStub(channel).Synthesize(
            pb.SynthesizeRequest(text="Hello there."), timeout=60)]
        assert sum(len(c.data) for c in chunks) > 4000
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        page = await http.get(f"http://127.0.0.1:{server.http_port}/")
    assert page.status_code == 200 and "/web/realtime.js" in page.text


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: apt-get install chromium "
                    "(scripts/bootstrap.sh does, as root)")
async def test_browser_page_in_headless_chromium_answers_a_spoken_question(server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    question = "What is the capital of France?"
    stats, page_text = await _browser_turn(server, tmp_path, question, screenshot=True)
    assert wer(question, stats["userTranscripts"][0]) < 0.34, stats["userTranscripts"]
    assert stats["assistantTexts"][0].strip(), stats
    assert stats["audioMs"] > 500 and stats["rms"] > 0.01, stats  # the answer arrived, not silent
    assert stats["playedRms"] > 0.01, stats  # and went out through Web Audio
    assert "voice-to-voice" in page_text["latency"], page_text
    assert stats["latencies"][0]["voice_to_voice_ms"] > 0


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: apt-get install chromium "
                    "(scripts/bootstrap.sh does, as root)")
async def test_browser_page_runs_its_demo_tool_and_shows_the_call(server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The page declares get_time in its own JS; the call and its result appear in the transcript."""
    stats, page_text = await _browser_turn(server, tmp_path, "What time is it?", tools=True,
                                           done=lambda s: s.get("toolCalls") and s.get("responsesCompleted", 0) >= 2)
    assert [c["name"] for c in stats["toolCalls"]] == ["get_time"], stats["toolCalls"]
    assert "get_time(" in page_text["tool"] and "→" in page_text["tool"], page_text
    assert stats["assistantTexts"][-1].strip(), stats


async def _browser_turn(server: Any, tmp_path: Path, question: str, *, tools: bool = False,
                        done: Callable[[dict[str, Any]], Any] | None = None,
                        screenshot: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """The page in headless chromium, its fake microphone saying ``question``: voxStats once
    ``done`` (default: an answer completed and played), and the texts of its transcript."""
    import soundfile as sf
    from playwright.async_api import async_playwright

    done = done or (lambda s: s.get("responsesCompleted") and s.get("playedRms", 0) > 0.01)
    wav = tmp_path / "question.wav"
    sf.write(wav, np.concatenate([np.zeros(8000, np.float32), say(question, 16000),
                                  np.zeros(16000 * 8, np.float32)]), 16000, subtype="PCM_16")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}%noloop",
            "--autoplay-policy=no-user-gesture-required"]
    texts: dict[str, str] = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 720})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(f"http://127.0.0.1:{server.http_port}/")
            if tools:
                await page.check("#tools")
            await page.click("#start")
            stats: dict[str, Any] = {}
            async with asyncio.timeout(180):
                while not done(stats):
                    await asyncio.sleep(0.5)
                    stats = await page.evaluate("window.voxStats")
                    assert not stats["errors"] and not problems, (stats["errors"], problems)
            await asyncio.sleep(1.0)  # let the answer play a little more for the screenshot
            stats = await page.evaluate("window.voxStats")
            if screenshot:
                shot = ROOT / ".cache" / "realtime-page.png"
                shot.parent.mkdir(exist_ok=True)
                await page.screenshot(path=str(shot), full_page=True)
                if os.environ.get("VOXSERVE_UPDATE_SCREENSHOT"):
                    shutil.copy(shot, Path(ROOT / "docs" / "realtime-page.png"))
            latency = page.locator(".turn.assistant .latency")
            texts["latency"] = await latency.first.inner_text() if await latency.count() else ""
            tool = page.locator(".turn.tool")
            texts["tool"] = await tool.first.inner_text() if await tool.count() else ""
        finally:
            await browser.close()
    return stats, texts


# --- function tools, with the default models (the tool model answers sessions that offer tools) ------------

GET_WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                              "required": ["city"]}}
PARIS_WEATHER = '{"city": "Paris", "sky": "sunny", "temperature_celsius": 21}'


async def test_openai_sdk_spoken_weather_question_calls_the_tool_and_speaks_its_result(server) -> None:  # type: ignore[no-untyped-def]
    """The issue's definition of done: a spoken "What is the weather like in Paris?" with one
    get_weather(city) tool leads, over the openai SDK, to a call naming Paris, and then to a
    spoken answer that uses the returned result."""
    async with realtime(server, tools=[GET_WEATHER], tool_choice="auto") as s:
        mic: asyncio.Task[None] | None = None
        try:
            # With tool_choice auto the 0.5B tool model sometimes answers a spoken question in
            # words instead (its miss rate is a benchmark figure: scripts/bench_tools.py). A user
            # would ask again, so the test does, up to three times; a miss fails fast, never by
            # waiting out the session's audio limit.
            misses: list[str] = []
            for _ in range(3):
                if mic is not None:
                    s.mic_open = False
                    await mic
                await s.speak(say("What is the weather like in Paris?", RATE))
                s.mic_open = True
                mic = asyncio.create_task(s.open_mic())
                first = await s.until("response.done")
                calls = [o for o in first.response.output if o.type == "function_call"]
                if calls:
                    break
                misses.append(" ".join(c.transcript or "" for o in first.response.output
                                       for c in (getattr(o, "content", None) or [])))
            assert calls, f"no tool call in 3 tries; answered instead: {misses}"
            args = next(e for e in s.of("response.function_call_arguments.done") if e.call_id == calls[0].call_id)
            assert args.name == "get_weather" and "paris" in args.arguments.lower(), args
            await s.conn.conversation.item.create(item={"type": "function_call_output", "call_id": args.call_id,
                                                        "output": PARIS_WEATHER})
            await s.until("conversation.item.added", lambda e: e.item.type == "function_call_output")
            t_result = time.monotonic()
            await s.conn.response.create()
            created = await s.until("response.created")
            first_audio = await s.until("response.output_audio.delta",
                                        lambda e: e.response_id == created.response.id)
            result_to_audio = time.monotonic() - t_result
            done = await s.until("response.done", lambda e: e.response.id == created.response.id)
        finally:
            s.mic_open = False
            if mic is not None:
                await mic
    said = done.response.output[0].content[0].transcript.lower()
    assert ("21" in said or "sunny" in said or "twenty" in said) and "{" not in said, said
    assert answer_audio(s, done.response.id).size / RATE > 0.5 and first_audio.delta
    print(f"result -> first audio: {1000 * result_to_audio:.0f} ms; asked {len(misses) + 1} time(s)")


async def test_grpc_typed_question_calls_the_tool_and_the_answer_uses_the_result(server) -> None:  # type: ignore[no-untyped-def]
    """gRPC: ToolCall events, a ToolResult, and the model answers by itself (auto-continue)."""
    from protos.voxserve.v1 import voice_pb2 as pb

    tool = pb.Tool(name="get_weather", description=GET_WEATHER["description"],
                   parameters_json=json.dumps(GET_WEATHER["parameters"]))
    config = pb.SessionConfig(input_sample_rate=16000, tools=[tool], playback=pb.PLAYBACK_NONE)
    async with GrpcSession(server.grpc_address, config) as g:
        await g.send(pb.ClientMessage(text=pb.TextInput(text="What is the weather like in Paris?")))
        done = await g.until(lambda e: e.WhichOneof("event") == "tool_call" and e.tool_call.done)
        assert done.tool_call.name == "get_weather" and not done.tool_call.error
        assert "paris" in json.loads(done.tool_call.arguments_json)["city"].lower()
        pieces = "".join(e.tool_call.arguments_delta for e in g.events if e.WhichOneof("event") == "tool_call")
        assert pieces == done.tool_call.arguments_json
        await g.send(pb.ClientMessage(tool_result=pb.ToolResult(call_id=done.tool_call.call_id,
                                                                 output_json=PARIS_WEATHER)))
        answer = await g.until(lambda e: e.WhichOneof("event") == "response_done"
                               and e.response_done.response_id > done.tool_call.response_id
                               and e.response_done.text != "One moment.")
        text = answer.response_done.text.lower()
        assert ("21" in text or "sunny" in text or "twenty" in text) and "{" not in text, text
        await g.send(pb.ClientMessage(tool_result=pb.ToolResult(call_id="call_unknown", output_json="{}")))
        error = await g.until(lambda e: e.WhichOneof("event") == "error")
        assert error.error.code == "NOT_FOUND"


async def test_grpc_required_tool_calls_are_schema_valid_ten_of_ten(server) -> None:  # type: ignore[no-untyped-def]
    from protos.voxserve.v1 import voice_pb2 as pb
    from services.tools import ToolSpec, check_arguments

    convert = {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                                "to_unit": {"type": "string"}},
               "required": ["value", "from_unit", "to_unit"], "additionalProperties": False}
    specs = {"get_weather": ToolSpec(name="get_weather", parameters=GET_WEATHER["parameters"]),
             "convert_units": ToolSpec(name="convert_units", parameters=convert)}
    config = pb.SessionConfig(
        input_sample_rate=16000, playback=pb.PLAYBACK_NONE, tool_choice="required",
        tools=[pb.Tool(name=n, parameters_json=json.dumps(t.parameters)) for n, t in specs.items()],
        tool_calling=pb.ToolCallSettings(disable_filler=True, manual_continue=True))
    asks = ["Weather in Oslo?", "Convert 5 feet to meters.", "Tell me a joke.", "Is it raining in Lima?",
            "Turn 100 fahrenheit into celsius.", "Hello there!", "How warm is Cairo?", "Two pounds in kilograms?",
            "Do I need a coat in Berlin?", "What is one mile in kilometers?"]
    calls = []
    async with GrpcSession(server.grpc_address, config) as g:
        for ask in asks:
            await g.send(pb.ClientMessage(text=pb.TextInput(text=ask)))
            event = await g.until(lambda e: e.WhichOneof("event") == "tool_call" and e.tool_call.done)
            calls.append(event.tool_call)
    assert len(calls) == 10 and all(not c.error for c in calls), [c.error for c in calls]
    for c in calls:
        check_arguments(specs[c.name], c.arguments_json)


class GrpcSession:
    """One Converse stream driven by the test: messages are sent when the test says, events read all the time."""

    def __init__(self, address: str, config: Any) -> None:
        self.address, self.config = address, config
        self.events: list[Any] = []
        self._out: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        self._new = asyncio.Event()
        self._cursor = 0

    async def __aenter__(self) -> GrpcSession:
        import grpc

        from protos.voxserve.v1 import voice_pb2 as pb
        from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc

        async def requests() -> AsyncIterator[Any]:
            yield pb.ClientMessage(config=self.config)
            while (msg := await self._out.get()) is not None:
                yield msg

        self._channel = grpc.aio.insecure_channel(self.address)
        self._call = pb_grpc.VoiceAssistantStub(self._channel).Converse(requests(), timeout=300)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for event in self._call:
                self.events.append(event)
                self._new.set()
        finally:
            self._new.set()

    async def send(self, msg: Any) -> None:
        await self._out.put(msg)

    async def until(self, where: Callable[[Any], bool], within_s: float = 120) -> Any:
        async with asyncio.timeout(within_s):
            while True:
                while self._cursor < len(self.events):
                    event = self.events[self._cursor]
                    self._cursor += 1
                    if where(event):
                        return event
                if self._reader.done():
                    raise AssertionError(f"stream ended: {[e.WhichOneof('event') for e in self.events]}")
                self._new.clear()
                await self._new.wait()

    async def __aexit__(self, *exc: object) -> None:
        from protos.voxserve.v1 import voice_pb2 as pb

        await self._out.put(pb.ClientMessage(end_of_input=pb.EndOfInput()))
        await self._out.put(None)
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._channel.close()


async def test_reference_client_runs_the_example_tools_and_the_answer_uses_the_result(server) -> None:  # type: ignore[no-untyped-def]
    """`voxserve talk --tools examples/tools.py`: the client offers its functions, runs the call, sends the result."""
    from clients.tools import LocalTools
    from clients.voice_client import UserTurn, VoiceClient
    from protos.voxserve.v1 import voice_pb2 as pb

    tools = LocalTools.load(str(ROOT / "examples" / "tools.py"))
    config = pb.SessionConfig(input_sample_rate=16000, language="en", tools=tools.protos())
    client = VoiceClient(server.grpc_address)
    try:
        result = await client.converse([UserTurn(audio=say("How many kilometers are ten miles?"), label="spoken")],
                                       config, tools=tools)
    finally:
        await client.close()
    assert result.status == "OK", result.details
    turn = result.turns[0]
    assert [c["name"] for c in turn.tool_calls] == ["convert_units"], turn.tool_calls
    assert json.loads(turn.tool_calls[0]["output"])["result"] == 16.0934
    assert ("16" in turn.response_text or "sixteen" in turn.response_text.lower()) and "{" not in turn.response_text, \
        turn.response_text
    assert turn.result_to_audio_ms is not None and turn.audio_ms > 0

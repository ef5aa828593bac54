"""The OpenAI Realtime adapter on fake stages (tests/fakes.py), through a real WebSocket: the app of
deployments/realtime/endpoint.py served by uvicorn in this process, driven by the `websockets` client
and by the official `openai` SDK. Every server event is checked against the SDK's own event types.
The same endpoint over the real Ray Serve app and models: tests/test_realtime_graph.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import uvicorn
import websockets
from openai.types.realtime import RealtimeServerEvent

from deployments.auth import KEY_SUBPROTOCOL_PREFIX, ApiKeyAuth
from deployments.config import AppArgs
from deployments.realtime.endpoint import RealtimeAdapter, create_app
from deployments.realtime.mapper import EventMapper
from deployments.realtime.session_config import RealtimeConfig
from deployments.server import free_port
from deployments.sessions import SessionHub
from services.audio import float_to_pcm16, resample
from services.codecs import float_to_mulaw
from services.conversation import events as ev
from tests.fakes import RATE, FakeStages, call, silence, speech

pytestmark = pytest.mark.timeout(120)

QUESTION = "what is the capital of france"
ANSWER = "one two three four five six seven eight nine ten"
KEY = "test-key-0123456789abcdef"
SERVER_VAD = {"type": "server_vad", "silence_duration_ms": 300}

# The SDK's server event classes by their `type`: every event we send must validate against one.
_EVENT_TYPES: dict[str, Any] = {}
for _cls in typing.get_args(typing.get_args(RealtimeServerEvent)[0]):
    _EVENT_TYPES[typing.get_args(_cls.model_fields["type"].annotation)[0]] = _cls


def check_event(event: dict[str, Any]) -> None:
    cls = _EVENT_TYPES.get(event.get("type", ""))
    assert cls is not None, f"not an OpenAI server event type: {event.get('type')}"
    cls.model_validate(event)  # raises on a missing field or a wrong type
    assert isinstance(event.get("event_id"), str) and event["event_id"]


class Stages(FakeStages):
    """Fake stages plus what only the gateway asks of them."""

    async def info(self) -> dict[str, Any]:
        return {"voice_rate": 22050, "speech_native": False, "llm_model": "fake-llm", "asr_model": "fake-asr"}

    async def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def replicas_running(self) -> None:
        pass  # in-process stages: their replica is this one


# --- an in-process server whose adapter each test sets --------------------------------------------------


class _Holder:
    adapter: RealtimeAdapter | None = None


@pytest.fixture(scope="module")
def base_url() -> Any:
    holder = _Holder()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: holder.adapter), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield holder, f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


class Rig:
    """One test's adapter (fake stages, hub) on the shared server, and clients to it."""

    def __init__(self, holder: _Holder, address: str, stages: Stages, auth: ApiKeyAuth | None = None,
                 **gateway: Any) -> None:
        gateway.setdefault("turn_detector_enabled", False)
        self.args = AppArgs.model_validate({"gateway": gateway, "auth": {"api_keys_env": ""}})
        self.stages = stages
        self.hub = SessionHub(self.args, stages)
        holder.adapter = RealtimeAdapter(self.args, self.hub, auth or ApiKeyAuth())
        self.address = address
        self.url = f"ws://{address}/v1/realtime?model=voxserve-test"

    @asynccontextmanager
    async def connect(self, **kwargs: Any) -> AsyncIterator[Client]:
        async with websockets.connect(self.url, max_size=None, **kwargs) as ws:
            client = Client(ws)
            try:
                created = await client.until("session.created")
                client.session_id = created["session"]["id"].removeprefix("sess_")
                yield client
            finally:
                await client.stop()

    async def history(self, session_id: str, *, live: bool = False) -> list[tuple[str, str, bool]]:
        """The recorded history: now (``live``), or once the server has closed the session."""
        async with asyncio.timeout(5):
            while not live and session_id in self.hub.live:
                await asyncio.sleep(0.02)
        records = self.hub.history(session_id) or []
        return [(m["role"], m["content"], m.get("interrupted", False)) for m in records if m["role"] != "system"]


class Client:
    """A realtime client: events are read all the time (as a real client does) and kept in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.session_id = ""
        self._cursor = 0
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                event = json.loads(raw)
                check_event(event)
                self.events.append(event)
                self._new.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self._new.set()

    async def stop(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def send(self, type_: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": type_, **fields}))

    async def until(self, type_: str, where: Callable[[dict[str, Any]], bool] = lambda e: True,
                    within_s: float = 15.0) -> dict[str, Any]:
        """The next event of ``type_`` (after the previous match) that satisfies ``where``."""
        async with asyncio.timeout(within_s):
            while True:
                while self._cursor < len(self.events):
                    event = self.events[self._cursor]
                    self._cursor += 1
                    if event["type"] == type_ and where(event):
                        return event
                if self._reader.done():
                    raise AssertionError(f"connection closed before {type_}; got {self.types()}")
                self._new.clear()
                await self._new.wait()

    async def error(self, code: str, within_s: float = 10.0) -> dict[str, Any]:
        event = await self.until("error", within_s=within_s)
        assert event["error"]["code"] == code, event
        return event["error"]

    def types(self, since: int = 0) -> list[str]:
        return [e["type"] for e in self.events[since:]]

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    async def speak(self, audio16k: np.ndarray, *, rate: int = 24000, encode: Callable[[np.ndarray], bytes] =
                    float_to_pcm16, chunk_ms: int = 40, speed: float = 4.0) -> None:
        """Stream 16 kHz audio as input_audio_buffer.append chunks (resampled, encoded), ``speed`` x real time."""
        audio = resample(audio16k, RATE, rate)
        step = rate * chunk_ms // 1000
        for i in range(0, audio.size, step):
            data = encode(audio[i:i + step])
            await self.send("input_audio_buffer.append", audio=base64.b64encode(data).decode())
            await asyncio.sleep(chunk_ms / 1000 / speed)


@pytest.fixture
def rig(base_url: Any) -> Callable[..., Rig]:
    holder, address = base_url

    def make(stages: Stages | None = None, **kwargs: Any) -> Rig:
        return Rig(holder, address, stages or Stages(), **kwargs)

    return make


def question(seconds: float = 1.0, phrase: str = QUESTION) -> np.ndarray:
    return np.concatenate([silence(0.2), speech(seconds, phrase), silence(0.8)])


def audio_bytes(events: list[dict[str, Any]], response_id: str) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events
                    if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id)


# --- session --------------------------------------------------------------------------------------------------


async def test_session_created_has_openai_defaults_and_update_changes_the_engine(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        session = c.events[0]["session"]
        assert c.events[0]["type"] == "session.created" and session["type"] == "realtime"
        assert session["model"] == "voxserve-test" and session["output_modalities"] == ["audio"]
        assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
        conv = r.hub.live[c.session_id]
        assert conv.settings.input_sample_rate == 24000 and conv.settings.output_sample_rate == 24000
        await c.send("session.update", event_id="ev_1", session={
            "type": "realtime", "instructions": "Answer in one word.",
            "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 400,
                                                   "threshold": 0.6, "prefix_padding_ms": 200},
                                "transcription": {"model": "whisper-1", "language": "en"}},
                      "output": {"voice": "marin", "format": {"type": "audio/pcm", "rate": 24000}}}})
        updated = (await c.until("session.updated"))["session"]
        td = updated["audio"]["input"]["turn_detection"]
        assert td["type"] == "server_vad" and td["silence_duration_ms"] == 400 and td["create_response"] is True
        assert updated["instructions"] == "Answer in one word." and updated["audio"]["output"]["voice"] == "marin"
        s = conv.settings
        assert (s.turn.mode, s.turn.min_silence_ms, s.vad.threshold, s.vad.pre_roll_ms) == ("silence", 400, 0.6, 200)
        assert s.language == "en" and s.system_prompt == "Answer in one word." and s.auto_respond
        # semantic_vad eagerness, then no turn detection at all (push-to-talk)
        await c.send("session.update", session={"audio": {"input": {"turn_detection": {
            "type": "semantic_vad", "eagerness": "low", "interrupt_response": False}}}})
        await c.until("session.updated")
        assert (conv.settings.turn.mode, conv.settings.turn.max_silence_ms) == ("semantic", 3000)
        assert conv.settings.interruptions.mode == "off"
        await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
        assert (await c.until("session.updated"))["session"]["audio"]["input"]["turn_detection"] is None
        assert conv.settings.turn.mode == "manual" and not conv.settings.auto_respond


@pytest.mark.parametrize(("session", "code", "param"), [
    ({"audio": {"input": {"format": {"type": "audio/pcmu", "rate": 16000}}}}, "invalid_value",
     "session.audio.input.format"),
    ({"audio": {"input": {"format": {"type": "audio/flac"}}}}, "invalid_value", "session.audio.input.format"),
    ({"voice": "alloy"}, "unknown_parameter", "session.voice"),  # the beta shape
    ({"tools": [{"type": "function", "name": "bad name"}]}, "invalid_value", "session.tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "strict": True}]}, "unknown_parameter", "session.tools[0].strict"),
    ({"output_modalities": ["text", "audio"]}, "invalid_value", "session.output_modalities"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "silence_duration_ms": 300}}}},
     "unknown_parameter", "session.audio.input.turn_detection.silence_duration_ms"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 1}}}}, "invalid_value",
     "session.audio.input.turn_detection.silence_duration_ms"),
    ({"audio": {"output": {"voice": "nobody"}}}, "invalid_value", "session.audio.output.voice"),
    ({"audio": {"output": {"speed": 1.5}}}, "invalid_value", "session.audio.output.speed"),
    ({"instructions": "x " * 5000}, "invalid_value", "session.instructions"),
    ({"max_output_tokens": 0}, "invalid_value", "session.max_output_tokens"),
])
async def test_bad_session_update_is_an_error_and_changes_nothing(rig, session, code, param) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        before = r.hub.live[c.session_id].settings
        await c.send("session.update", event_id="bad_update", session=session)
        err = await c.error(code)
        assert err["param"] == param and err["event_id"] == "bad_update" and err["message"], err
        assert r.hub.live[c.session_id].settings == before
        assert not c.of("session.updated")
        await c.send("session.update", session={"instructions": "Be brief."})  # the session goes on
        assert (await c.until("session.updated"))["session"]["instructions"] == "Be brief."


async def test_instructions_over_the_token_limit_are_refused(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(max_system_prompt_tokens=16)
    async with r.connect() as c:
        await c.send("session.update", session={"instructions": "Be kind. " * 10})
        err = await c.error("invalid_value")
        assert err["param"] == "session.instructions" and "tokens" in err["message"], err
        await c.send("session.update", session={"instructions": "Be kind."})
        assert (await c.until("session.updated"))["session"]["instructions"] == "Be kind."
        assert r.hub.live[c.session_id].settings.system_prompt == "Be kind."


# --- turns ------------------------------------------------------------------------------------------------------


async def test_spoken_turn_gets_transcript_and_spoken_answer_in_openai_order(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        await c.send("session.update", session={"audio": {"input": {
            "turn_detection": SERVER_VAD, "transcription": {"model": "whisper-1"}}}})
        await c.until("session.updated")
        await c.speak(question())
        done = (await c.until("response.done"))["response"]
        assert done["status"] == "completed" and done["usage"]["output_tokens"] == 10
        assert done["voxserve"]["latency"]["llm_tokens"] == 10 and done["voxserve"]["audio_ms"] == 2000
        order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.added",
                 "conversation.item.input_audio_transcription.completed", "conversation.item.done",
                 "response.created", "response.output_item.added", "conversation.item.added",
                 "response.content_part.added", "response.output_audio_transcript.delta",
                 "response.output_audio.delta", "response.output_audio.done",
                 "response.output_audio_transcript.done", "response.content_part.done",
                 "response.output_item.done", "conversation.item.done", "response.done"]
        types = [t for t in c.types() if t in order]
        firsts = [types.index(t) for t in dict.fromkeys(order)]
        assert firsts == sorted(firsts), types
        user_item = c.of("input_audio_buffer.committed")[0]["item_id"]
        assert c.of("input_audio_buffer.speech_started")[0]["item_id"] == user_item
        transcript = c.of("conversation.item.input_audio_transcription.completed")[0]
        assert transcript["item_id"] == user_item and transcript["transcript"] == QUESTION
        item = done["output"][0]
        assert item["role"] == "assistant" and item["content"][0]["transcript"] == ANSWER
        assert c.of("response.output_audio_transcript.done")[0]["transcript"] == ANSWER
        pcm = audio_bytes(c.events, done["id"])
        assert len(pcm) == 2 * 24000 * 2  # 10 words x 0.2 s at 24 kHz, 16-bit
        assert {e["item_id"] for e in c.events if e["type"].startswith("response.output_audio")} == {item["id"]}
        await asyncio.sleep(2.1)  # the user listens to the 2 s answer: then it counts as heard
    assert await r.history(c.session_id) == [("user", QUESTION, False), ("assistant", ANSWER, False)]


async def test_created_text_item_waits_for_response_create(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        await c.send("conversation.item.create", item={
            "id": "item_mine", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello there"}]})
        added = await c.until("conversation.item.added")
        assert added["item"]["id"] == "item_mine" and added["item"]["content"][0]["text"] == "Hello there"
        await c.until("conversation.item.done")
        await asyncio.sleep(0.3)
        assert not c.of("response.created")  # OpenAI: a created item is not answered by itself
        await c.send("response.create")
        done = (await c.until("response.done"))["response"]
        assert done["status"] == "completed"
        await c.send("conversation.item.create", previous_item_id="item_unknown", item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]})
        assert (await c.error("invalid_value"))["param"] == "previous_item_id"
        await asyncio.sleep(2.1)  # the user listens to the 2 s answer: then it counts as heard
    assert await r.history(c.session_id) == [("user", "Hello there", False), ("assistant", ANSWER, False)]
    assert r.stages.llm_calls[0][-1] == {"role": "user", "content": "Hello there"}


async def test_push_to_talk_commit_then_response_create(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        await c.send("session.update", session={"audio": {"input": {
            "turn_detection": None, "transcription": {"model": "whisper-1"}}}})
        await c.until("session.updated")
        await c.send("input_audio_buffer.commit", event_id="empty")
        assert (await c.error("input_audio_buffer_commit_empty"))["event_id"] == "empty"
        await c.speak(speech(0.5, "uh huh"))
        await c.send("input_audio_buffer.clear")
        await c.until("input_audio_buffer.cleared")
        await c.speak(question(), speed=8)
        await c.send("input_audio_buffer.commit")
        committed = await c.until("input_audio_buffer.committed")
        await asyncio.sleep(0.2)
        assert not c.of("response.created") and not c.of("input_audio_buffer.speech_started")
        await c.send("response.create")
        await c.until("response.done")
        transcript = c.of("conversation.item.input_audio_transcription.completed")[0]
        assert transcript["item_id"] == committed["item_id"] and transcript["transcript"] == QUESTION


async def test_truncate_keeps_what_was_heard_in_the_history(rig) -> None:  # type: ignore[no-untyped-def]
    long_answer = " ".join(f"w{i}" for i in range(40))
    r = rig(Stages(answer=long_answer, word_s=0.05))
    async with r.connect() as c:
        await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Tell me a long story"}]})
        await c.send("response.create")
        delta = await c.until("response.output_audio.delta")
        await c.until("response.output_audio.delta",
                      lambda e: len(audio_bytes(c.events, e["response_id"])) >= 2 * 24000)
        await c.send("conversation.item.truncate", event_id="t1", item_id=delta["item_id"], content_index=0,
                     audio_end_ms=600)
        done = (await c.until("response.done"))["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
        truncated = await c.until("conversation.item.truncated")
        assert truncated["item_id"] == delta["item_id"] and truncated["audio_end_ms"] == 600
        heard = (await r.history(c.session_id, live=True))[1]
        assert heard[0] == "assistant" and heard[2] and long_answer.startswith(heard[1])
        assert 2 <= len(heard[1].split()) <= 3, heard
        assert done["voxserve"]["heard_text"] == heard[1] or long_answer.startswith(done["voxserve"]["heard_text"])
        # a later truncate of the same (ended) item still corrects the history; past the audio is refused
        await c.send("conversation.item.truncate", item_id=delta["item_id"], content_index=0, audio_end_ms=200)
        await c.until("conversation.item.truncated", lambda e: e["audio_end_ms"] == 200)
        assert (await r.history(c.session_id, live=True))[1][1] == "w0"
        await c.send("conversation.item.truncate", item_id=delta["item_id"], content_index=0, audio_end_ms=999_999)
        assert (await c.error("invalid_value"))["param"] == "audio_end_ms"
        await c.send("response.cancel")  # nothing in progress any more
        await c.error("response_cancel_not_active")
    await asyncio.sleep(0.2)
    assert r.stages.llm_running == 0


async def test_truncate_after_response_done_cuts_the_history_without_a_second_done(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Count"}]})
        await c.send("response.create")
        done = (await c.until("response.done"))["response"]
        assert done["status"] == "completed"  # all sent; the client is still playing it
        await c.send("conversation.item.truncate", item_id=done["output"][0]["id"], content_index=0, audio_end_ms=500)
        await c.until("conversation.item.truncated")
        await asyncio.sleep(0.2)
        assert len(c.of("response.done")) == 1, c.types()
        role, text, interrupted = (await r.history(c.session_id, live=True))[1]
        assert role == "assistant" and interrupted and ANSWER.startswith(text) and 2 <= len(text.split()) <= 3


async def test_response_cancel_stops_the_answer_and_aborts_the_llm(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(Stages(answer=" ".join(f"w{i}" for i in range(60)), word_s=0.05))
    async with r.connect() as c:
        await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Talk"}]})
        await c.send("response.create")
        created = (await c.until("response.created"))["response"]
        await c.send("response.create")
        await c.error("conversation_already_has_active_response")
        await c.send("response.cancel", response_id="resp_other")
        assert (await c.error("response_cancel_not_active"))["param"] == "response_id"
        await c.until("response.output_audio.delta")
        await c.send("response.cancel", response_id=created["id"])
        done = (await c.until("response.done"))["response"]
        assert done["id"] == created["id"] and done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert done["output"][0]["status"] == "incomplete"
    async with asyncio.timeout(5):
        while r.stages.llm_running:
            await asyncio.sleep(0.02)
    assert r.stages.llm_aborted == 1


async def test_speech_over_the_answer_interrupts_it(rig) -> None:  # type: ignore[no-untyped-def]
    stages = Stages(word_s=0.02)
    stages.answers = [" ".join(f"w{i}" for i in range(40)), "Madrid."]
    r = rig(stages)
    async with r.connect() as c:
        await c.send("session.update", session={"audio": {"input": {"turn_detection": SERVER_VAD}}})
        await c.until("session.updated")
        await c.speak(question())
        first = (await c.until("response.created"))["response"]
        await c.until("response.output_audio.delta")
        await c.speak(question(1.2, "stop please what about spain"), speed=1.0)
        done = await c.until("response.done", lambda e: e["response"]["id"] == first["id"])
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        second = await c.until("response.done", lambda e: e["response"]["id"] != first["id"])
        assert second["response"]["status"] == "completed"
        await asyncio.sleep(0.5)  # the user hears the short second answer
    history = await r.history(c.session_id)
    assert [(role, interrupted) for role, _, interrupted in history] == [
        ("user", False), ("assistant", True), ("user", False), ("assistant", False)], history
    assert history[2][1] == "stop please what about spain" and history[3][1] == "Madrid."


# --- formats ------------------------------------------------------------------------------------------------------


async def test_g711_mulaw_in_and_out(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        await c.send("session.update", session={"audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": SERVER_VAD,
                      "transcription": {"model": "whisper-1"}},
            "output": {"format": {"type": "audio/pcmu"}}}})
        session = (await c.until("session.updated"))["session"]
        assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert (r.hub.live[c.session_id].settings.input_sample_rate,
                r.hub.live[c.session_id].settings.output_sample_rate) == (8000, 8000)
        await c.speak(question(), rate=8000, encode=float_to_mulaw)
        done = (await c.until("response.done"))["response"]
        assert done["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        assert len(audio_bytes(c.events, done["id"])) == 8000 * 2  # one byte per sample, 2 s
        assert c.of("conversation.item.input_audio_transcription.completed")[0]["transcript"] == QUESTION


async def test_text_only_output(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    async with r.connect() as c:
        await c.send("session.update", session={"output_modalities": ["text"]})
        await c.until("session.updated")
        await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Hi"}]})
        await c.send("response.create")
        done = (await c.until("response.done"))["response"]
        assert done["output_modalities"] == ["text"] and done["output"][0]["content"][0]["text"] == ANSWER
        assert c.of("response.output_text.done")[0]["text"] == ANSWER
        assert "".join(e["delta"] for e in c.of("response.output_text.delta")).strip() == ANSWER
        assert not c.of("response.output_audio.delta") and not c.of("response.output_audio_transcript.delta")


# --- errors ---------------------------------------------------------------------------------------------------------


async def test_protocol_errors_are_reported_and_the_session_stays_open(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(max_message_bytes=4096)
    async with r.connect() as c:
        cases: list[tuple[Any, str, str | None]] = [
            ("this is not json", "invalid_json", None),
            ("[1, 2]", "invalid_event", "type"),
            (json.dumps({"type": 5}), "invalid_event", "type"),
            (json.dumps({"type": "no.such.event", "event_id": "e7"}), "invalid_value", "type"),
            (b"\x00\x01binary", "invalid_event", None),
            (json.dumps({"type": "session.update", "session": {}, "x": 1}), "unknown_parameter", "x"),
            ("x" * 200_000, "frame_too_large", None),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%notbase64"}), "invalid_value", "audio"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01").decode()}),
             "invalid_value", "audio"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 8000).decode()}),
             "invalid_value", "audio"),
            (json.dumps({"type": "input_audio_buffer.append"}), "missing_required_parameter", "audio"),
            (json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
                         "audio_end_ms": 10}), "invalid_value", "item_id"),
            (json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}}),
             "invalid_value", "item.role"),
            (json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": " \u200b "}]}}),
             "invalid_value", "item.content"),
            (json.dumps({"type": "conversation.item.delete", "item_id": "x"}), "unsupported_event", "type"),
            (json.dumps({"type": "response.create", "response": {"conversation": "none"}}), "invalid_value",
             "response.conversation"),
            (json.dumps({"type": "response.create"}), "invalid_value", None),  # nothing to respond to yet
        ]
        for frame, code, param in cases:
            await c.ws.send(frame)
            err = await c.error(code)
            assert param is None or err["param"] == param, (frame if isinstance(frame, bytes) else frame[:80], err)
            assert err["type"] == "invalid_request_error" and err["message"], err
        assert c.of("error")[3]["error"]["event_id"] == "e7"
        # still open and working
        await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Still there?"}]})
        await c.send("response.create")
        assert (await c.until("response.done"))["response"]["status"] == "completed"


async def test_audio_over_the_session_limit_ends_the_session(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(max_stream_s=1.0)
    async with r.connect() as c:
        with contextlib.suppress(websockets.ConnectionClosed):
            await c.speak(silence(1.5), speed=50)
        err = await c.error("resource_exhausted")
        assert "audio limit" in err["message"]
        async with asyncio.timeout(5):
            await c._reader
        assert c.ws.close_code == 1008


async def test_full_replica_refuses_with_an_error_and_retry_close(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(max_sessions=1)
    async with r.connect():
        async with websockets.connect(r.url) as ws:
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert event["type"] == "error" and event["error"]["code"] == "resource_exhausted", event
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1013


async def test_api_key_is_checked_on_the_handshake(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(auth=ApiKeyAuth([KEY]))
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(r.url):
            pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"
    async with r.connect(additional_headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert c.events[0]["type"] == "session.created"
    async with r.connect(subprotocols=["realtime", KEY_SUBPROTOCOL_PREFIX + KEY]) as c:  # type: ignore[list-item]
        assert c.ws.subprotocol == "realtime"


# --- the official SDK ------------------------------------------------------------------------------------------------


async def test_openai_sdk_client_text_and_audio(rig) -> None:  # type: ignore[no-untyped-def]
    from openai import AsyncOpenAI
    from openai.types.realtime import RealtimeErrorEvent, ResponseDoneEvent, SessionCreatedEvent

    r = rig()
    client = AsyncOpenAI(api_key="sk-anything", base_url=f"http://{r.address}/v1")
    async with client.realtime.connect(model="voxserve") as conn:
        first = await asyncio.wait_for(conn.recv(), 10)
        assert isinstance(first, SessionCreatedEvent)
        await conn.session.update(session={"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 300},
            "transcription": {"model": "whisper-1"}}}})
        audio = resample(question(), RATE, 24000)
        for i in range(0, audio.size, 960):
            await conn.input_audio_buffer.append(audio=base64.b64encode(float_to_pcm16(audio[i:i + 960])).decode())
        kinds: list[str] = []
        done: ResponseDoneEvent | None = None
        async with asyncio.timeout(20):
            async for event in conn:
                kinds.append(event.type)
                if isinstance(event, ResponseDoneEvent):
                    done = event
                    break
        assert done is not None and done.response.status == "completed" and done.response.output
        assert "conversation.item.input_audio_transcription.completed" in kinds
        assert kinds.count("response.output_audio.delta") >= 10
        await conn.send_raw(json.dumps({"type": "bogus"}))
        error = await asyncio.wait_for(conn.recv(), 10)
        assert isinstance(error, RealtimeErrorEvent) and error.error.code == "invalid_value"


# --- function tools ------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


async def test_function_call_output_then_response_create_answers_with_the_result(rig) -> None:  # type: ignore[no-untyped-def]
    stages = Stages()
    stages.answers = [call("get_weather", '{"city": "Paris"}'), "It is sunny in Paris"]
    r = rig(stages)
    async with r.connect() as c:
        await c.send("session.update", session={"type": "realtime", "tools": [WEATHER_TOOL], "tool_choice": "auto"})
        updated = await c.until("session.updated")
        assert updated["session"]["tools"] == [WEATHER_TOOL] and updated["session"]["tool_choice"] == "auto"
        await c.send("conversation.item.create", item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather in paris"}]})
        await c.send("response.create")
        args = await c.until("response.function_call_arguments.done")
        assert args["name"] == "get_weather" and json.loads(args["arguments"]) == {"city": "Paris"}
        deltas = "".join(e["delta"] for e in c.of("response.function_call_arguments.delta"))
        assert deltas == args["arguments"]
        done = (await c.until("response.done"))["response"]
        assert [o["type"] for o in done["output"]] == ["function_call"]
        assert done["output"][0]["call_id"] == args["call_id"] and done["output"][0]["status"] == "completed"
        await c.send("conversation.item.create", item={"type": "function_call_output", "call_id": args["call_id"],
                                                       "output": '{"sky": "sunny"}'})
        added = await c.until("conversation.item.added", lambda e: e["item"]["type"] == "function_call_output")
        assert added["item"]["output"] == '{"sky": "sunny"}'
        await asyncio.sleep(0.2)
        assert len(c.of("response.created")) == 1  # as OpenAI: the answer waits for response.create
        await c.send("response.create")
        answer = (await c.until("response.done"))["response"]
        assert answer["output"][0]["content"][0]["transcript"] == "It is sunny in Paris"
        await c.send("conversation.item.create", item={"type": "function_call_output", "call_id": "call_nope",
                                                       "output": "{}"})
        assert (await c.error("invalid_value"))["param"] == "item.call_id"
    assert r.stages.llm_calls[1][-1] == {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": args["call_id"]}


async def test_bad_tools_are_refused_and_a_cancelled_call_is_told(rig) -> None:  # type: ignore[no-untyped-def]
    stages = Stages()
    stages.answers = [call("get_weather", '{"city": "Paris"}')]
    r = rig(stages)
    async with r.connect() as c:
        await c.send("session.update", session={"tools": [{"type": "mcp", "server_label": "x"}]})
        assert (await c.error("invalid_value"))["param"] == "session.tools[0].type"
        await c.send("session.update", session={"tools": [{**WEATHER_TOOL, "parameters": {"type": "nope"}}]})
        assert (await c.error("invalid_value"))["param"].startswith("session.tools[0]")
        await c.send("session.update", session={"tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                                                        "name": "other"}})
        assert (await c.error("invalid_value"))["param"] == "session.tool_choice"
        await c.send("session.update", session={"tools": [WEATHER_TOOL]})
        await c.until("session.updated")
        await c.send("conversation.item.create", item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather in paris"}]})
        await c.send("response.create")
        args = await c.until("response.function_call_arguments.done")
        await c.until("response.done")
        await c.send("conversation.item.create", item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "never mind"}]})
        cancelled = await c.error("function_call_cancelled")
        assert args["call_id"] in cancelled["message"]


# --- the mapping itself -----------------------------------------------------------------------------------------------


def test_every_engine_event_has_a_realtime_mapping() -> None:
    mapper = EventMapper(RealtimeConfig.initial(AppArgs()))
    samples: dict[type, ev.Event] = {
        ev.SessionStarted: ev.SessionStarted(session_id="s", output_sample_rate=24000, mode="cascade"),
        ev.SpeechStarted: ev.SpeechStarted(), ev.SpeechStopped: ev.SpeechStopped(utterance_ms=10),
        ev.InputCommitted: ev.InputCommitted(input_id=1), ev.InputCleared: ev.InputCleared(),
        ev.PartialTranscript: ev.PartialTranscript(text="a"),
        ev.FinalTranscript: ev.FinalTranscript(text="a", language="en", utterance_ms=10, input_id=1),
        ev.ResponseStarted: ev.ResponseStarted(response_id=1, input_id=1),
        ev.TextDelta: ev.TextDelta(response_id=1, text="hi"),
        ev.AudioOut: ev.AudioOut(response_id=1, pcm16=b"\0\0" * 240, sample_rate=24000, offset_ms=0),
        ev.ResponsePaused: ev.ResponsePaused(response_id=1, played_ms=5),
        ev.ResponseResumed: ev.ResponseResumed(response_id=1, reason="noise"),
        ev.ResponseDone: ev.ResponseDone(response_id=1, text="hi", audio_ms=10, latency=ev.TurnLatency()),
        ev.ResponseInterrupted: ev.ResponseInterrupted(response_id=2, heard_text="", heard_ms=0, generated_text=""),
        ev.Truncated: ev.Truncated(response_id=1, audio_end_ms=5, heard_text="h"),
        ev.ErrorEvent: ev.ErrorEvent(code="UNAVAILABLE", message="down"),
        ev.ToolCallStarted: ev.ToolCallStarted(response_id=1, call_id="call_1", name="f"),
        ev.ToolCallArguments: ev.ToolCallArguments(response_id=1, call_id="call_1", delta="{}"),
        ev.ToolCallDone: ev.ToolCallDone(response_id=1, call_id="call_1", name="f", arguments="{}"),
        ev.ToolCallCancelled: ev.ToolCallCancelled(call_id="call_1", reason="barge_in"),
        ev.ToolResultAccepted: ev.ToolResultAccepted(call_id="call_1"),
        ev.SessionMoved: ev.SessionMoved(resume_token="t.s"),
    }
    subclasses = {c for c in vars(ev).values() if isinstance(c, type) and issubclass(c, ev.Event)}
    assert subclasses - {ev.Event, ev.ResponsePayload} <= set(samples)
    for event in samples.values():
        for payload in mapper.map(event):
            check_event({**payload, "event_id": "event_1"})
    # a response that ended before the client heard of it is still announced before its done
    late = ev.ResponseInterrupted(response_id=3, heard_text="", heard_ms=0, generated_text="")
    assert [p["type"] for p in mapper.map(late)][:1] == ["response.created"]


# --- resume (issue 18) ------------------------------------------------------------------------------


async def test_a_session_resumes_with_its_token_and_a_bad_token_restores_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    from services.journal import MemoryJournal

    r = rig()
    await r.hub.open_journal(MemoryJournal())
    async with r.connect() as c:
        created = c.events[0]
        token = created["voxserve"]["resume_token"]
        assert token and created["voxserve"]["resumed"] is False
        await c.send("session.update", session={"type": "realtime", "instructions": "Answer in one word.",
                                                "tools": [{"type": "function", "name": "get_time",
                                                           "description": "The time",
                                                           "parameters": {"type": "object", "properties": {}}}]})
        await c.until("session.updated")
        await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                       "content": [{"type": "input_text", "text": "Hello there"}]})
        await c.send("response.create")
        done = await c.until("response.done")
        heard_s = len(audio_bytes(c.events, done["response"]["id"])) / 2 / 24000
        await asyncio.sleep(heard_s + 0.3)  # played to the end: the answer was heard
        first_id = c.session_id
    async with websockets.connect(r.url + "&resume_token=" + token, max_size=None) as ws:
        again = Client(ws)
        try:
            created = await again.until("session.created")
            assert created["voxserve"]["resumed"] is True and created["voxserve"]["restored_turns"] == 2
            assert created["session"]["id"] == f"sess_{first_id}"
            assert created["session"]["instructions"] == "Answer in one word."
            assert [t["name"] for t in created["session"]["tools"]] == ["get_time"]
        finally:
            await again.stop()
    for bad, code in ((token[:-3] + "xyz", "permission_denied"), ("nonsense", "permission_denied")):
        async with websockets.connect(r.url + "&resume_token=" + bad, max_size=None) as ws:
            refused = Client(ws)
            try:
                error = await refused.until("error")
                assert error["error"]["code"] == code, error
                assert not refused.of("session.created")
            finally:
                await refused.stop()

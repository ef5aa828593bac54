"""One realtime WebSocket connection: ``RealtimeSession`` drives one ``Conversation``.

A reader task validates the client's JSON events and drives the conversation; a sender task
drains the conversation's bounded outbox and writes the mapped server events (``mapper``), so
listening never waits on replying. The adapter's own replies (session.updated, errors) go
through the same outbox, so every server event keeps its order. A client mistake is an ``error``
event and the session goes on; only limits of the whole session (audio length, idle time) and a
client that is gone end it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import WebSocket
from starlette.websockets import WebSocketState

from deployments.realtime.error_events import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_RESTART,
    RealtimeError,
    error_for,
    error_payload,
)
from deployments.realtime.mapper import EventMapper, WireEvent
from deployments.realtime.schema import (
    AudioAppend,
    BareEvent,
    ItemCreate,
    ItemTruncate,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    check_item_id,
    parse_event,
    tool_output_of,
    user_text_of,
)
from deployments.realtime.session_config import RealtimeConfig, check_response_params
from deployments.session_checks import check_text
from deployments.sessions import SessionHub
from services.codecs import decoder
from services.conversation import Conversation
from services.conversation.aio import cancel_and_wait
from services.errors import DeadlineExceeded, FailedPrecondition, OutOfRange, ResourceExhausted, VoxError

log = logging.getLogger("ray.serve")

#: JSON and base64 around the largest audio chunk accepted.
FRAME_OVERHEAD_BYTES = 64 * 1024
#: How long a closing session may take to deliver its last events to a slow client.
CLOSE_DRAIN_S = 5.0


class _SessionOver(Exception):
    """The reader ends the session (a limit of the whole session, or its end) with this error."""

    def __init__(self, error: VoxError, close_code: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.close_code = close_code



class RealtimeSession:
    """One WebSocket connection driving one ``Conversation``."""

    def __init__(self, ws: WebSocket, conv: Conversation, config: RealtimeConfig, hub: SessionHub,
                 metrics: Any = None) -> None:
        self.ws = ws
        self.conv = conv
        self.config = config
        self.hub = hub
        self.args = hub.args
        self.metrics = metrics
        self.mapper = EventMapper(config, conv.session_id)
        g = self.args.gateway
        self.max_frame_chars = 4 * g.max_message_bytes // 3 + FRAME_OVERHEAD_BYTES
        self._decode = decoder(config.input_encoding)
        self._received_s = 0.0
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }
        self._unsupported = {
            "conversation.item.delete": "items cannot be deleted: the history keeps what was said and heard",
            "conversation.item.retrieve": "items cannot be retrieved: follow conversation.item.added/done",
            "output_audio_buffer.clear": "output_audio_buffer.clear is for WebRTC/SIP; over a WebSocket stop "
                                         "playback and send conversation.item.truncate",
        }

    # --- the two tasks -----------------------------------------------------------------------------

    async def run(self) -> None:
        reader = asyncio.create_task(self._read(), name="realtime-read")
        sender = asyncio.create_task(self._send(), name="realtime-send")
        moved = asyncio.create_task(self.hub.wait_moved(self.conv), name="realtime-moved")
        close_code = CLOSE_NORMAL
        try:
            await asyncio.wait({reader, sender, moved}, return_when=asyncio.FIRST_COMPLETED)
            if moved.done():  # the replica drains: session_moved reaches the client, then 1012
                close_code = CLOSE_RESTART
                await self.conv.aclose(drain=True)
                await asyncio.wait({sender}, timeout=CLOSE_DRAIN_S)
            elif reader.done() and not reader.cancelled() and isinstance(reader.exception(), _SessionOver):
                over = reader.exception()
                assert isinstance(over, _SessionOver)
                close_code = over.close_code
                await self.conv.emit(WireEvent(payload=error_for(over.error)))
                await self.conv.aclose(drain=True)  # the error reaches the client, then the stream ends
                await asyncio.wait({sender}, timeout=CLOSE_DRAIN_S)
            elif reader.done():
                reader.result()  # a bug surfaces here (logged by the adapter)
        finally:
            await self.conv.aclose()
            await cancel_and_wait(reader, sender, moved)
            if self.ws.application_state == WebSocketState.CONNECTED:
                try:
                    await self.ws.close(close_code)
                except Exception:  # the client is already gone
                    pass

    async def _send(self) -> None:
        """Sender task: the conversation's events, mapped, in order; ends when the client is gone."""
        try:
            async for event in self.conv.events():
                if self.metrics is not None:
                    self.metrics.observe(event)
                for payload in self.mapper.map(event):
                    payload["event_id"] = self.mapper.ids.new("event")
                    await self.ws.send_text(json.dumps(payload, separators=(",", ":")))
        except Exception as exc:  # the socket closed under us: nobody left to tell
            log.info("realtime session %s: sending stopped (%s)", self.conv.session_id, type(exc).__name__)

    async def _read(self) -> None:
        """Reader task: every client frame is validated and applied; a mistake is an error event."""
        timeout = self.args.gateway.client_idle_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout)
            except TimeoutError:
                raise _SessionOver(DeadlineExceeded(f"no client event for {timeout:g} s; closing the idle session"),
                                   CLOSE_NORMAL) from None
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self._reply(error_payload(
                    "invalid_event", "binary frames are not part of the protocol: send each event as a JSON text "
                    "frame (audio base64-encoded in input_audio_buffer.append)"))
                continue
            await self._dispatch(text)

    async def _dispatch(self, text: str) -> None:
        event_id: str | None = None
        try:
            if len(text) > self.max_frame_chars:
                raise RealtimeError(
                    f"event of {len(text)} bytes exceeds the {self.max_frame_chars}-byte limit; send audio in "
                    "smaller input_audio_buffer.append chunks (20-100 ms each)", "frame_too_large")
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                raise RealtimeError("the frame is not valid JSON; send one JSON object per text frame",
                                    "invalid_json") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                raise RealtimeError("an event must be a JSON object with a string 'type'", "invalid_event", "type")
            event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
            kind = obj["type"]
            handler = self._handlers.get(kind)
            if handler is None:
                if kind in self._unsupported:
                    raise RealtimeError(self._unsupported[kind], "unsupported_event", "type")
                raise RealtimeError(f"unknown event type {kind[:64]!r}; supported: {', '.join(self._handlers)}",
                                    "invalid_value", "type")
            await handler(obj)
        except _SessionOver:
            raise
        except RealtimeError as exc:
            await self._reply(error_for(exc, event_id=event_id))
        except VoxError as exc:
            if self.conv.closed:
                raise _SessionOver(exc, CLOSE_NORMAL) from None
            await self._reply(error_for(exc, event_id=event_id))
        except Exception as exc:  # a bug: logged; the client gets an error and the session goes on
            log.exception("realtime session %s: event failed", self.conv.session_id)
            await self._reply(error_for(exc, event_id=event_id))

    async def _reply(self, payload: dict[str, Any]) -> None:
        if payload.get("type") == "error" and self.metrics is not None:
            self.metrics.error(str(payload["error"]["code"]), where="realtime")
        await self.conv.emit(WireEvent(payload=payload))

    # --- client events ----------------------------------------------------------------------------------

    async def _session_update(self, obj: dict[str, Any]) -> None:
        event = parse_event(SessionUpdate, obj)
        config = self.config.updated(event.session)
        settings = config.settings()
        if settings.system_prompt and settings.system_prompt != self.conv.settings.system_prompt:
            try:
                await self.hub.check_system_prompt(settings.system_prompt)
            except OutOfRange as exc:  # too many tokens (a stage failing is a server error)
                raise RealtimeError(exc.message, "invalid_value", "session.instructions") from None
        await self.conv.update_settings(settings)
        self.config = self.mapper.config = config
        self._decode = decoder(config.input_encoding)
        await self._reply(self.mapper.session_updated())

    async def _append(self, obj: dict[str, Any]) -> None:
        event = parse_event(AudioAppend, obj)
        g = self.args.gateway
        if len(event.audio) > 4 * g.max_message_bytes // 3 + 4:
            raise RealtimeError(f"audio chunk exceeds {g.max_message_bytes} bytes; send 20-100 ms per append",
                                "invalid_value", "audio")
        try:
            data = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("audio is not valid base64", "invalid_value", "audio") from None
        try:
            samples = self._decode(data)
        except VoxError as exc:
            raise RealtimeError(exc.message, "invalid_value", "audio") from None
        if not samples.size:
            return
        self._received_s += samples.size / self.config.input_rate
        if self._received_s > g.max_stream_s:
            raise _SessionOver(ResourceExhausted(f"session exceeded its {g.max_stream_s:.0f} s audio limit"),
                               CLOSE_POLICY)
        await self.conv.push_audio(np.asarray(samples, np.float32))

    async def _commit(self, obj: dict[str, Any]) -> None:
        parse_event(BareEvent, obj)
        try:
            await self.conv.commit_audio()
        except FailedPrecondition as exc:
            if self.conv.closed:
                raise
            raise RealtimeError(exc.message, "input_audio_buffer_commit_empty") from None

    async def _clear(self, obj: dict[str, Any]) -> None:
        parse_event(BareEvent, obj)
        await self.conv.clear_audio()

    async def _item_create(self, obj: dict[str, Any]) -> None:
        event = parse_event(ItemCreate, obj)
        if event.previous_item_id not in (None, "root") and event.previous_item_id != self.mapper.last_item:
            raise RealtimeError("items can only be appended: previous_item_id must be the newest item (or null)",
                                "invalid_value", "previous_item_id")
        if event.item.id is not None:
            check_item_id(event.item.id, "item.id")
        if event.item.type == "function_call_output":
            await self._tool_output(event.item.id, *tool_output_of(event.item))
            return
        try:
            text = check_text(user_text_of(event.item), self.args.gateway.max_text_chars)
        except RealtimeError:
            raise
        except VoxError as exc:
            raise RealtimeError(exc.message, "invalid_value", "item.content") from None
        item_id = self.mapper.expect_text_item(event.item.id)
        try:
            await self.conv.push_text(text, respond=False)
        except BaseException:
            self.mapper.forget_text_item(item_id)
            raise

    async def _tool_output(self, item_id: str | None, call_id: str, output: str) -> None:
        """A function's result: into the history after its call; response.create asks for the answer."""
        item = self.mapper.expect_tool_output(call_id, item_id, output)
        try:
            await self.conv.submit_tool_result(call_id, output)
        except VoxError as exc:
            self.mapper.forget_tool_output(call_id, item)
            if self.conv.closed:
                raise
            param = "item.output" if exc.code == "INVALID_ARGUMENT" else "item.call_id"
            raise RealtimeError(exc.message, "invalid_value", param) from None

    async def _truncate(self, obj: dict[str, Any]) -> None:
        event = parse_event(ItemTruncate, obj)
        if event.content_index != 0:
            raise RealtimeError("content_index must be 0 (an answer has one audio part)", "invalid_value",
                                "content_index")
        rid = self.mapper.response_of_item(event.item_id)
        try:
            await self.conv.truncate(rid, event.audio_end_ms)
        except VoxError as exc:
            if self.conv.closed:
                raise
            raise RealtimeError(exc.message, "invalid_value", "audio_end_ms" if exc.code == "OUT_OF_RANGE"
                                else "item_id") from None

    async def _response_create(self, obj: dict[str, Any]) -> None:
        event = parse_event(ResponseCreate, obj)
        check_response_params(event.response)
        if self.conv.response_in_progress and not self.conv.filler_in_progress:  # a filler: answered after it
            raise RealtimeError("a response is already in progress; wait for response.done or send response.cancel",
                                "conversation_already_has_active_response")
        try:
            await self.conv.create_response()
        except FailedPrecondition as exc:
            if self.conv.closed:
                raise
            raise RealtimeError(exc.message, "invalid_value") from None

    async def _response_cancel(self, obj: dict[str, Any]) -> None:
        event = parse_event(ResponseCancel, obj)
        current = self.mapper.current
        if event.response_id is not None and (current is None or event.response_id != current.id):
            raise RealtimeError(f"response {event.response_id!r} is not in progress", "response_cancel_not_active",
                                "response_id")
        if not self.conv.response_in_progress:
            raise RealtimeError("no response is in progress", "response_cancel_not_active")
        await self.conv.cancel_response()

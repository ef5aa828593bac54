"""The OpenAI-Realtime-compatible WebSocket endpoint ``/v1/realtime`` and the browser page at ``/``:
a second thin protocol adapter over the same conversation engine and ``SessionHub`` as gRPC
``Converse``.

The FastAPI ``app`` is the Gateway deployment's ingress (``@serve.ingress(app)``): Serve's HTTP
proxy routes HTTP and WebSocket requests to it while the gRPC methods stay on Serve's gRPC proxy.
Each connection is one ``RealtimeSession``: a reader task that validates the client's JSON events
and drives the ``Conversation``, and a sender task that drains the conversation's bounded outbox
and writes the mapped server events (``deployments.realtime_protocol``), so listening never waits
on replying. The adapter's own replies (session.updated, errors) go through the same outbox, so
every server event keeps its order. A client mistake is an ``error`` event and the session goes
on; only limits of the whole session (audio length, idle time) and a client that is gone end it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.websockets import WebSocketState

from deployments.auth import WWW_AUTHENTICATE, ApiKeyAuth
from deployments.config import AppArgs
from deployments.protocol import check_text
from deployments.realtime_protocol import (
    AudioAppend,
    BareEvent,
    EventMapper,
    ItemCreate,
    ItemTruncate,
    RealtimeConfig,
    RealtimeError,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    WireEvent,
    check_item_id,
    check_response_params,
    error_for,
    error_payload,
    parse_event,
    user_text_of,
)
from deployments.sessions import SessionHub
from services.codecs import decoder
from services.conversation import Conversation
from services.conversation.aio import cancel_and_wait
from services.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VoxError,
    to_vox_error,
)

log = logging.getLogger("ray.serve")

REALTIME_PATH = "/v1/realtime"
WEB_DIR = Path(__file__).resolve().parent / "web"
#: Files of the browser page, by the name they are served under (/web/<name>).
_WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
              ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
#: JSON and base64 around the largest audio chunk accepted.
FRAME_OVERHEAD_BYTES = 64 * 1024
#: How long a closing session may take to deliver its last events to a slow client.
CLOSE_DRAIN_S = 5.0
#: WebSocket close codes (RFC 6455): normal, policy violation, internal error, try again later.
CLOSE_NORMAL, CLOSE_POLICY, CLOSE_ERROR, CLOSE_RETRY = 1000, 1008, 1011, 1013


class _SessionOver(Exception):
    """The reader ends the session (a limit of the whole session, or its end) with this error."""

    def __init__(self, error: VoxError, close_code: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.close_code = close_code


def close_code_for(err: VoxError) -> int:
    if err.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        return CLOSE_RETRY
    if err.code in ("INTERNAL", "UNKNOWN"):
        return CLOSE_ERROR
    return CLOSE_POLICY


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
        close_code = CLOSE_NORMAL
        try:
            await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and isinstance(reader.exception(), _SessionOver):
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
            await cancel_and_wait(reader, sender)
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
        if self.conv.response_in_progress:
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


class RealtimeAdapter:
    """The realtime endpoint of one gateway replica: authentication, admission, sessions."""

    def __init__(self, args: AppArgs, hub: SessionHub, auth: ApiKeyAuth, metrics: Any = None) -> None:
        self.args = args
        self.hub = hub
        self.auth = auth
        self.metrics = metrics

    async def handle(self, ws: WebSocket) -> None:
        try:
            subprotocol = self.auth.check_websocket_headers(
                ws.headers, ws.query_params, ws.scope.get("subprotocols", []),
                client_host=ws.client.host if ws.client else None)
        except Unauthenticated as exc:
            await _deny(ws, exc)
            return
        await ws.accept(subprotocol=subprotocol)
        if self.metrics is not None:
            self.metrics.session_started()
        status = "OK"
        try:
            info = await self.hub.stage_info()
            config = RealtimeConfig.initial(self.args, model=ws.query_params.get("model"),
                                            speech_native_available=bool(info.get("speech_native")))
            async with self.hub.session(config.settings()) as conv:
                await RealtimeSession(ws, conv, config, self.hub, self.metrics).run()
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            err = to_vox_error(exc)
            status = err.code
            if err.code == "INTERNAL":
                log.exception("realtime session failed")
            await _send_and_close(ws, error_for(err), close_code_for(err))
        finally:
            if self.metrics is not None:
                self.metrics.session_ended(status)


async def _deny(ws: WebSocket, exc: Unauthenticated) -> None:
    """HTTP 401 before the handshake completes (or a policy close where the server cannot send one)."""
    body = error_payload("invalid_api_key", exc.message)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse(body, status_code=401,
                                                   headers={"WWW-Authenticate": WWW_AUTHENTICATE}))
    else:
        await ws.close(CLOSE_POLICY, reason="unauthenticated")


async def _send_and_close(ws: WebSocket, payload: dict[str, Any], code: int) -> None:
    if ws.application_state != WebSocketState.CONNECTED:
        return
    try:
        await ws.send_text(json.dumps({**payload, "event_id": "event_0"}))
        await ws.close(code)
    except Exception:  # the client is gone
        pass


# --- the ASGI app ------------------------------------------------------------------------------------


def create_app(adapter_for: Callable[[], RealtimeAdapter | None]) -> FastAPI:
    """The HTTP/WebSocket app: the page at ``/``, its files under ``/web/``, and ``/v1/realtime``.

    ``adapter_for`` returns the adapter of the process serving the request (a replica's Gateway,
    or a test's own).
    """
    app = FastAPI(title="voxserve", docs_url=None, redoc_url=None, openapi_url=None)
    web_files = {p.name: p for p in WEB_DIR.iterdir() if p.suffix in _WEB_TYPES} if WEB_DIR.is_dir() else {}

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        if "index.html" not in web_files:
            return JSONResponse({"error": "the browser page is not installed"}, status_code=404)
        return FileResponse(web_files["index.html"], media_type=_WEB_TYPES[".html"],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/web/{name}", include_in_schema=False)
    async def web_file(name: str) -> Response:
        path = web_files.get(name)  # only the page's own files: no path ever reaches the disk
        if path is None:
            return JSONResponse({"error": f"no file {name!r}"}, status_code=404)
        return FileResponse(path, media_type=_WEB_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})

    @app.websocket(REALTIME_PATH)
    async def realtime(ws: WebSocket) -> None:
        adapter = adapter_for()
        if adapter is None:
            await ws.accept()
            await _send_and_close(ws, error_for(Unavailable("the gateway is starting; retry shortly")), CLOSE_RETRY)
            return
        await adapter.handle(ws)

    return app


def _replica_adapter() -> RealtimeAdapter | None:
    """The adapter of this Serve replica (the Gateway instance builds it in its constructor)."""
    from ray import serve

    try:
        gateway = serve.get_replica_context().servable_object
    except Exception:  # not inside a replica (yet)
        return None
    adapter = getattr(gateway, "realtime", None)
    return adapter if isinstance(adapter, RealtimeAdapter) else None


#: The Gateway deployment's ingress app.
app = create_app(_replica_adapter)

"""The realtime transport's HTTP side: the OpenAI-Realtime-compatible WebSocket ``/v1/realtime``
and the browser page at ``/``, a second thin protocol adapter over the same conversation engine
and ``SessionHub`` as gRPC ``Converse``.

The FastAPI ``app`` is the Gateway deployment's ingress (``@serve.ingress(app)``): Serve's HTTP
proxy routes HTTP and WebSocket requests to it while the gRPC methods stay on Serve's gRPC proxy.
``RealtimeAdapter`` authenticates and admits each connection and runs it as a ``RealtimeSession``
(``connection``). docs/realtime.md lists the supported subset and every deviation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.websockets import WebSocketState

from deployments.auth import WWW_AUTHENTICATE, ApiKeyAuth
from deployments.config import AppArgs
from deployments.realtime.connection import RealtimeSession
from deployments.realtime.error_events import CLOSE_POLICY, CLOSE_RETRY, close_code_for, error_for, error_payload
from deployments.realtime.session_config import RealtimeConfig
from deployments.sessions import SessionHub
from services.conversation.snapshot import restore_settings
from services.errors import Unauthenticated, Unavailable, to_vox_error

log = logging.getLogger("ray.serve")

REALTIME_PATH = "/v1/realtime"
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
#: Files of the browser page, by the name they are served under (/web/<name>).
_WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
              ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


class RealtimeAdapter:
    """The realtime endpoint of one gateway replica: authentication, admission, sessions."""

    def __init__(self, args: AppArgs, hub: SessionHub, auth: ApiKeyAuth, metrics: Any = None) -> None:
        self.args = args
        self.hub = hub
        self.auth = auth
        self.metrics = metrics

    async def handle(self, ws: WebSocket) -> None:
        try:
            subprotocol, owner = self.auth.websocket_credentials(
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
            restored = None
            if token := ws.query_params.get("resume_token"):
                restored = await self.hub.resume(token, owner)
                config.restore(restore_settings(restored))
            async with self.hub.session(config.settings(), owner=owner, restored=restored) as conv:
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

"""deployments.auth: API keys from config and environment, checked on gRPC metadata and on
WebSocket handshakes (header, OpenAI's browser subprotocol, optional query parameter)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio

from deployments.auth import (
    DEFAULT_KEYS_ENV,
    KEY_SUBPROTOCOL_PREFIX,
    PUBLIC_GRPC_METHODS,
    WWW_AUTHENTICATE,
    ApiKeyAuth,
    AuthConfig,
    choose_subprotocol,
    is_loopback,
    key_id,
    load_keys,
    open_server_warning,
    parse_keys,
)
from deployments.config import AppArgs
from services.errors import FailedPrecondition, InvalidArgument, Unauthenticated, VoxError

KEY = "k" * 8 + "-Abc.123_~xyz"  # 21 token characters
OTHER = "0123456789abcdef0123456789abcdef"
ENV_KEY = "env-key-0123456789"
SECRETS = (KEY, OTHER, ENV_KEY, "wrong-key-0123456789", "short")


def no_secret_in(exc: BaseException) -> None:
    text = f"{exc} {exc!r} {getattr(exc, 'message', '')}"
    for secret in SECRETS:
        assert secret not in text, f"error message leaks a key: {text}"


def rejected(fn: Any, *args: Any, match: str, **kwargs: Any) -> VoxError:
    with pytest.raises(Unauthenticated, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.code == "UNAUTHENTICATED"
    no_secret_in(info.value)
    return info.value


@pytest.fixture()
def auth() -> ApiKeyAuth:
    return ApiKeyAuth([KEY, OTHER])


# --- configuration --------------------------------------------------------------------------------

def test_defaults_mean_auth_off() -> None:
    cfg = AuthConfig()
    assert cfg.api_keys == [] and cfg.api_keys_env == DEFAULT_KEYS_ENV == "VOXSERVE_API_KEYS"
    assert not cfg.required and not cfg.allow_unauthenticated_loopback and not cfg.allow_query_param
    assert load_keys(cfg, {}) == frozenset()
    off = ApiKeyAuth.from_config(cfg, {})
    assert not off.enabled
    off.check_grpc_metadata([])
    assert off.check_websocket_headers({}, {}, ["realtime"]) == "realtime"
    assert AppArgs().auth == AuthConfig()  # the app's config carries it, off by default


def test_keys_from_config_and_env() -> None:
    cfg = AuthConfig(api_keys=[KEY])
    assert load_keys(cfg, {}) == {KEY}
    assert load_keys(cfg, {DEFAULT_KEYS_ENV: f" {OTHER} ,, {ENV_KEY},"}) == {KEY, OTHER, ENV_KEY}
    assert load_keys(AuthConfig(), {DEFAULT_KEYS_ENV: ENV_KEY}) == {ENV_KEY}
    assert load_keys(AuthConfig(api_keys_env="MY_KEYS"), {"MY_KEYS": ENV_KEY, DEFAULT_KEYS_ENV: OTHER}) == {ENV_KEY}
    assert load_keys(AuthConfig(api_keys_env=""), {DEFAULT_KEYS_ENV: OTHER}) == frozenset()
    assert parse_keys(" a, b ,,c ") == ["a", "b", "c"]


def test_keys_from_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEFAULT_KEYS_ENV, ENV_KEY)
    auth = ApiKeyAuth.from_config(AuthConfig())
    assert auth.enabled
    auth.check_grpc_metadata([("authorization", f"Bearer {ENV_KEY}")])
    rejected(auth.check_grpc_metadata, [("authorization", f"Bearer {KEY}")], match="invalid")


def test_fail_closed_configurations() -> None:
    with pytest.raises(FailedPrecondition, match="VOXSERVE_API_KEYS is set but holds no API key") as info:
        load_keys(AuthConfig(), {DEFAULT_KEYS_ENV: " , "})
    no_secret_in(info.value)
    with pytest.raises(FailedPrecondition, match=r"auth\.required"):
        load_keys(AuthConfig(required=True), {})
    assert load_keys(AuthConfig(required=True), {DEFAULT_KEYS_ENV: ENV_KEY}) == {ENV_KEY}


@pytest.mark.parametrize(("bad", "match"), [
    ("short", "at least 16"),
    ("has a space in it 0123", "characters"),
    ("base64/with+slash=0123456", "characters"),
    ("ünïcode-key-0123456789", "characters"),
])
def test_malformed_keys_are_refused_without_echo(bad: str, match: str) -> None:
    for cfg, env, where in ((AuthConfig(api_keys=[KEY, bad]), {}, r"auth.api_keys\[1\]"),
                            (AuthConfig(), {DEFAULT_KEYS_ENV: f"{KEY},{bad}"}, r"key 2 of \$VOXSERVE_API_KEYS")):
        with pytest.raises(InvalidArgument, match=match) as info:
            load_keys(cfg, env)
        assert bad not in str(info.value) and KEY not in str(info.value)
        assert info.match(where)


def test_config_does_not_print_keys() -> None:
    cfg = AuthConfig(api_keys=[KEY])
    assert KEY not in repr(cfg) and KEY not in str(cfg)
    assert KEY not in repr(AppArgs(auth=cfg))
    assert KEY not in repr(ApiKeyAuth([KEY]))
    assert key_id(KEY).startswith("sha256:") and KEY not in key_id(KEY)
    assert key_id(KEY) == key_id(KEY) != key_id(OTHER)
    with pytest.raises(ValueError, match="extra"):
        AuthConfig.model_validate({"api_key": KEY})


# --- gRPC metadata --------------------------------------------------------------------------------

def test_grpc_accepts_bearer(auth: ApiKeyAuth) -> None:
    for md in ([("authorization", f"Bearer {KEY}")],
               [("Authorization", f"bearer {OTHER}")],  # names and scheme are case-insensitive
               [("authorization", f"  BEARER   {KEY}  ")],
               [("authorization", f"Bearer {KEY}".encode())],  # bytes values
               [("x-request-id", "1"), ("authorization", "Bearer nope-nope-nope-nope"),
                ("authorization", f"Bearer {OTHER}")],  # any valid one of several
               (("application", "voxserve"), ("authorization", f"Bearer {KEY}"))):
        auth.check_grpc_metadata(md)


def test_grpc_rejections(auth: ApiKeyAuth) -> None:
    rejected(auth.check_grpc_metadata, [], match="missing API key")
    rejected(auth.check_grpc_metadata, None, match="missing API key")
    rejected(auth.check_grpc_metadata, [("x-api-key", KEY)], match="missing API key")
    rejected(auth.check_grpc_metadata, [("authorization", "Bearer wrong-key-0123456789")], match="invalid API key")
    rejected(auth.check_grpc_metadata, [("authorization", f"Bearer {KEY}x")], match="invalid API key")
    rejected(auth.check_grpc_metadata, [("authorization", f"Bearer {KEY[:-1]}")], match="invalid API key")
    rejected(auth.check_grpc_metadata, [("authorization", f"Basic {KEY}")], match="'Bearer <API key>'")
    rejected(auth.check_grpc_metadata, [("authorization", KEY)], match="'Bearer <API key>'")
    rejected(auth.check_grpc_metadata, [("authorization", "Bearer")], match="'Bearer <API key>'")
    rejected(auth.check_grpc_metadata, [("authorization", f"Bearer {KEY} extra")], match="'Bearer <API key>'")


def test_loopback_exemption() -> None:
    strict = ApiKeyAuth([KEY])
    relaxed = ApiKeyAuth([KEY], allow_unauthenticated_loopback=True)
    for peer in ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000", "unix:/tmp/s"):
        assert is_loopback(peer)
        relaxed.check_grpc_metadata([], peer=peer)
        rejected(strict.check_grpc_metadata, [], peer=peer, match="missing")
    remote: tuple[str | None, ...] = ("ipv4:10.0.0.7:5000", "ipv6:%5B2001:db8::1%5D:1", "garbage", "", None)
    for other in remote:
        assert not is_loopback(other)
        rejected(relaxed.check_grpc_metadata, [], peer=other, match="missing")
    assert is_loopback("127.0.0.2") and is_loopback("::ffff:127.0.0.1") and not is_loopback("192.168.1.2")
    relaxed.check_websocket_headers({}, client_host="127.0.0.1")
    rejected(relaxed.check_websocket_headers, {}, client_host="10.1.2.3", match="missing")
    assert ApiKeyAuth.from_config(AuthConfig(api_keys=[KEY], allow_unauthenticated_loopback=True),
                                  {}).allow_unauthenticated_loopback


def test_health_methods_are_public() -> None:
    assert PUBLIC_GRPC_METHODS == {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}


# --- WebSocket handshake --------------------------------------------------------------------------

def test_websocket_header(auth: ApiKeyAuth) -> None:
    assert auth.check_websocket_headers({"Authorization": f"Bearer {KEY}"}) is None
    assert auth.check_websocket_headers([(b"authorization", f"Bearer {OTHER}".encode())], {}, []) is None
    rejected(auth.check_websocket_headers, {"authorization": "Bearer wrong-key-0123456789"}, match="invalid")
    rejected(auth.check_websocket_headers, {"authorization": f"Token {KEY}"}, match="Bearer")
    rejected(auth.check_websocket_headers, {"host": "x"}, {}, ["realtime"], match="missing API key")


def test_websocket_subprotocol_key(auth: ApiKeyAuth) -> None:
    offered = ["realtime", KEY_SUBPROTOCOL_PREFIX + KEY, "openai-beta.realtime-v1"]
    assert auth.check_websocket_headers({}, {}, offered) == "realtime"
    # offered only through the raw header: parsed from Sec-WebSocket-Protocol
    raw = {"sec-websocket-protocol": f"realtime, {KEY_SUBPROTOCOL_PREFIX}{OTHER}"}
    assert auth.check_websocket_headers(raw) == "realtime"
    # no 'realtime' offered: the first subprotocol that carries no key, never the key one
    assert auth.check_websocket_headers({}, {}, [KEY_SUBPROTOCOL_PREFIX + KEY, "openai-beta.realtime-v1"]) \
        == "openai-beta.realtime-v1"
    assert auth.check_websocket_headers({}, {}, [KEY_SUBPROTOCOL_PREFIX + KEY]) is None
    rejected(auth.check_websocket_headers, {}, {}, ["realtime", KEY_SUBPROTOCOL_PREFIX + "wrong-key-0123456789"],
             match="invalid")
    rejected(auth.check_websocket_headers, {}, {}, ["realtime", "openai-insecure-api-key"], match="missing")


def test_websocket_query_param_only_when_allowed(auth: ApiKeyAuth) -> None:
    rejected(auth.check_websocket_headers, {}, {"api_key": KEY}, [], match="missing")
    allowed = ApiKeyAuth([KEY], allow_query_param=True)
    assert allowed.check_websocket_headers({}, {"api_key": KEY}, []) is None
    rejected(allowed.check_websocket_headers, {}, {"api_key": "wrong-key-0123456789"}, [], match="invalid")
    rejected(allowed.check_websocket_headers, {}, {"key": KEY}, [], match="missing")


def test_choose_subprotocol() -> None:
    assert choose_subprotocol([]) is None
    assert choose_subprotocol(["x", "realtime"]) == "realtime"
    assert choose_subprotocol([" x "]) == "x"
    assert choose_subprotocol([KEY_SUBPROTOCOL_PREFIX + KEY]) is None


def test_open_server_warning() -> None:
    off, on = ApiKeyAuth(), ApiKeyAuth([KEY])
    assert open_server_warning(off, "127.0.0.1") is None
    assert open_server_warning(off, "localhost") is None
    assert open_server_warning(on, "0.0.0.0") is None
    warning = open_server_warning(off, "0.0.0.0")
    assert warning and "VOXSERVE_API_KEYS" in warning


# --- through real transports ----------------------------------------------------------------------

async def test_grpc_status_through_a_real_channel() -> None:
    """A real grpc.aio server whose handler checks keys the way the gateway should."""
    auth = ApiKeyAuth([KEY])

    async def handler(request: bytes, context: aio.ServicerContext) -> bytes:
        try:
            auth.check_grpc_metadata(context.invocation_metadata(), peer=context.peer())
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        return b"ok"

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(handler)

    server = aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_generic_rpc_handlers([Handler()])
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/voxserve.v1.VoiceAssistant/Synthesize")
            assert await call(b"", metadata=(("authorization", f"Bearer {KEY}"),), timeout=10) == b"ok"
            for metadata, needle in ((None, "missing API key"),
                                     ((("authorization", f"Bearer {OTHER}"),), "invalid API key")):
                with pytest.raises(aio.AioRpcError) as info:
                    await call(b"", metadata=metadata, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert needle in (info.value.details() or "")
                assert OTHER not in (info.value.details() or "")
    finally:
        await server.stop(None)


def test_websocket_handshake_through_starlette() -> None:
    """The pattern the realtime endpoint uses: check before accept, 401 (or close) on failure,
    accept with the chosen subprotocol."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket, WebSocketDisconnect

    auth = ApiKeyAuth([KEY])

    async def endpoint(ws: WebSocket) -> None:
        try:
            chosen = auth.check_websocket_headers(ws.headers, ws.query_params, ws.scope.get("subprotocols", []),
                                                  client_host=ws.client.host if ws.client else None)
        except Unauthenticated as exc:
            body = {"type": "error", "error": {"type": "invalid_request_error", "code": "unauthenticated",
                                               "message": exc.message}}
            await ws.send_denial_response(
                JSONResponse(body, status_code=401, headers={"WWW-Authenticate": WWW_AUTHENTICATE}))
            return
        await ws.accept(subprotocol=chosen)
        await ws.send_text("hello")
        await ws.close()

    client = TestClient(Starlette(routes=[WebSocketRoute("/v1/realtime", endpoint)]))
    with client.websocket_connect("/v1/realtime", headers={"Authorization": f"Bearer {KEY}"}) as ws:
        assert ws.receive_text() == "hello"
    with client.websocket_connect("/v1/realtime", subprotocols=["realtime", KEY_SUBPROTOCOL_PREFIX + KEY]) as ws:
        assert ws.accepted_subprotocol == "realtime"
        assert ws.receive_text() == "hello"
    from starlette.testclient import WebSocketDenialResponse

    with pytest.raises(WebSocketDenialResponse) as info, \
            client.websocket_connect("/v1/realtime", headers={"Authorization": f"Bearer {OTHER}"}):
        pass
    assert info.value.status_code == 401
    assert info.value.headers["www-authenticate"] == WWW_AUTHENTICATE
    assert info.value.json()["error"]["message"] == "invalid API key"
    with pytest.raises((WebSocketDenialResponse, WebSocketDisconnect)), client.websocket_connect("/v1/realtime"):
        pass

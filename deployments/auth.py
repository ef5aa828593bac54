"""API keys for voxserve's public endpoints: gRPC (Converse, Transcribe, Synthesize) and the
OpenAI-Realtime WebSocket.

Keys come from the app config (``AuthConfig.api_keys``) and from an environment variable
(``VOXSERVE_API_KEYS``, comma-separated; the Helm chart fills it from a Kubernetes Secret). No key
configured = authentication off, fine for a server bound to loopback (``voxserve serve``'s
default). With keys, a client presents one as:

- gRPC metadata ``authorization: Bearer <key>``;
- WebSocket handshake header ``Authorization: Bearer <key>`` (the official ``openai`` Python SDK
  sends its ``api_key`` this way), or the subprotocol ``openai-insecure-api-key.<key>`` (what
  browsers and the ``openai`` JS SDK send, since a browser cannot set headers on a WebSocket),
  or, only when ``allow_query_param`` is on, ``?api_key=<key>``.

Health checks are never authenticated: ``grpc.health.v1.Health`` (kubelet gRPC probes send no
metadata) and Serve's own HTTP ``/-/healthz`` and ``/-/routes``; Ray's Prometheus metrics port is
a separate server. Keys are compared in constant time (hmac.compare_digest over SHA-256
digests, so neither the content nor the length of a key leaks through timing), and no error
message or log line contains a key: ``key_id`` gives a short fingerprint for logs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field

from services.errors import FailedPrecondition, InvalidArgument, Unauthenticated

#: Environment variable read for keys by default (comma-separated).
DEFAULT_KEYS_ENV = "VOXSERVE_API_KEYS"
#: WebSocket subprotocol prefix that carries a key (OpenAI's browser convention).
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
#: The subprotocol OpenAI Realtime clients offer; echoed back when offered.
REALTIME_SUBPROTOCOL = "realtime"
#: Query parameter read when ``AuthConfig.allow_query_param`` is on.
KEY_QUERY_PARAM = "api_key"
#: gRPC methods that never need a key (probes and load balancers cannot send one).
PUBLIC_GRPC_METHODS: frozenset[str] = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})
#: Value of the ``WWW-Authenticate`` header of an HTTP 401 answer (RFC 6750).
WWW_AUTHENTICATE = 'Bearer realm="voxserve"'
#: Shortest key accepted: a guessable key is worse than none, since it looks safe.
MIN_KEY_CHARS = 16
# RFC 7230 token characters: a key must fit in an HTTP header *and* in a WebSocket subprotocol
# name, which excludes spaces, commas, '/', '=' and other separators (base64url is fine).
_KEY_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_BEARER_RE = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_MISSING = ("missing API key: send 'authorization: Bearer <key>' (gRPC metadata or HTTP header)"
            ", or the WebSocket subprotocol 'openai-insecure-api-key.<key>'")


class AuthConfig(BaseModel):
    """Who may call the public endpoints. No key from either source = authentication off."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(
        default_factory=list, repr=False,
        description="Accepted API keys written in the config (prefer api_keys_env: a Serve config is "
                    "not a secret). Each key: at least 16 characters, letters, digits and -._~+!#$%&'*^`| "
                    "(e.g. `openssl rand -hex 32`).")
    api_keys_env: str = Field(
        DEFAULT_KEYS_ENV,
        description="Environment variable holding more accepted keys, comma-separated (the Helm chart "
                    "sets it from a Kubernetes Secret); '' = read no variable. Set but empty = refuse "
                    "to start.")
    required: bool = Field(
        False, description="Refuse to start when no key is configured, instead of serving without "
                           "authentication (set it for servers reachable beyond loopback).")
    allow_unauthenticated_loopback: bool = Field(
        False, description="With keys set, still accept calls without a key from loopback peers "
                           "(127.0.0.0/8, ::1), e.g. a sidecar; note that kubectl port-forward also "
                           "arrives from loopback.")
    allow_query_param: bool = Field(
        False, description="Also accept the key as `?api_key=<key>` on the WebSocket URL, for clients "
                           "that can set neither headers nor subprotocols (some telephony media "
                           "gateways); off by default because URLs end up in access logs.")


def key_id(key: str) -> str:
    """A short fingerprint of a key, safe to log (``sha256:`` + 8 hex digits)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def owner_id(key: str) -> str:
    """Who a key is, for binding resume tokens to it (a digest: the key itself is never stored)."""
    return "key:" + hashlib.sha256(b"voxserve-owner:" + key.encode()).hexdigest()[:32]


def parse_keys(text: str) -> list[str]:
    """Comma-separated keys; surrounding whitespace and empty entries are dropped."""
    return [k.strip() for k in text.split(",") if k.strip()]


def _check_key(key: str, where: str) -> str:
    # Messages name the source and position of a bad key, never the key itself.
    if len(key) < MIN_KEY_CHARS:
        raise InvalidArgument(f"{where} is {len(key)} characters long; API keys need at least "
                              f"{MIN_KEY_CHARS} (generate one with `openssl rand -hex 32`)")
    if not _KEY_RE.match(key):
        raise InvalidArgument(f"{where} contains characters that cannot travel in an HTTP header or a "
                              "WebSocket subprotocol; use letters, digits and -._~ (e.g. `openssl rand "
                              "-hex 32`)")
    return key


def load_keys(cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The accepted keys: ``cfg.api_keys`` plus the keys in ``$<cfg.api_keys_env>``.

    Raises InvalidArgument for a malformed key and FailedPrecondition when the variable is set but
    holds no key (a Secret that lost its value must not open the server) or when ``cfg.required``
    and no key is configured at all.
    """
    env = os.environ if environ is None else environ
    keys = [_check_key(k, f"auth.api_keys[{i}]") for i, k in enumerate(cfg.api_keys)]
    if cfg.api_keys_env and cfg.api_keys_env in env:
        from_env = parse_keys(env[cfg.api_keys_env])
        if not from_env:
            raise FailedPrecondition(
                f"environment variable {cfg.api_keys_env} is set but holds no API key; put one or more "
                f"comma-separated keys in it (its Kubernetes Secret may be empty), or unset it")
        keys += [_check_key(k, f"key {i + 1} of ${cfg.api_keys_env}") for i, k in enumerate(from_env)]
    if cfg.required and not keys:
        raise FailedPrecondition(
            "auth.required is set but no API key is configured: set "
            + (f"the environment variable {cfg.api_keys_env} (comma-separated keys) or " if cfg.api_keys_env
               else "")
            + "auth.api_keys")
    return frozenset(keys)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def _pairs(items: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None) -> list[tuple[str, str]]:
    """(lower-case name, value) pairs from a mapping, a header object with .items() (all repeated
    values included, as Starlette's Headers gives them) or an iterable of pairs (gRPC metadata,
    raw ASGI headers)."""
    if items is None:
        return []
    seq = items.items() if hasattr(items, "items") else items
    return [(_text(k).lower(), _text(v)) for k, v in seq]


def is_loopback(address: str | None) -> bool:
    """True for a loopback host or gRPC peer string ('127.0.0.1', '::1', 'ipv4:127.0.0.1:5000',
    'ipv6:[::1]:5000', 'unix:...'); False for anything else, including unparsable input."""
    if not address:
        return False
    host = unquote(address)  # newer gRPC versions percent-encode the brackets: ipv6:%5B::1%5D:5000
    if host.startswith("unix:") or host.startswith("unix-abstract:"):
        return True
    if host.startswith("ipv4:"):
        host = host[5:].rsplit(":", 1)[0]
    elif host.startswith("ipv6:"):
        host = host[5:]
        host = host[1:].split("]", 1)[0] if host.startswith("[") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol to accept: 'realtime' when offered, else the first offered one that does not
    carry a key (a key is never echoed back), else None. Browsers fail a handshake that offered
    subprotocols and got none back, so key-carrying clients must also offer 'realtime' (the
    openai JS SDK does)."""
    names = [p.strip() for p in offered if p.strip()]
    if REALTIME_SUBPROTOCOL in names:
        return REALTIME_SUBPROTOCOL
    return next((p for p in names if not p.startswith(KEY_SUBPROTOCOL_PREFIX)), None)


class ApiKeyAuth:
    """Checks credentials against a fixed set of keys; build one per gateway replica at start-up.

    ``enabled`` is False when no key is configured: then every check passes.
    """

    def __init__(self, keys: Iterable[str] = (), *, allow_unauthenticated_loopback: bool = False,
                 allow_query_param: bool = False) -> None:
        self._digests = tuple(_digest(k) for k in sorted(set(keys)))
        self.allow_unauthenticated_loopback = allow_unauthenticated_loopback
        self.allow_query_param = allow_query_param

    @classmethod
    def from_config(cls, cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> ApiKeyAuth:
        """Keys from ``load_keys(cfg, environ)`` and the config's options."""
        return cls(load_keys(cfg, environ), allow_unauthenticated_loopback=cfg.allow_unauthenticated_loopback,
                   allow_query_param=cfg.allow_query_param)

    def __repr__(self) -> str:
        return f"ApiKeyAuth(keys={len(self._digests)})"

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._digests)

    def is_valid(self, key: str) -> bool:
        """Constant-time membership test (every configured key is compared, no early exit)."""
        candidate = _digest(key)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found

    def _exempt(self, peer: str | None) -> bool:
        return not self.enabled or (self.allow_unauthenticated_loopback and is_loopback(peer))

    def _judge(self, presented: list[str], malformed: bool) -> str:
        """Accept if any presented key is valid (its ``owner_id``); otherwise say what was wrong,
        never the key."""
        # evaluate every candidate, so the time taken does not depend on which one matched
        ok = [self.is_valid(k) for k in presented]
        if any(ok):
            return owner_id(presented[ok.index(True)])
        if presented:
            raise Unauthenticated("invalid API key")
        if malformed:
            raise Unauthenticated("the authorization value must be 'Bearer <API key>'")
        raise Unauthenticated(_MISSING)

    @staticmethod
    def _bearer(values: list[str]) -> tuple[list[str], bool]:
        keys, malformed = [], False
        for value in values:
            m = _BEARER_RE.match(value)
            if m:
                keys.append(m.group(1))
            else:
                malformed = True
        return keys, malformed

    def check_grpc_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None, *,
                            peer: str | None = None) -> str:
        """Raise Unauthenticated unless the metadata holds ``authorization: Bearer <valid key>``;
        returns who the caller is (``owner_id`` of its key; '' when authentication is off for it).

        ``metadata``: ``context.invocation_metadata()`` (pairs; names compared case-insensitively).
        ``peer``: ``context.peer()``, used only with ``allow_unauthenticated_loopback``. Do not call
        it for PUBLIC_GRPC_METHODS (health checks).
        """
        if self._exempt(peer):
            return ""
        values = [v for k, v in _pairs(metadata) if k == "authorization"]
        keys, malformed = self._bearer(values)
        return self._judge(keys, malformed)

    def check_websocket_headers(
        self,
        headers: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None,
        query_params: Mapping[str, str] | None = None,
        subprotocols: Iterable[str] | None = None,
        *,
        client_host: str | None = None,
    ) -> str | None:
        """Check a WebSocket handshake; return the subprotocol to accept (or None).

        ``headers``: the handshake headers (Starlette ``websocket.headers`` or raw pairs);
        ``query_params``: ``websocket.query_params``; ``subprotocols``: the offered ones
        (``websocket.scope["subprotocols"]``; None = parsed from Sec-WebSocket-Protocol);
        ``client_host``: ``websocket.client.host``, used only with allow_unauthenticated_loopback.
        Raises Unauthenticated (answer HTTP 401 with ``WWW-Authenticate: WWW_AUTHENTICATE``).
        The returned subprotocol is computed whether or not auth is on: pass it to ``accept()``.
        """
        return self.websocket_credentials(headers, query_params, subprotocols, client_host=client_host)[0]

    def websocket_credentials(
        self,
        headers: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None,
        query_params: Mapping[str, str] | None = None,
        subprotocols: Iterable[str] | None = None,
        *,
        client_host: str | None = None,
    ) -> tuple[str | None, str]:
        """``check_websocket_headers``, plus who the caller is (``owner_id``; '' when exempt)."""
        pairs = _pairs(headers)
        if subprotocols is None:
            offered = [p.strip() for k, v in pairs if k == "sec-websocket-protocol" for p in v.split(",")]
        else:
            offered = [p.strip() for p in subprotocols]
        chosen = choose_subprotocol(offered)
        if self._exempt(client_host):
            return chosen, ""
        keys, malformed = self._bearer([v for k, v in pairs if k == "authorization"])
        keys += [p[len(KEY_SUBPROTOCOL_PREFIX):] for p in offered if p.startswith(KEY_SUBPROTOCOL_PREFIX)]
        if self.allow_query_param and query_params is not None and query_params.get(KEY_QUERY_PARAM):
            keys.append(str(query_params[KEY_QUERY_PARAM]))
        return chosen, self._judge(keys, malformed)


def open_server_warning(auth: ApiKeyAuth, host: str) -> str | None:
    """A warning to log when a server without keys listens beyond loopback; None otherwise."""
    if auth.enabled or is_loopback(host) or host == "localhost":
        return None
    return (f"voxserve listens on {host} without API keys: anyone who can reach it can use it. Set "
            f"{DEFAULT_KEYS_ENV} (comma-separated keys) or auth.api_keys, and auth.required.")

"""Resume tokens: who may continue which session, signed so that a client cannot make one up.

A token is ``<payload>.<signature>``, both base64url: the payload is the session id, the identity
of the API key it was issued to and an expiry (unix seconds); the signature is HMAC-SHA256 over
the payload with a secret every gateway replica shares. ``check`` says PERMISSION_DENIED for a
token that was not signed with the secret (forged, altered, garbage) or that was issued to
another API key, and NOT_FOUND once it has expired; the session store then says NOT_FOUND for a
session it no longer holds. Neither answer tells anything more about the session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.errors import NotFound, PermissionDenied

#: Longest token accepted (a real one is ~120 characters): bounds the work on garbage.
MAX_TOKEN_CHARS = 512
_DENIED = "the resume token is not valid for this API key"
#: What a resume is told when there is nothing to resume: the same whether the token expired, the
#: session never existed or its entry expired (nothing more leaks).
NO_SESSION = "no session to resume for this token (it expired or was never journaled); start a new session"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ResumeGrant:
    """What a valid token allows: to continue ``session_id``."""

    session_id: str
    expires_at: float


class ResumeTokens:
    """Issues and checks tokens with one secret (at least 32 bytes)."""

    def __init__(self, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("the resume-token secret must be at least 32 bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def issue(self, session_id: str, owner: str) -> str:
        """A token for ``session_id`` bound to the API key identity ``owner`` ('' = no auth)."""
        payload = json.dumps({"s": session_id, "k": owner, "e": int(self._clock() + self.ttl_s)},
                             separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def check(self, token: str, owner: str) -> ResumeGrant:
        """The session a token resumes, for the caller ``owner``: PERMISSION_DENIED when it is not
        ours or not this caller's, NOT_FOUND when expired."""
        try:
            if len(token) > MAX_TOKEN_CHARS:
                raise ValueError("too long")
            head, sig = token.split(".")
            payload, signature = _unb64(head), _unb64(sig)
        except ValueError:  # binascii.Error is a ValueError
            raise PermissionDenied(_DENIED) from None
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise PermissionDenied(_DENIED)
        claims = json.loads(payload)  # signed by us: well-formed
        if not hmac.compare_digest(str(claims["k"]).encode(), owner.encode()):
            raise PermissionDenied(_DENIED)
        if claims["e"] < self._clock():
            raise NotFound(NO_SESSION)
        return ResumeGrant(session_id=str(claims["s"]), expires_at=float(claims["e"]))

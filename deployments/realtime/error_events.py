"""The realtime protocol's errors: ``RealtimeError`` (a client event refused, the session goes on),
the OpenAI ``error`` event payloads for it and for our other errors, and the WebSocket close code
a session-ending error closes with."""

from __future__ import annotations

from typing import Any

from services.errors import InvalidArgument, VoxError, to_vox_error

#: Our error codes (gRPC names) -> OpenAI error type: what the client can fix vs what it cannot.
_CLIENT_CODES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "UNAUTHENTICATED",
                           "PERMISSION_DENIED"})
#: WebSocket close codes (RFC 6455): normal, policy violation, internal error, try again later.
CLOSE_NORMAL, CLOSE_POLICY, CLOSE_ERROR, CLOSE_RETRY = 1000, 1008, 1011, 1013
#: Service restart (IANA registry): a moved session's socket, after its session_moved error.
CLOSE_RESTART = 1012


class RealtimeError(InvalidArgument):
    """A client event the protocol rejects: sent as an ``error`` event with an OpenAI-style code
    (``invalid_value``, ``unknown_parameter``...) and the parameter at fault; the session goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.realtime_code = code
        self.param = param


def error_payload(code: str, message: str, *, error_type: str = "invalid_request_error", param: str | None = None,
                  event_id: str | None = None) -> dict[str, Any]:
    """An ``error`` server event (its ``event_id`` is added when it is sent)."""
    return {"type": "error", "error": {"type": error_type, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


def error_for(exc: BaseException, *, code: str | None = None, param: str | None = None,
              event_id: str | None = None) -> dict[str, Any]:
    """The ``error`` event for one of our errors: its code in lower case unless the protocol has its own."""
    if isinstance(exc, RealtimeError):
        return error_payload(code or exc.realtime_code, exc.message, param=param or exc.param, event_id=event_id)
    err = to_vox_error(exc)
    kind = "invalid_request_error" if err.code in _CLIENT_CODES else "server_error"
    return error_payload(code or err.code.lower(), err.message, error_type=kind, param=param, event_id=event_id)


class CodeOnly(VoxError):
    """An engine ErrorEvent's code and message as a VoxError (for ``error_for``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def close_code_for(err: VoxError) -> int:
    if err.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        return CLOSE_RETRY
    if err.code in ("INTERNAL", "UNKNOWN"):
        return CLOSE_ERROR
    return CLOSE_POLICY

"""One exception family for voxserve, and the one place that names its status codes.

Engines raise these; the gateway maps ``VoxError.code`` (a gRPC status code *name*) onto
``grpc.StatusCode`` in one function, so services stay free of gRPC and Ray imports.
"""

from __future__ import annotations


class VoxError(Exception):
    """Base class: ``code`` is a gRPC status code name; ``str(err)`` is safe to show a client."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(VoxError):
    """The request is malformed: fix the input (bad audio bytes, unknown field value)."""

    code = "INVALID_ARGUMENT"


class OutOfRange(VoxError):
    """A value is well-formed but outside what is supported (rate, length, duration)."""

    code = "OUT_OF_RANGE"


class FailedPrecondition(VoxError):
    """The request arrived in the wrong state (e.g. audio before the session config)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(VoxError):
    """A limit was hit: too many sessions, message too large, stream too long."""

    code = "RESOURCE_EXHAUSTED"


class NotFound(VoxError):
    """A model, voice or file could not be found (missing package or path)."""

    code = "NOT_FOUND"


class Unavailable(VoxError):
    """A stage is not ready or is overloaded; retrying later may succeed."""

    code = "UNAVAILABLE"


class Cancelled(VoxError):
    """The work was cancelled (barge-in, client cancel)."""

    code = "CANCELLED"


class DeadlineExceeded(VoxError):
    """A stage did not answer in time."""

    code = "DEADLINE_EXCEEDED"


class InternalError(VoxError):
    """A bug or an engine failure; details go to the server log, not to the client."""

    code = "INTERNAL"


def status_name(exc: BaseException) -> str:
    """The gRPC status code name for any exception (INTERNAL for everything not ours)."""
    return exc.code if isinstance(exc, VoxError) else "INTERNAL"


def client_message(exc: BaseException) -> str:
    """A message that is safe to send to a client: ours verbatim, others generic (no traces)."""
    if isinstance(exc, VoxError):
        return exc.message
    return "internal error; see the server log"

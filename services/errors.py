"""One exception family for voxserve, and the one place that maps other errors onto it.

Engines raise these; ``to_vox_error`` turns anything else (Ray's errors, vLLM's, timeouts) into
one of them *by type*, so the adapters only ever see a ``VoxError`` whose ``code`` is a gRPC
status code name (the realtime adapter maps the same codes onto its error events). Services stay
free of gRPC and Ray imports: third-party classes are looked up in modules that are already
loaded, never imported here.
"""

from __future__ import annotations

import asyncio
import logging
import sys

log = logging.getLogger(__name__)


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

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        #: When a retry may succeed (server at capacity); adapters send it as a hint.
        self.retry_after_s = retry_after_s


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


class Unauthenticated(VoxError):
    """No valid credentials: send an API key (``authorization: Bearer <key>``)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(VoxError):
    """Credentials are valid but do not allow this (a forged resume token, or another key's)."""

    code = "PERMISSION_DENIED"


class InternalError(VoxError):
    """A bug or an engine failure; details go to the server log, not to the client."""

    code = "INTERNAL"


#: Third-party error types -> (our class, message for the client), most specific first. Matched
#: with isinstance against classes of modules already imported by the process (never imported here).
_FOREIGN: tuple[tuple[str, str, type[VoxError], str], ...] = (
    ("ray.serve.exceptions", "BackPressureError", ResourceExhausted,
     "the server is at capacity (a stage's queue is full); retry in a few seconds"),
    ("ray.serve.exceptions", "DeploymentUnavailableError", Unavailable,
     "a stage of the voice pipeline is not available right now; retry shortly"),
    ("ray.serve.exceptions", "ReplicaUnavailableError", Unavailable,
     "a stage replica became unavailable; retry shortly"),
    ("ray.serve.exceptions", "RequestCancelledError", Cancelled, "the request was cancelled"),
    ("ray.exceptions", "ActorDiedError", Unavailable, "a stage replica died; retry shortly"),
    ("ray.exceptions", "ActorUnavailableError", Unavailable, "a stage replica is unreachable; retry shortly"),
    ("ray.exceptions", "RayActorError", Unavailable, "a stage replica failed; retry shortly"),
    ("ray.exceptions", "WorkerCrashedError", Unavailable, "a stage worker crashed; retry shortly"),
    ("ray.exceptions", "NodeDiedError", Unavailable, "a node of the cluster went away; retry shortly"),
    ("ray.exceptions", "TaskCancelledError", Cancelled, "the request was cancelled"),
    ("ray.exceptions", "ObjectLostError", Unavailable, "a stage result was lost; retry"),
    ("ray.exceptions", "OutOfMemoryError", ResourceExhausted, "a stage ran out of memory; retry later"),
    ("vllm.v1.engine.exceptions", "EngineDeadError", Unavailable,
     "the LLM engine stopped; its replica needs a restart"),
    ("vllm.v1.engine.exceptions", "EngineGenerateError", Unavailable, "the LLM failed to generate; retry"),
    ("vllm.exceptions", "VLLMValidationError", InvalidArgument, "the LLM rejected the request"),
)


def _foreign_class(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def to_vox_error(exc: BaseException) -> VoxError:
    """``exc`` as one of ours, mapped by type; unknown errors become INTERNAL (and are logged).

    A ``RayTaskError`` is unwrapped to the error the replica raised, so a VoxError raised in a
    stage reaches the client with its own code and message.
    """
    cause = getattr(exc, "cause", None)
    ray_task_error = _foreign_class("ray.exceptions", "RayTaskError")
    if ray_task_error is not None and isinstance(exc, ray_task_error) and isinstance(cause, BaseException):
        return to_vox_error(cause)
    if isinstance(exc, VoxError):
        return exc
    for module, name, ours, message in _FOREIGN:
        cls = _foreign_class(module, name)
        if cls is not None and isinstance(exc, cls):
            if ours is InvalidArgument:  # the validation text is what the client must fix
                return ours(f"{message}: {exc}")
            return ours(message)
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded("a stage did not answer in time")
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("cancelled")
    log.error("unexpected error mapped to INTERNAL", exc_info=exc)
    return InternalError("internal error; see the server log")


def status_name(exc: BaseException) -> str:
    """The gRPC status code name for any exception."""
    return to_vox_error(exc).code


def client_message(exc: BaseException) -> str:
    """A message that is safe to send to a client: ours verbatim, others mapped (no traces)."""
    return to_vox_error(exc).message

"""Our errors as gRPC statuses.

Serve's proxy copies the replica's gRPC context onto the call with each streamed message, so a
method sets the code here and then sends one last message that carries it (Converse: an Error
event with the same code; Transcribe/Synthesize: an empty message). Raising instead would also
work, but Serve then logs a traceback for every client mistake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from services.errors import VoxError, to_vox_error

if TYPE_CHECKING:
    from ray.serve.grpc_util import RayServegRPCContext


def status_code(exc: VoxError) -> grpc.StatusCode:
    """The one map from our error family to gRPC status codes."""
    return grpc.StatusCode[exc.code]


def set_status(context: RayServegRPCContext | None, exc: BaseException) -> VoxError:
    """Set the status for ``exc`` on the call (with a ``retry-after-ms`` trailer when the error
    has a retry hint); the caller then ends its stream normally. Returns ``exc`` as our error."""
    err = to_vox_error(exc)
    if context is not None:
        context.set_code(status_code(err))
        context.set_details(err.message)
        retry = getattr(err, "retry_after_s", None)
        if retry:
            context.set_trailing_metadata([("retry-after-ms", str(int(retry * 1000)))])
    return err

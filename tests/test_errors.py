"""The one place that maps errors: Ray's and vLLM's own exception types onto our family, by type."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    to_vox_error,
)


def test_ray_errors_map_by_type_with_our_own_message() -> None:
    from ray.exceptions import ActorDiedError, TaskCancelledError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    busy = to_vox_error(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    assert isinstance(busy, ResourceExhausted) and "backpressure" not in busy.message.lower()
    assert isinstance(to_vox_error(DeploymentUnavailableError("LLM")), Unavailable)
    died = to_vox_error(ActorDiedError())
    assert isinstance(died, Unavailable) and "replica" in died.message
    assert isinstance(to_vox_error(TaskCancelledError()), Cancelled)


def test_a_stage_error_crosses_ray_with_its_code() -> None:
    """A VoxError raised in a replica arrives as RayTaskError: it keeps its code and message."""
    from ray.exceptions import RayTaskError

    cause = InvalidArgument("language 'xx' is not supported")
    wrapped = RayTaskError("ASR.transcribe", "Traceback ...", cause)
    err = to_vox_error(wrapped)
    assert isinstance(err, InvalidArgument) and err.message == cause.message
    err = to_vox_error(wrapped.as_instanceof_cause())
    assert err.code == "INVALID_ARGUMENT" and "Traceback" not in err.message


def test_vllm_errors_map_by_type() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    assert isinstance(to_vox_error(EngineDeadError()), Unavailable)
    bad = to_vox_error(VLLMValidationError("max_tokens must be at least 1"))
    assert isinstance(bad, InvalidArgument) and "max_tokens" in bad.message


def test_everything_else() -> None:
    assert isinstance(to_vox_error(TimeoutError()), DeadlineExceeded)
    assert isinstance(to_vox_error(asyncio.CancelledError()), Cancelled)
    internal = to_vox_error(RuntimeError("secret detail"))
    assert isinstance(internal, InternalError) and "secret" not in internal.message
    ours = ResourceExhausted("full", retry_after_s=2)
    assert to_vox_error(ours) is ours


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"])
def test_every_code_is_a_grpc_status(code: str) -> None:
    import grpc

    assert grpc.StatusCode[code].name == code

"""Knowing that Serve is stopping this replica, early enough to move its sessions.

Serve stops a replica (redeploy, scale-down) by first waiting, up to the deployment's
``graceful_shutdown_timeout_s``, for its ongoing requests to end, and only then calls the user's
``__del__``: for a replica whose requests are hour-long voice streams, that is too late to do
anything but cut them. Serve flags the replica as shutting down when the wait begins
(``Replica._shutting_down``, used by its own data-plane health check) but offers user code no
hook for that moment, so ``ShutdownWatch`` looks the flag up once and polls it; when it is set,
the gateway drains (``SessionHub.drain``): its streams end at their next turn boundary with
``SessionMoved``, the ongoing-request count drops to zero, and Serve's wait ends early.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("ray.serve")

#: How often the flag is looked at (a drain starts at most this late).
POLL_S = 0.25


def replica_shutdown_flag() -> Callable[[], bool] | None:
    """A probe of this process's Serve replica's "shutting down" flag; None when not in a
    replica, or when this Ray version keeps it elsewhere (then nothing drains: streams are cut
    after ``graceful_shutdown_timeout_s``, and clients resume with their tokens)."""
    replica = _this_replica()
    if replica is None:
        return None
    return lambda: bool(replica._shutting_down)


def _this_replica() -> Any:
    """Serve's replica object of this process. The replica context (a public developer API) holds
    a callback the replica made as a closure over itself; failing that, the replica is looked for
    among the process's objects."""
    from ray import serve

    with contextlib.suppress(Exception):
        callback = serve.context._get_internal_replica_context()._handle_registration_callback
        for cell in getattr(callback, "__closure__", None) or ():
            if hasattr(cell.cell_contents, "_shutting_down"):
                return cell.cell_contents
    for obj in gc.get_objects():
        if hasattr(type(obj), "perform_graceful_shutdown") and hasattr(obj, "_shutting_down"):
            return obj
    return None


async def watch_for_shutdown(probe: Callable[[], bool] | None, drain: Callable[[], Awaitable[None]]) -> None:
    """Run ``drain`` once the probe says the replica is shutting down."""
    if probe is None:
        log.warning("drain: this Ray version hides the replica's shutdown flag; sessions are not moved before "
                    "a redeploy or scale-down cuts them (clients still resume with their tokens)")
        return
    while not probe():  # noqa: ASYNC110 (a flag of Serve's, not an event we could wait on)
        await asyncio.sleep(POLL_S)
    log.info("drain: this gateway replica is stopping; moving its sessions")
    await drain()

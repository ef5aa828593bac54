"""asyncio helpers the conversation relies on for cancellation that is never swallowed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` and wait until each has finished.

    Waits on a separate future per task, so a cancel of the *caller* while it waits propagates to
    the caller (it is never swallowed, unlike ``suppress(CancelledError)`` around ``await task``),
    and a task's own error is logged, not raised into the caller.
    """
    live = [t for t in tasks if t is not None and not t.done()]
    if not live:
        return
    loop = asyncio.get_running_loop()
    waiters: list[tuple[asyncio.Future[Any], asyncio.Future[None]]] = []
    for task in live:
        waiter: asyncio.Future[None] = loop.create_future()

        def release(_: asyncio.Future[Any], waiter: asyncio.Future[None] = waiter) -> None:
            if not waiter.done():
                waiter.set_result(None)

        task.add_done_callback(release)
        waiters.append((task, waiter))
        task.cancel()
    for task, waiter in waiters:
        await waiter
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("task %s failed while being cancelled", task, exc_info=exc)


class TaskGroup:
    """Tasks owned by one object: every task is kept (no fire-and-forget) and cancelled on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            from services.errors import VoxError

            if isinstance(exc, VoxError):  # an expected failure, reported to the client elsewhere
                log.debug("task %s ended with %s: %s", task.get_name(), exc.code, exc.message)
            else:
                log.error("background task %s failed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        await cancel_and_wait(*list(self._tasks))

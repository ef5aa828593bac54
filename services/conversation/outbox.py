"""The conversation's bounded send queue, drained by the adapter's sender task."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from services.conversation import events as ev


class Outbox:
    """Bounded FIFO of events; the unsent payload of an interrupted response can be purged.

    ``close()`` ends the stream for the reader after what is queued; it never waits for room, so
    closing cannot hang on a client that stopped reading.
    """

    def __init__(self, maxsize: int, on_put: Callable[[ev.Event], None] | None = None) -> None:
        self._items: deque[ev.Event] = deque()
        self._on_put = on_put  # sees every event queued (the session journal watches for turn changes)
        self._maxsize = maxsize
        self._closed = False
        self._cond = asyncio.Condition()

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, item: ev.Event) -> None:
        """Queue an event, waiting for room (backpressure from a slow client); dropped once closed."""
        async with self._cond:
            await self._cond.wait_for(lambda: len(self._items) < self._maxsize or self._closed)
            if self._closed:
                return
            self._items.append(item)
            self._cond.notify_all()
        if self._on_put is not None:
            self._on_put(item)

    async def get(self) -> ev.Event | None:
        """The next event, or None once closed and drained."""
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items) or self._closed)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    async def purge(self, response_id: int) -> int:
        """Drop the queued payload (text, audio) of one response; returns how many were dropped."""
        async with self._cond:
            keep = deque(i for i in self._items
                         if not (isinstance(i, ev.ResponsePayload) and i.response_id == response_id))
            dropped = len(self._items) - len(keep)
            self._items = keep
            self._cond.notify_all()
            return dropped

    async def close(self, *, drop_pending: bool = False) -> None:
        async with self._cond:
            self._closed = True
            if drop_pending:
                self._items.clear()
            self._cond.notify_all()

"""The session journal: what a replica needs to continue a conversation, kept outside the replica.

A gateway replica writes each session's ``ConversationState`` (settings, history as heard, tools,
the last response, turns not yet answered) after every change of turn, so that the session can be
resumed on any replica after its own dies, drains or is scaled away. Stores share one small
interface (``JournalStore``):

- ``MemoryJournal``: one process only (unit tests, a single-process server);
- ``RedisJournal``: production; survives a restart of the whole Ray cluster;
- the embedded default lives in ``deployments.journal_gcs`` (Ray's GCS key-value store: it needs
  Ray, which services may not import).

Every entry carries an ``epoch``, raised at each resume, and its ``writer``: a store keeps the
newest epoch's writes, and of one epoch the first writer's (``fenced``), so a replica that lost
its client but has not noticed yet cannot overwrite the session's newer state on the replica it
resumed on, and two resumes of one token at once cannot both continue it. Entries expire
``ttl_s`` after their last write.

Writing never delays an answer: ``JournalWriter`` runs beside the conversation, coalesces
changes and writes the newest state, measuring each write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: Key prefix of every entry (Redis keys, GCS KV keys).
PREFIX = "voxserve:session:"
SECRET_KEY = "voxserve:resume-secret"


class JournalStore(Protocol):
    """Where session states live between replicas."""

    name: str
    shared: bool  # every gateway replica reads the same entries (a session can move)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        """The session's newest entry, or None (never written, or expired)."""
        ...

    async def put(self, session_id: str, entry: dict[str, Any], ttl_s: float) -> bool:
        """Write ``entry`` unless the stored one has a newer ``epoch`` (then False: this writer
        lost the session to a resume elsewhere); it expires ``ttl_s`` after this write."""
        ...

    async def shared_secret(self) -> bytes:
        """A random secret every replica using this store agrees on (created by the first)."""
        ...

    async def aclose(self) -> None:
        ...


def fenced(stored: dict[str, Any] | None, entry: dict[str, Any]) -> bool:
    """``entry`` may not replace ``stored``: a newer epoch holds the session, or another writer of
    the same epoch does (two resumes of one token at once: the first to write keeps it)."""
    if stored is None:
        return False
    old, new = int(stored.get("epoch", 0)), int(entry.get("epoch", 0))
    return old > new or (old == new and stored.get("writer", "") != entry.get("writer", ""))


class MemoryJournal:
    """A journal in this process's memory: for tests and a single-process server only."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, shared: bool = False) -> None:
        #: True only when every hub that may resume its sessions holds this very object (tests).
        self.shared = shared
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._secret = secrets.token_bytes(32)
        self._clock = clock

    async def get(self, session_id: str) -> dict[str, Any] | None:
        found = self._entries.get(session_id)
        if found is None or found[0] < self._clock():
            self._entries.pop(session_id, None)
            return None
        return json.loads(json.dumps(found[1]))  # a copy, like a real store's

    async def put(self, session_id: str, entry: dict[str, Any], ttl_s: float) -> bool:
        if fenced(await self.get(session_id), entry):
            return False
        self._entries[session_id] = (self._clock() + ttl_s, json.loads(json.dumps(entry)))
        return True

    async def shared_secret(self) -> bytes:
        return self._secret

    async def aclose(self) -> None:
        pass


# Atomic ``fenced`` check and write: KEYS[1] the entry, ARGV the JSON, its epoch, TTL ms, writer.
_PUT_LUA = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, stored = pcall(cjson.decode, old)
  if ok then
    local epoch = tonumber(stored['epoch'] or 0)
    if epoch > tonumber(ARGV[2]) then return 0 end
    if epoch == tonumber(ARGV[2]) and (stored['writer'] or '') ~= ARGV[4] then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""


class RedisJournal:
    """The journal in Redis (``redis://host:port/db``; ``rediss://`` for TLS). Survives a restart
    of the whole Ray cluster; can share the Redis of KubeRay's GCS fault tolerance."""

    name = "redis"
    shared = True

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._put = self._redis.register_script(_PUT_LUA)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(PREFIX + session_id)
        return None if raw is None else dict(json.loads(raw))

    async def put(self, session_id: str, entry: dict[str, Any], ttl_s: float) -> bool:
        written = await self._put(keys=[PREFIX + session_id],
                                  args=[json.dumps(entry), int(entry.get("epoch", 0)), max(1, int(ttl_s * 1000)),
                                        str(entry.get("writer", ""))])
        return bool(written)

    async def shared_secret(self) -> bytes:
        await self._redis.set(SECRET_KEY, secrets.token_hex(32), nx=True)  # the first replica's wins
        value = await self._redis.get(SECRET_KEY)
        return value.encode() if isinstance(value, str) else bytes(value or b"")

    async def aclose(self) -> None:
        await self._redis.aclose()


class JournalWriter:
    """Keeps one session's journal entry up to date, beside the conversation.

    ``mark()`` (called on every change of turn; cheap, synchronous) wakes the writer, which takes
    the newest state and writes it if it changed; changes that arrive during a write are
    coalesced into the next one. While the session lives, the entry is rewritten every
    ``ttl_s / 4`` so that a long quiet call does not expire. ``write_ms`` collects write times.
    """

    def __init__(self, store: JournalStore, session_id: str, state: Callable[[], dict[str, Any]], ttl_s: float,
                 on_write: Callable[[float, bool], None] | None = None) -> None:
        self.store = store
        self.session_id = session_id
        self._state = state
        self.ttl_s = ttl_s
        self._on_write = on_write
        self._dirty = asyncio.Event()
        self._last: str | None = None
        self._last_at = 0.0
        self.lost = False  # a newer epoch holds the session: stop writing
        self.write_ms: list[float] = []

    def mark(self) -> None:
        self._dirty.set()

    def freeze(self) -> None:
        """Write nothing more: the entry as last written is what a resume continues from (a
        moved session's turn in flight stays unanswered there, to be answered where it resumes)."""
        self.lost = True

    async def run(self) -> None:
        """Write on every change until cancelled (``flush`` writes the last state)."""
        while not self.lost:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.ttl_s / 4)
            except TimeoutError:
                pass
            self._dirty.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Write the newest state now, if it changed or the entry is getting old; False when the
        store did not take it (failed, or the session is held by another writer)."""
        if self.lost:
            return False
        entry = self._state()
        text = json.dumps(entry, sort_keys=True)
        if text == self._last and time.monotonic() - self._last_at < self.ttl_s / 4:
            return True
        t0 = time.perf_counter()
        try:
            ok = await self.store.put(self.session_id, entry, self.ttl_s)
        except Exception as exc:  # a store outage must not end the call: the next change retries
            log.warning("session journal: writing %s to %s failed: %s", self.session_id, self.store.name, exc)
            if self._on_write is not None:
                self._on_write((time.perf_counter() - t0) * 1000, False)
            return False
        ms = (time.perf_counter() - t0) * 1000
        self.write_ms.append(ms)
        del self.write_ms[:-1000]
        if self._on_write is not None:
            self._on_write(ms, True)
        if not ok:
            log.info("session journal: %s was resumed elsewhere; this replica stops writing it", self.session_id)
            self.lost = True
            return False
        self._last, self._last_at = text, time.monotonic()
        return True

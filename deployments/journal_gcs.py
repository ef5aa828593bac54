"""The embedded session journal: Ray's GCS key-value store (no server to run).

Why the GCS: it is the cluster's own control store, outside every worker process, so it survives
the death of any Gateway replica (and of any node but the head); Serve keeps its own checkpoints
there for the same reason. With KubeRay's GCS fault tolerance (GCS backed by Redis) it survives a
head restart too; without it, a restart of the whole Ray cluster loses the journal: use the Redis
journal (``sessions.journal: redis``) for that. The GCS has no expiry, so each entry carries its
own and a sweep deletes expired ones (at most once a minute per replica).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

from deployments.config import SessionsConfig
from services.errors import InvalidArgument
from services.journal import PREFIX, SECRET_KEY, JournalStore, MemoryJournal, RedisJournal, fenced

NAMESPACE = "voxserve"
SWEEP_EVERY_S = 60.0
#: Longest wait for one GCS call (a stalled GCS must not hang session opens for ever).
GCS_TIMEOUT_S = 2.0
log = logging.getLogger("ray.serve")


async def _bounded(call: Any) -> Any:
    return await asyncio.wait_for(call, GCS_TIMEOUT_S)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("session journal: sweeping expired entries failed: %s", task.exception())


class GcsJournal:
    """``services.journal.JournalStore`` over Ray's internal KV (call from inside a Ray worker)."""

    name = "embedded"
    shared = True

    def __init__(self) -> None:
        self._lock = asyncio.Lock()  # get-then-put of one replica is atomic; resumes raise epochs
        self._swept = time.time()
        self._sweeping: asyncio.Task[None] | None = None

    @staticmethod
    def _kv() -> Any:
        from ray.experimental import internal_kv

        return internal_kv

    async def get(self, session_id: str) -> dict[str, Any] | None:
        raw = await _bounded(asyncio.to_thread(self._kv()._internal_kv_get, PREFIX + session_id, namespace=NAMESPACE))
        if raw is None:
            return None
        stored = json.loads(raw)
        if stored["expires_at"] < time.time():
            return None
        return dict(stored["entry"])

    async def put(self, session_id: str, entry: dict[str, Any], ttl_s: float) -> bool:
        async with self._lock:
            # (get-then-put: atomic within this replica; across replicas the window is one GCS
            # round trip, milliseconds: Redis does it atomically)
            if fenced(await self.get(session_id), entry):
                return False
            value = json.dumps({"expires_at": time.time() + ttl_s, "entry": entry})
            await _bounded(asyncio.to_thread(self._kv()._internal_kv_put, PREFIX + session_id, value, True,
                                             namespace=NAMESPACE))
        if time.time() - self._swept > SWEEP_EVERY_S and (self._sweeping is None or self._sweeping.done()):
            self._swept = time.time()
            self._sweeping = asyncio.get_running_loop().create_task(asyncio.to_thread(self._sweep))
            self._sweeping.add_done_callback(_log_failure)
        return True

    def _sweep(self) -> None:
        kv = self._kv()
        now = time.time()
        for key in kv._internal_kv_list(PREFIX, namespace=NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is not None and json.loads(raw)["expires_at"] < now:
                kv._internal_kv_del(key, namespace=NAMESPACE)

    async def shared_secret(self) -> bytes:
        kv = self._kv()
        # overwrite=False: the first replica's secret wins, the others read it back
        await asyncio.to_thread(kv._internal_kv_put, SECRET_KEY, secrets.token_hex(32), False, namespace=NAMESPACE)
        value = await asyncio.to_thread(kv._internal_kv_get, SECRET_KEY, namespace=NAMESPACE)
        return bytes(value)

    async def aclose(self) -> None:
        pass


def journal_store(cfg: SessionsConfig, environ: Mapping[str, str] | None = None) -> JournalStore | None:
    """The store ``sessions.journal`` names (None: off)."""
    env = os.environ if environ is None else environ
    if cfg.journal == "off":
        return None
    if cfg.journal == "memory":
        return MemoryJournal()
    if cfg.journal == "redis":
        url = cfg.redis_url or env.get(cfg.redis_url_env, "")
        if not url:
            raise InvalidArgument(f"sessions.journal is redis but no URL is set: set sessions.redis_url or the "
                                  f"environment variable {cfg.redis_url_env}")
        return RedisJournal(url)
    return GcsJournal()


def resume_secret(cfg: SessionsConfig, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The token-signing secret from ``$<resume_secret_env>`` (None: the store's shared one)."""
    env = os.environ if environ is None else environ
    value = env.get(cfg.resume_secret_env, "")
    if value and len(value.encode()) < 32:
        raise InvalidArgument(f"${cfg.resume_secret_env} must hold at least 32 bytes (e.g. `openssl rand -hex 32`)")
    return value.encode() if value else None

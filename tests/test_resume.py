"""Sessions that outlive their replica (issue 18), on fake stages: resume tokens, the journal
stores (Redis against a real ``redis-server``), resuming on another hub, the drain. The real
pipeline's kill -9 and drain run in test_resume_graph.py."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from deployments.config import AppArgs
from deployments.journal_gcs import journal_store, resume_secret
from deployments.sessions import SessionHub
from services.conversation import Conversation, SessionSettings
from services.conversation import events as ev
from services.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.journal import JournalWriter, MemoryJournal, RedisJournal
from services.resume_tokens import ResumeTokens
from tests.test_sessions import HubStages

SECRET = b"s" * 32


# --- tokens ---------------------------------------------------------------------------------------


def test_tokens_are_bound_to_the_session_the_key_and_the_time() -> None:
    now = [1000.0]
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=lambda: now[0])
    token = tokens.issue("abc123", "key:alice")
    assert tokens.check(token, "key:alice").session_id == "abc123"
    with pytest.raises(PermissionDenied):
        tokens.check(token, "key:bob")  # another API key
    with pytest.raises(PermissionDenied):
        tokens.check(token, "")  # no key at all
    head, sig = token.split(".")
    forged = head[:-2] + ("A" if head[-2] != "A" else "B") + head[-1] + "." + sig
    for bad in (forged, head + "." + sig[::-1], "garbage", "", "a.b.c", "x" * 600,
                ResumeTokens(b"o" * 32, 60).issue("abc123", "key:alice")):  # another server's secret
        with pytest.raises(PermissionDenied):
            tokens.check(bad, "key:alice")
    now[0] += 61
    with pytest.raises(NotFound):
        tokens.check(token, "key:alice")
    with pytest.raises(ValueError):
        ResumeTokens(b"short", 60)


def test_the_store_and_secret_come_from_config() -> None:
    args = AppArgs.model_validate({"sessions": {"journal": "redis"}})
    with pytest.raises(InvalidArgument, match="VOXSERVE_REDIS_URL"):
        journal_store(args.sessions, environ={})
    assert isinstance(journal_store(args.sessions, environ={"VOXSERVE_REDIS_URL": "redis://127.0.0.1:1/0"}),
                      RedisJournal)
    assert journal_store(AppArgs.model_validate({"sessions": {"journal": "off"}}).sessions) is None
    with pytest.raises(InvalidArgument, match="at least 32 bytes"):
        resume_secret(args.sessions, environ={"VOXSERVE_RESUME_SECRET": "short"})
    assert resume_secret(args.sessions, environ={"VOXSERVE_RESUME_SECRET": "k" * 40}) == b"k" * 40
    assert resume_secret(args.sessions, environ={}) is None


# --- stores ---------------------------------------------------------------------------------------


async def _store_contract(store: Any) -> None:
    """What every JournalStore does: round trip, epoch fencing, expiry, one shared secret."""
    assert await store.get("nope") is None
    assert await store.put("s1", {"epoch": 1, "turns": ["a"]}, ttl_s=30)
    assert (await store.get("s1"))["turns"] == ["a"]
    assert not await store.put("s1", {"epoch": 0, "turns": ["stale"]}, ttl_s=30)  # an older replica
    assert (await store.get("s1"))["turns"] == ["a"]
    assert await store.put("s1", {"epoch": 2, "turns": ["b"]}, ttl_s=30)
    assert await store.put("s2", {"epoch": 0}, ttl_s=0.2)
    await asyncio.sleep(1.2)
    assert await store.get("s2") is None  # expired
    secret = await store.shared_secret()
    assert len(secret) >= 32 and secret == await store.shared_secret()


async def test_memory_journal() -> None:
    await _store_contract(MemoryJournal())


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port (installed by scripts/bootstrap.sh)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: run scripts/bootstrap.sh (it installs Debian's redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_redis_journal(redis_url: str) -> None:
    store = RedisJournal(redis_url)
    try:
        await _store_contract(store)
    finally:
        await store.aclose()


async def test_a_store_outage_never_ends_the_call_and_the_next_change_retries() -> None:
    store = RedisJournal("redis://127.0.0.1:1/0", timeout_s=0.2)  # nothing listens there
    writes: list[bool] = []
    writer = JournalWriter(store, "s", lambda: {"epoch": 0}, ttl_s=60, on_write=lambda ms, ok: writes.append(ok))
    await writer.flush()
    assert writes == [False] and not writer.lost
    await store.aclose()


# --- resume across hubs (two replicas sharing one journal) ----------------------------------------


def hub(store: MemoryJournal, **sessions: Any) -> SessionHub:
    return SessionHub(AppArgs.model_validate({"sessions": sessions}), HubStages())


class Client:
    """One session on a hub, its events collected."""

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.out: list[ev.Event] = []
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.conv.events():
            self.out.append(event)

    async def wait_for(self, kind: type, n: int = 1, within_s: float = 5) -> list[Any]:
        deadline = time.monotonic() + within_s
        while len(found := [e for e in self.out if isinstance(e, kind)]) < n:
            assert time.monotonic() < deadline, f"no {n} {kind.__name__} in {[type(e).__name__ for e in self.out]}"
            await asyncio.sleep(0.01)
        return found


@contextlib.asynccontextmanager
async def opened(h: SessionHub, owner: str = "", restored: dict[str, Any] | None = None,
                 **settings: Any) -> AsyncIterator[Client]:
    async with h.session(SessionSettings(output_sample_rate=16000, **settings), owner=owner,
                         restored=restored) as conv:
        yield Client(conv)


async def two_hubs() -> tuple[SessionHub, SessionHub]:
    store = MemoryJournal(shared=True)  # both "replicas" hold this one store
    a, b = hub(store), hub(store)
    await a.open_journal(store)
    await b.open_journal(store)
    return a, b


async def test_a_session_resumes_on_another_replica_with_its_history_and_its_unanswered_turn() -> None:
    a, b = await two_hubs()
    a.stages.answer = "Paris is the capital."
    async with opened(a, owner="key:alice", system_prompt="Be brief.") as client:
        started = (await client.wait_for(ev.SessionStarted))[0]
        assert started.resume_token and not started.resumed
        await client.conv.push_text("What is the capital of France?")
        await client.wait_for(ev.ResponseDone)
        a.stages.hang.add("llm")  # the next answer is in flight when the replica "dies"
        await client.conv.push_text("And of Italy?")
        await client.wait_for(ev.ResponseStarted, 2)
        await asyncio.sleep(0.1)  # the journal writer runs beside the turn
        writer, _ = a._writers[client.conv]
        writer.freeze()  # kill -9: nothing more is written, not even the close
        session_id = client.conv.session_id

    with pytest.raises(PermissionDenied):
        await b.resume(started.resume_token, "key:bob")  # another key: nothing restored
    entry = await b.resume(started.resume_token, "key:alice")
    assert entry["pending"] == ["And of Italy?"]
    b.stages.answer = "Rome."
    async with opened(b, owner="key:alice", restored=entry) as client:
        started = (await client.wait_for(ev.SessionStarted))[0]
        assert started.resumed and started.session_id == session_id and started.restored_turns == 2
        done = await client.wait_for(ev.ResponseDone)
        assert done[0].text == "Rome."  # the unanswered turn, answered once
        await asyncio.sleep(0.1)
        assert len(b.stages.llm_calls) == 1  # the turn the user heard was not repeated
        prompt = b.stages.llm_calls[0]
        assert prompt[0] == {"role": "system", "content": "Be brief."}
        assert [m["content"] for m in prompt[1:]] == ["What is the capital of France?", "Paris is the capital.",
                                                      "And of Italy?"]
        # all sent: the journal counts it as heard (a resume from here answers nothing again)
        assert [t["text"] for t in client.conv.state()["turns"]][-2:] == ["And of Italy?", "Rome."]
        assert client.conv.state()["pending"] == []


async def test_resume_is_refused_cleanly_without_a_session() -> None:
    a, b = await two_hubs()
    tokens = a.tokens
    assert tokens is not None
    with pytest.raises(NotFound):
        await b.resume(tokens.issue("never-was", ""), "")  # a real token, but nothing journaled
    with pytest.raises(PermissionDenied):
        await b.resume("forged.token", "")
    off = SessionHub(AppArgs(), HubStages())
    with pytest.raises(FailedPrecondition, match="journal"):
        await off.resume("x.y", "")


async def test_a_stale_replica_cannot_overwrite_the_resumed_session() -> None:
    a, b = await two_hubs()
    async with opened(a) as old:
        token = (await old.wait_for(ev.SessionStarted))[0].resume_token
        entry = await b.resume(token, "")
        async with opened(b, restored=entry) as new:
            await new.conv.push_text("Hello there.")
            await new.wait_for(ev.ResponseDone)
            await asyncio.sleep(0.05)
            await old.conv.push_text("A word to the old replica.")  # its client is gone in reality
            await old.wait_for(ev.ResponseDone)
            await asyncio.sleep(0.1)
    stored = await b.resume(token, "")
    assert stored["epoch"] == 1 and "Hello there." in str(stored["turns"])
    assert "old replica" not in str(stored["turns"])


async def test_drain_moves_each_session_at_its_turn_boundary() -> None:
    a, _ = await two_hubs()
    a.stages.word_s = 0.05  # an answer takes ~0.5 s
    async with opened(a) as busy, opened(a) as idle:
        await busy.conv.push_text("Tell me something.")
        await busy.wait_for(ev.ResponseStarted)
        drained = asyncio.create_task(a.drain())
        moved = await idle.wait_for(ev.SessionMoved)  # an idle session moves at once
        assert moved[0].resume_token and moved[0].reason == "draining"
        with pytest.raises(Unavailable, match="shutting down"):
            a.admit()
        await asyncio.wait_for(a.wait_moved(idle.conv), 1)
        assert not [e for e in busy.out if isinstance(e, ev.SessionMoved)]  # still answering
        await busy.wait_for(ev.SessionMoved, within_s=5)
        kinds = [type(e) for e in busy.out]
        assert kinds.index(ev.ResponseDone) < kinds.index(ev.SessionMoved)  # the answer finished first
        await asyncio.wait_for(drained, 5)


async def test_drain_does_not_wait_forever_and_the_unfinished_turn_is_answered_after_resume() -> None:
    a, b = await two_hubs()
    a.args.sessions.drain_timeout_s = 0.3
    a.stages.hang.add("llm")
    async with opened(a) as client:
        await client.conv.push_text("A question that never gets its answer here.")
        await client.wait_for(ev.ResponseStarted)
        t0 = time.monotonic()
        await a.drain()
        assert time.monotonic() - t0 < 2
        token = (await client.wait_for(ev.SessionMoved))[0].resume_token
        await a.wait_moved(client.conv)
    entry = await b.resume(token, "")
    assert entry["pending"] == ["A question that never gets its answer here."]
    async with opened(b, restored=entry) as client:
        await client.wait_for(ev.ResponseDone)


# --- stage outages: health and admission ------------------------------------------------------------


async def test_an_outage_is_not_overload_and_admission_reopens_when_the_stages_are_back() -> None:
    h = SessionHub(AppArgs.model_validate({"gateway": {"admission_first_audio_ms": 1000}}), HubStages())
    monitor = asyncio.create_task(h.monitor_health(period_s=0.05))
    try:
        async with opened(h) as client:
            await client.wait_for(ev.SessionStarted)
            assert await h.healthy()
            h.stages.alive = False  # a stage replica is killed
            await asyncio.sleep(0.2)
            assert not await h.healthy()  # NOT_SERVING at once, from the monitor's verdict
            with pytest.raises(Unavailable, match="down"):
                h.admit()  # an outage: UNAVAILABLE, not "at capacity"
            for _ in range(5):  # answers slowed by the outage...
                h.observer.answered(ev.TurnLatency(first_audio_ms=9000))
            h.stages.alive = True
            await asyncio.sleep(0.2)
            assert await h.healthy()
            h.admit()  # ...do not keep callers out once the stages are back
            assert h.first_audio.p95(min_samples=1) is None
    finally:
        monitor.cancel()


async def test_a_hang_up_before_the_answer_was_heard_keeps_the_question_for_the_resume() -> None:
    a, b = await two_hubs()
    async with opened(a) as client:
        token = (await client.wait_for(ev.SessionStarted))[0].resume_token
        await client.conv.push_text("Are you there?")
        await client.wait_for(ev.ResponseDone)  # all sent, but 2 s of audio not yet played: the line drops
    await asyncio.sleep(0.1)  # the last write runs after the stream's end (a client backs off longer)
    entry = await b.resume(token, "")
    assert entry["pending"] == ["Are you there?"] and entry["turns"] == []
    async with opened(b, restored=entry) as client:
        done = await client.wait_for(ev.ResponseDone)
        assert done[0].text and len(b.stages.llm_calls) == 1
        assert b.stages.llm_calls[0][-1]["content"] == "Are you there?"


# --- stage calls whose replica dies (deployments.remote; the handle stream is faked) ---------------------


def _dying_streams(monkeypatch: pytest.MonkeyPatch, scripts: list[list[Any]]) -> list[int]:
    """Each call of ``_stream`` plays the next script: items, an exception, or a hang."""
    import deployments.remote as remote

    opened: list[int] = []

    async def fake(gen: Any) -> AsyncIterator[Any]:
        opened.append(1)
        for item in scripts[len(opened) - 1]:
            if isinstance(item, BaseException):
                raise item
            if item == "hang":
                await asyncio.Event().wait()
            yield item

    monkeypatch.setattr(remote, "_stream", fake)
    return opened


async def _drain(stage: str, skip: Any, down: bool = False) -> bytes | str:
    from deployments.remote import _stream_retry

    items = [x async for x in _stream_retry(stage, lambda: None, skip=skip,  # type: ignore[arg-type]
                                            is_down=lambda: down)]
    return b"".join(items) if items and isinstance(items[0], bytes) else "".join(items)


async def test_a_tts_chunk_whose_replica_dies_goes_on_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import ActorDiedError

    opened = _dying_streams(monkeypatch, [[b"aaaa", b"bb", ActorDiedError()], [b"aaaab", b"bcc", b"dd"]])
    assert await _drain("TTS", skip=lambda pcm, n: pcm[n:]) == b"aaaabbccdd"  # nothing twice, nothing lost
    assert len(opened) == 2


async def test_an_llm_answer_restarts_only_if_nothing_was_said(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import ActorDiedError

    _dying_streams(monkeypatch, [[ActorDiedError()], ["Hello", " there"]])
    assert await _drain("LLM", skip=None) == "Hello there"
    _dying_streams(monkeypatch, [["Hel", ActorDiedError()], ["Hello"]])
    with pytest.raises(Unavailable, match="LLM stage lost its replica"):
        await _drain("LLM", skip=None)  # words already on their way to the caller: not restarted


async def test_a_stage_with_no_replica_left_fails_fast_instead_of_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import ActorDiedError

    import deployments.remote as remote

    monkeypatch.setattr(remote, "RETRY_WAIT_S", 0.2)
    _dying_streams(monkeypatch, [[ActorDiedError()], ["hang"]])  # the retry waits for a replica that is not there
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="restarting"):
        await _drain("TTS", skip=lambda pcm, n: pcm[n:])
    assert time.monotonic() - t0 < 1
    _dying_streams(monkeypatch, [["hang"]])  # known down: even the first call waits only briefly
    with pytest.raises(Unavailable):
        await _drain("TTS", skip=lambda pcm, n: pcm[n:], down=True)


async def test_one_token_resumed_twice_at_once_continues_the_session_once() -> None:
    a, b = await two_hubs()
    c = hub(MemoryJournal())
    await c.open_journal(a.journal)  # type: ignore[arg-type]
    async with opened(a) as client:
        token = (await client.wait_for(ev.SessionStarted))[0].resume_token
    first, second = await b.resume(token, ""), await c.resume(token, "")  # both read the same epoch
    async with opened(b, restored=first) as resumed:
        await resumed.wait_for(ev.SessionStarted)
        with pytest.raises(FailedPrecondition, match="another connection"):
            async with opened(c, restored=second):
                pass
    assert c.active == 0 and not c.live  # nothing half-open left behind


async def test_without_a_shared_journal_a_drain_does_not_cut_the_calls() -> None:
    h = SessionHub(AppArgs.model_validate({"sessions": {"journal": "off"}}), HubStages())
    async with opened(h) as client:
        await client.wait_for(ev.SessionStarted)
        await asyncio.wait_for(h.drain(), 1)
        with pytest.raises(Unavailable, match="shutting down"):
            h.admit()
        await asyncio.sleep(0.1)
        assert not [e for e in client.out if isinstance(e, ev.SessionMoved)]

"""``Stages`` over DeploymentHandles: how the gateway reaches the stage deployments.

VAD and the end-of-turn model run in the gateway process by default: a Ray hop (2-6 ms) costs
more than scoring a 32 ms window, and both are needed on every chunk or pause of every session.
Both are batched across the gateway's sessions: the chunks of every session that arrive within
one VAD tick are scored in one model call (``VADBatcher``), and end-of-turn checks queue for the
detector's own thread (batched up to ``turn_detector.max_batch``) instead of one thread each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from services.batching import Priority
from services.errors import Unavailable
from services.tools import ToolCallDelta, ToolChoice, ToolSpec
from services.turn_detection import SmartTurnModel
from services.vad import SileroModel, VADBatcher, VADState

log = logging.getLogger("ray.serve")

#: A stage call failed because the replica serving it went away (killed, node lost): the same
#: call to another replica may succeed.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
#: How often a call waiting for its first item looks whether its stage is known to be down.
DOWN_POLL_S = 0.25
#: How long a retried call may wait for a replica to take it. With two replicas the survivor
#: answers in milliseconds; with one, Serve holds the call until it has restarted the replica (5-9 s
#: measured here): the turn ends with an error event after this instead of leaving the caller in
#: silence, and the next turn finds the stage back.
RETRY_WAIT_S = 2.0
#: Serve's status (which stages have a running replica) is asked at most this often.
STATUS_PERIOD_S = 2.0


def _gone(stage: str, exc: BaseException) -> Unavailable:
    err = Unavailable(f"the {stage} stage lost its replica and none took the call again within {RETRY_WAIT_S:g} s; "
                      "it is restarting: say that again in a moment")
    err.__cause__ = exc
    return err


async def _bounded(stage: str, waiting: asyncio.Future[Any], is_down: Callable[[], bool]) -> Any:
    """``waiting``'s result; while the stage is (or becomes) known to be down, at most
    ``RETRY_WAIT_S`` more (Serve would hold the call until a replica is back: 5-10 s of silence)."""
    down_at: float | None = None
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=DOWN_POLL_S)
            if not waiting.done() and is_down():
                down_at = down_at or time.monotonic()
                if time.monotonic() - down_at >= RETRY_WAIT_S:
                    raise _gone(stage, TimeoutError())
        return waiting.result()
    finally:
        if not waiting.done():
            waiting.cancel()
            try:
                await waiting  # the remote call is cancelled before this returns
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the caller's own cancel: never swallowed
            except Exception:
                pass


def _always() -> bool:
    return True


async def _unary_retry(stage: str, make: Callable[[], DeploymentResponse | DeploymentResponseGenerator],
                       is_down: Callable[[], bool]) -> Any:
    """A unary stage call, retried once on another replica (or the restarted one) when its
    replica died under it; safe for calls without side effects (transcription, token counts).
    While ``is_down()`` (the stage has no running replica) it waits at most ``RETRY_WAIT_S``."""
    try:
        return await _bounded(stage, asyncio.ensure_future(_call(make())), is_down)
    except REPLICA_GONE as exc:
        log.warning("%s call: its replica went away (%s); retrying", stage, type(exc).__name__)
        try:
            return await _bounded(stage, asyncio.ensure_future(_call(make())), _always)
        except REPLICA_GONE as again:
            raise _gone(stage, again) from exc


async def _stream_retry(stage: str, make: Callable[[], DeploymentResponseGenerator | DeploymentResponse],
                        skip: Callable[[Any, int], Any] | None, is_down: Callable[[], bool]) -> AsyncIterator[Any]:
    """A streaming stage call that starts again on another replica when its replica dies.
    ``skip(item, n)``: ``item`` without its first ``n`` units (TTS: bytes of audio, so the retried
    chunk goes on where the dead replica stopped); None: only a call that yielded nothing yet may
    start again (the LLM: an answer not yet heard). ``is_down``: as for ``_unary_retry``, for
    the first item."""
    sent = 0  # units the caller has had
    attempt = 0
    while True:
        seen = 0  # units of this attempt's stream
        source = _first_within(_stream(make()), stage, _always if attempt else is_down)
        try:
            async for item in source:
                n = _units(item)
                if seen + n <= sent:  # the attempt before yielded all of it
                    seen += n
                    continue
                if seen < sent and skip is not None:
                    item = skip(item, sent - seen)
                seen += n
                sent = seen
                yield item
            return
        except REPLICA_GONE as exc:
            if attempt or (skip is None and sent):
                raise _gone(stage, exc) from exc
            log.warning("%s stream: its replica went away (%s) after %d units; retrying", stage,
                        type(exc).__name__, sent)
            attempt += 1


def _units(item: Any) -> int:
    return len(item) if isinstance(item, bytes | str) else 1


async def _first_within(stream: AsyncIterator[Any], stage: str, is_down: Callable[[], bool]) -> AsyncIterator[Any]:
    """``stream``, whose first item is awaited under ``_bounded`` (later ones come as they come)."""
    it = aiter(stream)
    try:
        try:
            first = await _bounded(stage, asyncio.ensure_future(anext(it)), is_down)
        except StopAsyncIteration:
            return
        yield first
        async for item in it:
            yield item
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def _stream(gen: DeploymentResponseGenerator | DeploymentResponse) -> AsyncIterator[Any]:
    """Iterate a streaming handle call; if the consumer stops early, cancel the remote call.

    Serve does not cancel the replica's generator when the awaiting task is cancelled, so the
    cancel is explicit: it reaches the replica as a CancelledError, which aborts vLLM's request.
    """
    assert isinstance(gen, DeploymentResponseGenerator), "call with .options(stream=True)"
    finished = False
    try:
        async for item in gen:
            yield item
        finished = True
    finally:
        if not finished:
            gen.cancel()


async def _call(response: DeploymentResponse | DeploymentResponseGenerator) -> Any:
    """Await a unary handle call; a cancelled caller cancels the call on the replica too."""
    assert isinstance(response, DeploymentResponse)
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class RemoteStages:
    """The conversation's stages as Ray Serve deployments (VAD and end of turn optionally local)."""

    def __init__(self, vad: DeploymentHandle, asr: DeploymentHandle, llm: DeploymentHandle,
                 tts: DeploymentHandle, local_vad: SileroModel | None = None,
                 turn_model: SmartTurnModel | None = None) -> None:
        self.vad, self.asr, self.llm, self.tts = vad, asr, llm, tts
        self.local_vad = local_vad
        self.turn_model = turn_model
        # Stages with no running replica (Serve's status), and stages whose health probe did not
        # answer: their calls wait at most RETRY_WAIT_S for one
        self._status_down: set[str] = set()
        self._probe_down: set[str] = set()
        self._status_at = -math.inf  # when Serve's status was last asked (replicas_running)
        # local VAD: one model call per tick for every session (batch_tick_ms 0 = inline calls)
        self.vad_batcher = (VADBatcher(local_vad) if local_vad is not None and local_vad.cfg.batch_tick_ms > 0
                            else None)

    @property
    def down(self) -> set[str]:
        """Stages known to have no replica that answers (from the gateway's health monitor)."""
        return self._status_down | self._probe_down

    async def probe(self, timeout_s: float | None) -> dict[str, Any]:
        """``info()``, each stage with its own ``timeout_s`` (None: waits for stages still
        starting): the ones that fail or do not answer in time are ``down`` until a later probe
        hears from them (UNAVAILABLE naming them)."""
        async def ask(name: str, response: Any) -> Any:
            try:
                return await asyncio.wait_for(_call(response), timeout_s)
            except Exception:
                failed.add(name)
                return None

        failed: set[str] = set()
        calls = [ask("TTS", self.tts.sample_rate.remote()), ask("LLM", self.llm.info.remote()),
                 ask("ASR", self.asr.info.remote())]
        if self.local_vad is None:
            calls.append(ask("VAD", self.vad.probs.remote(np.zeros(0, np.float32), VADState())))
        rate, llm, asr, *_ = await asyncio.gather(*calls)
        self._probe_down = failed
        if failed:
            raise Unavailable(f"the {', '.join(sorted(failed))} stage did not answer"
                              + (f" within {timeout_s:g} s" if timeout_s is not None else ""))
        return {"voice_rate": rate, "llm_model": llm["model"], "asr_model": asr["model"],
                "speech_native": llm["speech_native"]}

    async def vad_probs(self, audio16k: np.ndarray, state: VADState) -> tuple[np.ndarray, VADState]:
        if self.vad_batcher is not None:
            return await self.vad_batcher.score(audio16k, state)
        if self.local_vad is not None:
            return self.local_vad.probs(audio16k, state)
        result: tuple[np.ndarray, VADState] = await _call(self.vad.probs.remote(audio16k, state))
        return result

    async def transcribe(self, audio16k: np.ndarray, language: str | None,
                         priority: Priority | int | str = Priority.FINAL) -> Any:
        """Transcript of one utterance; ``priority``: FINAL (a turn waits for it), BARGE_IN,
        SPECULATIVE or PARTIAL: the ASR replica decodes more urgent work first."""
        level = int(Priority.parse(priority))  # a plain int crosses Ray
        return SimpleNamespace(**await _unary_retry(
            "ASR", lambda: self.asr.transcribe.remote(audio16k, language, level), lambda: "ASR" in self.down))

    async def partial_transcribe(self, audio16k: np.ndarray, language: str | None) -> str | None:
        text: str | None = await _call(self.asr.partial.remote(audio16k, language))
        return text

    async def end_of_turn(self, audio16k: np.ndarray) -> float | None:
        if self.turn_model is None:
            return None
        return await self.turn_model.apredict(audio16k)

    async def generate(self, messages: list[dict[str, Any]], *, max_tokens: int | None,
                       audio: np.ndarray | None = None, tools: list[ToolSpec] | None = None,
                       tool_choice: ToolChoice | None = None, words_only: bool = False,
                       ) -> AsyncIterator[str | ToolCallDelta]:
        def call() -> DeploymentResponseGenerator | DeploymentResponse:
            return self.llm.options(stream=True).generate.remote(messages, max_tokens, audio, tools, tool_choice,
                                                                 words_only)

        async for delta in _stream_retry("LLM", call, skip=None, is_down=lambda: "LLM" in self.down):
            yield delta

    async def synthesize(self, text: str, *, voice: str, sample_rate: int,
                         slack_s: float | None = None) -> AsyncIterator[bytes]:
        def call() -> DeploymentResponseGenerator | DeploymentResponse:
            return self.tts.options(stream=True).synthesize.remote(text, sample_rate, slack_s)

        async for pcm in _stream_retry("TTS", call, skip=lambda pcm, n: pcm[n:], is_down=lambda: "TTS" in self.down):
            yield pcm

    async def count_tokens(self, text: str) -> int:
        return int(await _unary_retry("LLM", lambda: self.llm.count_tokens.remote(text), lambda: "LLM" in self.down))

    async def info(self) -> dict[str, Any]:
        """Every stage answers (the gateway's health check) with what sessions need to know."""
        return await self.probe(None)

    async def replicas_running(self) -> None:
        """UNAVAILABLE when a stage has no running replica. A call alone does not tell: Serve holds
        it until a replica is back (2 s after a kill, here), and health must say NOT_SERVING
        while the stage is down, not only when the outage outlasts the call's timeout.

        Serve's status is asked at most every ``STATUS_PERIOD_S`` (between, the last verdict
        stands): ``serve.status()`` rebuilds every deployment's config, which took a quarter of a
        gateway replica's CPU at the health monitor's pace (2 a second) on a 2-core Zen 3."""
        from ray import serve

        if time.monotonic() - self._status_at < STATUS_PERIOD_S:
            if self._status_down:
                raise Unavailable(f"the {', '.join(sorted(self._status_down))} stage has no running replica")
            return
        self._status_at = time.monotonic()
        status = await asyncio.to_thread(serve.status)  # a controller call: off the event loop
        handles = [self.asr, self.llm, self.tts] + ([self.vad] if self.local_vad is None else [])
        down: set[str] = set()
        for handle in handles:
            app = status.applications.get(handle.app_name)
            deployment = app.deployments.get(handle.deployment_name) if app is not None else None
            if deployment is None:
                continue
            states: dict[str, int] = {str(getattr(k, "value", k)): int(n) for k, n in deployment.replica_states.items()}
            # None running while one starts or recovers, or while Serve says the deployment is not
            # healthy: down. None at all in a HEALTHY deployment: scaled to zero (min_replicas 0),
            # which the next call wakes; that is not an outage.
            healthy = str(getattr(deployment.status, "value", deployment.status)) == "HEALTHY"
            if not states.get("RUNNING", 0) and (any(states.values()) or not healthy):
                down.add(handle.deployment_name)
        self._status_down = down
        if down:
            raise Unavailable(f"the {', '.join(sorted(down))} stage has no running replica")

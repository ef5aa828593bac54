"""The ingress deployment: the Serve shell around the two transports of one gateway replica.

It builds what the transports share (the stage handles, the ``SessionHub``, API keys, metrics),
warms every path of a first turn up before taking traffic, answers the gRPC health check and
``stats()``, and delegates the rest: ``Converse``/``Transcribe``/``Synthesize`` (on Serve's gRPC
proxy) to ``deployments.grpc``, HTTP and WebSocket requests (on Serve's HTTP proxy: the realtime
API and the browser page) to ``deployments.realtime``. The two transports import nothing from
each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream
from ray.serve.handle import DeploymentHandle

from deployments.auth import ApiKeyAuth
from deployments.autoscaling import ScalingView
from deployments.config import DEPLOYMENTS, AppArgs
from deployments.drain import replica_shutdown_flag, watch_for_shutdown
from deployments.grpc.adapter import GrpcAdapter
from deployments.grpc.status import set_status
from deployments.journal_gcs import journal_store, resume_secret
from deployments.metrics import GatewayMetrics
from deployments.realtime.endpoint import RealtimeAdapter
from deployments.realtime.endpoint import app as realtime_app
from deployments.remote import RemoteStages
from deployments.sessions import SessionHub
from protos.voxserve.v1 import voice_pb2 as pb
from services.audio import MODEL_RATE
from services.errors import NotFound
from services.turn_detection import SmartTurnModel
from services.vad import SileroModel, VADState

log = logging.getLogger("ray.serve")
HEALTH_SERVICES = ("", "voxserve.v1.VoiceAssistant")


async def _drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


@serve.deployment(name="Gateway", max_ongoing_requests=48, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(realtime_app)  # HTTP/WebSocket (the realtime API, the page) beside the gRPC methods
class Gateway:
    """``voxserve.v1.VoiceAssistant``: Converse, Transcribe, Synthesize; gRPC health Check."""

    async def __init__(self, vad: DeploymentHandle, asr: DeploymentHandle,  # type: ignore[misc]
                       llm: DeploymentHandle, tts: DeploymentHandle, args: dict[str, Any] | None = None) -> None:
        self.args = AppArgs.model_validate(args or {})
        g = self.args.gateway
        self.auth = ApiKeyAuth.from_config(self.args.auth)
        local_vad = SileroModel.load(self.args.vad) if g.vad_in_gateway else None
        turn_model = SmartTurnModel.load(g.turn_detector) if g.turn_detector_enabled else None
        if turn_model is not None:
            turn_model.warm_up()  # the first pause of the first caller must not pay for it
        self.stages = RemoteStages(vad, asr, llm, tts, local_vad, turn_model)
        self.metrics = GatewayMetrics()
        self.hub = SessionHub(self.args, self.stages, observer=self.metrics)
        await self.hub.open_journal(journal_store(self.args.sessions), resume_secret(self.args.sessions))
        self.warm_up_s: dict[str, float] = {}
        self.grpc = GrpcAdapter(self.hub, self.auth, self.metrics)  # Converse, Transcribe, Synthesize
        self.realtime = RealtimeAdapter(self.args, self.hub, self.auth, self.metrics)  # /v1/realtime
        await self._warm_up()
        self._health_monitor = asyncio.get_running_loop().create_task(self.hub.monitor_health())
        # admission asks the autoscaler's latest decisions before it refuses a caller
        view = ScalingView(serve.get_replica_context().app_name, DEPLOYMENTS)
        self._scaling_watch = asyncio.get_running_loop().create_task(self.hub.watch_scaling(view))
        # a stopping replica moves its sessions (SessionMoved) instead of having them cut
        self._drain_watch = asyncio.get_running_loop().create_task(
            watch_for_shutdown(await asyncio.to_thread(replica_shutdown_flag), self.hub.drain))

    async def _warm_up(self) -> None:
        """One call down every path the first turn takes, before taking traffic: a handle's first
        streaming call sets up routing (~0.6 s measured), models allocate on their first run, and
        vLLM caches the system prompt's prefix; none of it may land on the first caller.
        ``warm_up_s`` records each path (``stats()`` shows it)."""
        silence = np.zeros(MODEL_RATE // 2, np.float32)
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("stage_info", lambda: self.hub.stage_info(timeout_s=None)),  # stages may still be starting
            ("vad", lambda: self.stages.vad_probs(silence, VADState())),
            ("end_of_turn", lambda: self.stages.end_of_turn(silence)),
            ("asr", lambda: self.stages.transcribe(silence, None)),
            ("llm", lambda: _drain(self.stages.generate([{"role": "user", "content": "Hi."}], max_tokens=1))),
            ("tts", lambda: _drain(self.stages.synthesize("Hi.", voice="", sample_rate=0))),
            ("count_tokens", lambda: self.stages.count_tokens("Hi.")),
        ]
        for name, step in steps:
            t0 = time.monotonic()
            try:
                await step()
            except Exception:  # a stage that is not up yet is not a reason to fail the gateway
                log.warning("gateway warm-up of %s failed; the first session may be slower", name, exc_info=True)
                continue
            self.warm_up_s[name] = round(time.monotonic() - t0, 3)

    # --- operators ------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Active sessions, capacity, recent p95 time to first audio (operators, autoscaling), and
        which paths were warmed up before the first session."""
        return {**self.hub.stats(), "warm_up_s": dict(self.warm_up_s)}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric of this replica (deployments.autoscaling.VoicePolicy):
        its sessions, burst included (a draining replica reports none: they are moving away), and
        the p95 time to first audio of its answers over admission's own window, in ms (0: no
        answer in it), which the model stages' policies hold against the app's latency budget.
        Async: it runs on the replica's loop, beside the sessions that change what it reads."""
        return {"sessions": 0.0 if self.hub.draining else float(self.hub.active),
                "first_audio_ms": self.hub.first_audio.p95(min_samples=1) or 0.0}

    # --- gRPC health (grpc.health.v1.Health, registered beside our servicer) ----------------------

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext | None = None) -> health_pb2.HealthCheckResponse:
        """SERVING while every stage answers now (asked again every few seconds: a dead stage
        turns it NOT_SERVING). No API key needed: probes must reach it."""
        if request.service not in HEALTH_SERVICES:
            set_status(grpc_context, NotFound(f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        ok = await self.hub.healthy()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    # --- voxserve.v1.VoiceAssistant: the gRPC transport -------------------------------------------
    # aclosing: when Ray closes a method's generator, the adapter's closes at once (its finally
    # stops the session), not whenever it is garbage-collected.

    async def Converse(self, request_stream: gRPCInputStream,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.ServerEvent]:
        async with contextlib.aclosing(self.grpc.converse(request_stream, grpc_context)) as events:
            async for event in events:
                yield event

    async def Transcribe(self, request_stream: gRPCInputStream,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.TranscriptEvent]:
        async with contextlib.aclosing(self.grpc.transcribe(request_stream, grpc_context)) as events:
            async for event in events:
                yield event

    async def Synthesize(self, request: pb.SynthesizeRequest,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.AudioChunk]:
        async with contextlib.aclosing(self.grpc.synthesize(request, grpc_context)) as chunks:
            async for chunk in chunks:
                yield chunk

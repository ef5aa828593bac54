"""The ingress deployment: the public gRPC API, bound to Serve's gRPC proxy.

``Converse`` runs one ``services.session.Conversation`` per stream: a reader task validates and
feeds the client's messages while this method streams the conversation's events back, so a
reply never blocks listening. Errors from our family end the stream with their status code
(set on the gRPC context before raising, which Serve passes through instead of INTERNAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import numpy as np
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs
from deployments.metrics import GatewayMetrics
from deployments.protocol import (
    check_encoding,
    check_language,
    decode_audio,
    event_to_proto,
    settings_from_config,
    status_code,
)
from deployments.remote import RemoteStages
from protos.voxserve.v1 import voice_pb2 as pb
from services.audio import MODEL_RATE, StreamResampler, check_rate
from services.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    VoxError,
)
from services.history import ChatHistory
from services.session import Conversation, SessionSettings
from services.vad import WINDOW, SileroModel, SpeechEnd, VADSegmenter, VADState

log = logging.getLogger("ray.serve")
HEALTH_SERVICES = ("", "voxserve.v1.VoiceAssistant")
HEALTH_TIMEOUT_S = 5.0
RECENT_SESSIONS = 64


def _abort(context: RayServegRPCContext | None, exc: VoxError) -> NoReturn:
    if context is not None:
        context.set_code(status_code(exc))
        context.set_details(exc.message)
    raise exc


@serve.deployment(name="Gateway", max_ongoing_requests=48, ray_actor_options={"num_cpus": 0.5})
class Gateway:
    """``voxserve.v1.VoiceAssistant``: Converse, Transcribe, Synthesize."""

    async def __init__(self, vad: DeploymentHandle, asr: DeploymentHandle,  # type: ignore[misc]
                       llm: DeploymentHandle, tts: DeploymentHandle, args: dict[str, Any] | None = None) -> None:
        self.args = AppArgs.model_validate(args or {})
        local_vad = SileroModel.load(self.args.vad) if self.args.gateway.vad_in_gateway else None
        self.stages = RemoteStages(vad, asr, llm, tts, local_vad)
        self._tts, self._llm, self._asr = tts, llm, asr
        self._info: dict[str, Any] | None = None
        self.active = 0
        self.metrics = GatewayMetrics()
        self.conversations: set[Conversation] = set()
        # Histories of recently ended sessions, for operators and tests (bounded).
        self._recent: OrderedDict[str, list[dict[str, str]]] = OrderedDict()
        await self._warm_up()

    async def _warm_up(self) -> None:
        """One call down every path before taking traffic: a handle's first streaming call sets up
        routing (~0.6 s measured), which would otherwise land on the first caller's first answer."""
        try:
            info = await self._stage_info()
            async for _ in self.stages.synthesize("Hi.", voice="", sample_rate=info["voice_rate"]):
                pass
            async for _ in self.stages.generate([{"role": "user", "content": "Hi."}], max_tokens=1):
                pass
            await self.stages.transcribe(np.zeros(MODEL_RATE // 2, np.float32), "en")
        except Exception:  # a stage that is not up yet is not a reason to fail the gateway
            log.warning("gateway warm-up failed; the first session may be slower", exc_info=True)

    async def _stage_info(self) -> dict[str, Any]:
        if self._info is None:
            rate, llm, asr = await asyncio.gather(self._tts.sample_rate.remote(), self._llm.info.remote(),
                                                  self._asr.info.remote())
            self._info = {"voice_rate": rate, "llm_model": llm["model"], "asr_model": asr["model"],
                          "speech_native": llm["speech_native"]}
        return self._info

    def _admit(self, context: RayServegRPCContext | None) -> None:
        limit = self.args.gateway.max_sessions
        if self.active >= limit:
            _abort(context, ResourceExhausted(
                f"server busy: {limit} sessions already active on this replica; retry shortly"))

    async def _first(self, stream: gRPCInputStream, kind: str) -> Any:
        try:
            return await asyncio.wait_for(anext(stream), self.args.gateway.first_message_timeout_s)
        except StopAsyncIteration:
            raise InvalidArgument(f"the stream ended before its {kind}; send a {kind} first") from None
        except TimeoutError:
            raise DeadlineExceeded(f"no {kind} within {self.args.gateway.first_message_timeout_s:.0f} s") from None

    def _remember(self, conv: Conversation) -> None:
        self._recent[conv.session_id] = conv.history.messages()
        while len(self._recent) > RECENT_SESSIONS:
            self._recent.popitem(last=False)

    async def session_history(self, session_id: str) -> list[dict[str, str]] | None:
        """The chat history (as the LLM would see it) of a live or recently ended session."""
        for conv in self.conversations:
            if conv.session_id == session_id:
                return conv.history.messages()
        return self._recent.get(session_id)

    async def stats(self) -> dict[str, int]:
        return {"active_sessions": self.active,
                "barge_ins": sum(c.barge_ins for c in self.conversations)}

    # --- Converse -----------------------------------------------------------------------------

    async def Converse(self, request_stream: gRPCInputStream,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.ServerEvent]:
        self._admit(grpc_context)
        self.active += 1
        self.metrics.session_started()
        status = "OK"
        conv: Conversation | None = None
        reader: asyncio.Task[None] | None = None
        try:
            first = await self._first(request_stream, "SessionConfig")
            if first.WhichOneof("message") != "config":
                raise FailedPrecondition("the first message must be a SessionConfig (got "
                                         f"{first.WhichOneof('message') or 'an empty message'})")
            info = await self._stage_info()
            settings = settings_from_config(first.config, self.args, voice_rate=info["voice_rate"],
                                            speech_native_available=info["speech_native"])
            history = ChatHistory(settings.system_prompt or self.args.llm.system_prompt)
            conv = Conversation(self.stages, settings, history=history, mode_info=info)
            self.conversations.add(conv)
            await conv.start()
            reader = asyncio.create_task(self._read(request_stream, conv, settings))
            async for event in conv.events():
                self.metrics.observe(event)
                yield event_to_proto(event)
            await reader  # re-raises the reader's error, if any, as this stream's status
        except VoxError as exc:
            status = exc.code
            _abort(grpc_context, exc)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.metrics.session_ended(status)
            if reader is not None and not reader.done():
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            if conv is not None:
                await conv.aclose()
                self.conversations.discard(conv)
                self._remember(conv)
            self.active -= 1

    async def _read(self, stream: gRPCInputStream, conv: Conversation, settings: SessionSettings) -> None:
        """Reader task: validate each client message and feed the conversation."""
        g = self.args.gateway
        max_samples = int(g.max_stream_s * settings.input_sample_rate)
        received = 0
        try:
            async for msg in stream:
                kind = msg.WhichOneof("message")
                if kind == "audio":
                    samples = decode_audio(msg.audio.data, g.max_message_bytes)
                    received += samples.size
                    if received > max_samples:
                        raise ResourceExhausted(f"stream exceeded its {g.max_stream_s:.0f} s audio limit")
                    if samples.size:
                        await conv.push_audio(samples)
                elif kind == "text":
                    text = msg.text.text.strip()
                    if not text:
                        raise InvalidArgument("text turn is empty")
                    if len(text) > g.max_text_chars:
                        raise OutOfRange(f"text turn has {len(text)} characters; at most {g.max_text_chars}")
                    await conv.push_text(text)
                elif kind == "playback":
                    conv.playback(msg.playback.response_id, msg.playback.played_ms)
                elif kind == "end_of_input":
                    break
                elif kind == "config":
                    raise FailedPrecondition("SessionConfig may only be sent once, as the first message")
                else:
                    raise InvalidArgument("empty ClientMessage: set one of config, audio, text, playback")
            if stream.is_cancelled():
                # Ray ends the input iteration quietly when the client cancels or disconnects:
                # that is not a half-close, so nothing may go on being generated for nobody.
                await conv.aclose()
            else:
                await conv.end_input()  # finish the turn in progress, then close the event stream
        except BaseException:
            await conv.aclose()
            raise

    # --- Transcribe ---------------------------------------------------------------------------

    async def Transcribe(self, request_stream: gRPCInputStream,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.TranscriptEvent]:
        self._admit(grpc_context)
        self.active += 1
        try:
            first = await self._first(request_stream, "TranscribeConfig")
            if first.WhichOneof("message") != "config":
                raise FailedPrecondition("the first message must be a TranscribeConfig")
            cfg = first.config
            check_encoding(cfg.encoding)
            rate = check_rate(cfg.sample_rate or MODEL_RATE)
            language = check_language(cfg.language)
            resampler = StreamResampler(rate, MODEL_RATE)
            segmenter, state = VADSegmenter(self.args.vad), VADState()
            max_samples = int(self.args.gateway.max_stream_s * rate)
            received = 0
            flushing = False
            while True:
                msg = await anext(request_stream, None)
                if msg is None:
                    if request_stream.is_cancelled():
                        return  # the client is gone: no final decode for nobody
                    flushing = True
                    x = np.zeros((WINDOW - state.leftover.size) % WINDOW, np.float32)  # score the tail
                elif msg.WhichOneof("message") != "audio":
                    raise FailedPrecondition("after the config, Transcribe takes only audio messages")
                else:
                    samples = decode_audio(msg.audio.data, self.args.gateway.max_message_bytes)
                    received += samples.size
                    if received > max_samples:
                        raise ResourceExhausted(
                            f"stream exceeded its {self.args.gateway.max_stream_s:.0f} s audio limit")
                    x = resampler.push(samples)
                lead = state.leftover
                probs, state = await self.stages.vad_probs(x, state)
                scored = np.concatenate([lead, x]) if lead.size else x
                events = segmenter.feed(probs, scored[: probs.size * WINDOW])
                if flushing:
                    events += segmenter.flush()
                for event in events:
                    if isinstance(event, SpeechEnd):
                        result = await self.stages.transcribe(event.audio, language)
                        if result.text.strip():
                            yield pb.TranscriptEvent(text=result.text.strip(), is_final=True,
                                                     language=result.language or "",
                                                     start_ms=event.start_ms, end_ms=event.end_ms)
                if flushing:
                    return
        except VoxError as exc:
            _abort(grpc_context, exc)
        finally:
            self.active -= 1

    # --- gRPC health (grpc.health.v1.Health, registered beside our servicer) -------------------

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext | None = None) -> health_pb2.HealthCheckResponse:
        """SERVING once every stage deployment has answered (kubelet readiness probe)."""
        if request.service not in HEALTH_SERVICES:
            _abort(grpc_context, NotFound(f"unknown service {request.service!r}"))
        try:
            await asyncio.wait_for(self._stage_info(), HEALTH_TIMEOUT_S)
        except (TimeoutError, Exception):  # any stage not answering yet means not ready
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # --- Synthesize ---------------------------------------------------------------------------

    async def Synthesize(self, request: pb.SynthesizeRequest,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.AudioChunk]:
        try:
            text = request.text.strip()
            if not text:
                raise InvalidArgument("text is empty")
            if len(text) > self.args.gateway.max_text_chars:
                raise OutOfRange(f"text has {len(text)} characters; at most {self.args.gateway.max_text_chars}")
            if request.voice not in ("", "default") and request.voice != self.args.tts.voice:
                raise InvalidArgument(f"unknown voice {request.voice!r}; leave voice empty")
            info = await self._stage_info()
            rate = check_rate(request.sample_rate) if request.sample_rate else info["voice_rate"]
            offset = 0.0
            async for pcm in self.stages.synthesize(text, voice=request.voice, sample_rate=rate):
                yield pb.AudioChunk(data=pcm, sample_rate=rate, offset_ms=int(offset))
                offset += 1000.0 * (len(pcm) // 2) / rate
        except VoxError as exc:
            _abort(grpc_context, exc)

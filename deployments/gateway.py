"""The ingress deployment: the public gRPC API on Serve's gRPC proxy (a thin protocol adapter).

``Converse`` drives one ``services.conversation.Conversation`` per stream, opened through the
shared ``SessionHub``: a reader task validates and feeds the client's messages while this method
streams the conversation's events back, so a reply never blocks listening.

Errors end a stream with their status code. Serve's proxy copies the replica's gRPC context onto
the call with each streamed message, so the code is set and then one last message carries it
(Converse: an Error event with the same code; Transcribe/Synthesize: an empty message). Raising
instead would also work, but Serve then logs a traceback for every client mistake.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream
from ray.serve.handle import DeploymentHandle

from deployments.auth import ApiKeyAuth
from deployments.config import AppArgs
from deployments.metrics import GatewayMetrics
from deployments.protocol import (
    WireFormat,
    check_language,
    check_text,
    decode_audio,
    encoding_of,
    event_to_proto,
    settings_from_config,
    status_code,
)
from deployments.realtime import RealtimeAdapter
from deployments.realtime import app as realtime_app
from deployments.remote import RemoteStages
from deployments.sessions import SessionHub
from protos.voxserve.v1 import voice_pb2 as pb
from services.audio import MODEL_RATE, StreamResampler
from services.codecs import check_encoding_rate, decoder
from services.conversation import Conversation, SessionSettings
from services.conversation.aio import TaskGroup, cancel_and_wait
from services.conversation.events import ErrorEvent
from services.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    VoxError,
    to_vox_error,
)
from services.turn_detection import SmartTurnModel
from services.vad import SileroModel, SpeechEnd, VADState, VADStream

log = logging.getLogger("ray.serve")
HEALTH_SERVICES = ("", "voxserve.v1.VoiceAssistant")
#: Why a stream's input may end with Ray's cancel flag set: the client went away, or Ray's proxy
#: could not decode one of its messages (it ends the input stream the same way).
CUT_STREAM = ("the stream was cut: the client cancelled it, or sent bytes that are not a "
              "voxserve.v1.ClientMessage")


class _Liveness:
    """When a Converse client last sent anything, and whether it streams audio."""

    def __init__(self) -> None:
        self.last_message = time.monotonic()
        self.audio = False


async def _drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


def _fail(context: RayServegRPCContext | None, exc: BaseException) -> str:
    """Set the status for ``exc`` on the context (the caller then returns normally)."""
    err = to_vox_error(exc)
    if context is not None:
        context.set_code(status_code(err))
        context.set_details(err.message)
        retry = getattr(err, "retry_after_s", None)
        if retry:
            context.set_trailing_metadata([("retry-after-ms", str(int(retry * 1000)))])
    return err.code


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
        self._tasks = TaskGroup()  # Converse supervisors: they outlive a generator Ray stops pulling
        self.warm_up_s: dict[str, float] = {}
        self.realtime = RealtimeAdapter(self.args, self.hub, self.auth, self.metrics)  # /v1/realtime
        await self._warm_up()

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

    def _authorize(self, context: RayServegRPCContext | None) -> None:
        if context is not None:
            self.auth.check_grpc_metadata(context.invocation_metadata(), peer=context.peer())

    async def _first(self, stream: gRPCInputStream, kind: str) -> Any:
        try:
            return await asyncio.wait_for(anext(stream), self.args.gateway.first_message_timeout_s)
        except StopAsyncIteration:
            if stream.is_cancelled():
                raise InvalidArgument(f"{CUT_STREAM}; the first message must be a {kind}") from None
            raise InvalidArgument(f"the stream ended before its {kind}; send a {kind} first") from None
        except TimeoutError:
            raise DeadlineExceeded(f"no {kind} within {self.args.gateway.first_message_timeout_s:.0f} s") from None

    # --- operator and test views ---------------------------------------------------------------

    async def session_history(self, session_id: str) -> list[dict[str, Any]] | None:
        """The recorded history of a live or recently ended session (with interruption flags)."""
        return self.hub.history(session_id)

    async def stats(self) -> dict[str, Any]:
        """Active sessions, capacity, recent p95 time to first audio (operators, autoscaling), and
        which paths were warmed up before the first session."""
        return {**self.hub.stats(), "warm_up_s": dict(self.warm_up_s)}

    # --- Converse -------------------------------------------------------------------------------

    async def Converse(self, request_stream: gRPCInputStream,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.ServerEvent]:
        """Relays the conversation's events; the session itself is owned by a supervisor task.

        Ray's proxy can lose a client's hang-up: it then neither cancels this generator nor ends
        the input stream, and may stop pulling this generator for good. So nothing that must
        happen (reading, the liveness watchdog, closing the conversation, freeing the slot) runs
        in this generator: the supervisor does it whatever becomes of the generator.
        """
        supervisor: asyncio.Task[None] | None = None
        try:
            self._authorize(grpc_context)
            self.hub.admit()
            first = await self._first(request_stream, "SessionConfig")
            if first.WhichOneof("message") != "config":
                raise FailedPrecondition("the first message must be a SessionConfig (got "
                                         f"{first.WhichOneof('message') or 'an empty message'})")
            info = await self.hub.stage_info()
            settings, wire = settings_from_config(first.config, self.args, voice_rate=info["voice_rate"],
                                                  speech_native_available=info["speech_native"])
            opened: asyncio.Future[Conversation] = asyncio.get_running_loop().create_future()
            supervisor = self._tasks.spawn(self._supervise(request_stream, settings, wire, opened),
                                           name="converse-supervisor")
            conv = await opened
            async for event in conv.events():
                self.metrics.observe(event)
                message = event_to_proto(event, wire)
                if message is not None:
                    yield message
            await supervisor  # the reader's or the watchdog's error, if any, is this stream's status
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = to_vox_error(exc)
            _fail(grpc_context, err)
            if supervisor is None:
                self.metrics.session_started()
                self.metrics.session_ended(err.code)
            yield pb.ServerEvent(error=pb.Error(code=err.code, message=err.message))  # carries the status
        finally:
            if supervisor is not None and not supervisor.done():
                supervisor.cancel()  # the client is gone: the supervisor stops everything

    async def _supervise(self, stream: gRPCInputStream, settings: SessionSettings, wire: WireFormat,
                         opened: asyncio.Future[Conversation]) -> None:
        """Owns one Converse session: opens it, runs the reader and the liveness watchdog, and
        closes everything (LLM requests aborted, slot freed) however the stream ends."""
        status = "OK"
        self.metrics.session_started()
        try:
            async with self.hub.session(settings) as conv:
                opened.set_result(conv)
                alive = _Liveness()
                reader = asyncio.create_task(self._read(stream, conv, wire, alive))
                watchdog = asyncio.create_task(self._watch(alive))
                try:
                    done, _ = await asyncio.wait({reader, watchdog}, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # the reader's error, or the watchdog's verdict
                finally:
                    await cancel_and_wait(reader, watchdog)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            status = to_vox_error(exc).code
            if not opened.done():  # it could not open: Converse reports why
                opened.set_exception(exc)
                return
            raise
        finally:
            if not opened.done():
                opened.cancel()
            self.metrics.session_ended(status)

    async def _watch(self, alive: _Liveness) -> None:
        """Ends the session when the client stops sending: after audio, ``client_audio_timeout_s``
        (a live microphone never stops); before any, ``client_idle_timeout_s``."""
        g = self.args.gateway
        while True:
            limit = g.client_audio_timeout_s if alive.audio else g.client_idle_timeout_s
            quiet = time.monotonic() - alive.last_message
            if quiet > limit:
                raise DeadlineExceeded(
                    f"no message for {limit:g} s: a live audio stream must keep sending (silence included) "
                    "until EndOfInput; the stream is taken as hung up" if alive.audio else
                    f"no message for {limit:g} s; closing the idle stream")
            await asyncio.sleep(min(0.25, limit - quiet + 0.01))

    async def _read(self, stream: gRPCInputStream, conv: Conversation, wire: WireFormat, alive: _Liveness) -> None:
        """Reader task: validate each client message and feed the conversation."""
        g = self.args.gateway
        max_samples = int(g.max_stream_s * conv.settings.input_sample_rate)
        received = 0
        half_closed = False
        try:
            async for msg in stream:
                alive.last_message = time.monotonic()
                kind = msg.WhichOneof("message")
                if kind == "audio":
                    samples = decode_audio(msg.audio.data, g.max_message_bytes, wire.decode)
                    received += samples.size
                    alive.audio = True
                    if received > max_samples:
                        raise ResourceExhausted(f"stream exceeded its {g.max_stream_s:.0f} s audio limit")
                    if samples.size:
                        await conv.push_audio(samples)
                elif kind == "text":
                    await conv.push_text(check_text(msg.text.text, g.max_text_chars), interrupt=msg.text.interrupt)
                elif kind == "playback":
                    conv.playback(msg.playback.response_id, msg.playback.played_ms)
                elif kind in ("commit", "clear", "cancel_response"):
                    await self._control(conv, kind)
                elif kind == "end_of_input":
                    half_closed = True
                    break
                elif kind == "config":
                    raise FailedPrecondition("SessionConfig may only be sent once, as the first message")
                else:
                    raise InvalidArgument("empty ClientMessage: set one of config, audio, text, playback, "
                                          "commit, clear, cancel_response, end_of_input")
            if stream.is_cancelled():
                # Ray ends the input quietly when the client goes away, and also when its proxy
                # cannot decode a message: stop everything; the status reaches a client still there.
                await conv.aclose()
                raise InvalidArgument(CUT_STREAM)
            if not half_closed:
                # When a client hangs up, Ray's proxy may end the input like a normal half-close and
                # then stop relaying: only EndOfInput means "finish the answer, then end".
                await conv.aclose()
                raise Cancelled("the request stream ended without EndOfInput: taken as a hang-up, everything "
                                "in progress was stopped (send EndOfInput to let the answer finish)")
            alive.audio = False  # half-closed: the answer may take longer than the audio timeout
            alive.last_message = math.inf
            await conv.end_input()  # finish the turn in progress, then close the event stream
        except BaseException:
            await conv.aclose()
            raise

    @staticmethod
    async def _control(conv: Conversation, kind: str) -> None:
        """Turn control messages: a mistake (nothing to commit) is reported, the stream goes on."""
        try:
            if kind == "commit":
                await conv.commit_audio()
            elif kind == "clear":
                await conv.clear_audio()
            else:
                await conv.cancel_response()
        except VoxError as exc:
            await conv.emit(ErrorEvent(code=exc.code, message=exc.message))

    # --- Transcribe -----------------------------------------------------------------------------

    async def Transcribe(self, request_stream: gRPCInputStream,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.TranscriptEvent]:
        try:
            self._authorize(grpc_context)
            async with self.hub.slot():
                async for event in self._transcribe(request_stream):
                    yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _fail(grpc_context, exc)
            yield pb.TranscriptEvent()  # empty: it carries the status

    async def _transcribe(self, request_stream: gRPCInputStream) -> AsyncIterator[pb.TranscriptEvent]:
        first = await self._first(request_stream, "TranscribeConfig")
        if first.WhichOneof("message") != "config":
            raise FailedPrecondition("the first message must be a TranscribeConfig")
        cfg = first.config
        enc = encoding_of(cfg.encoding)
        rate = check_encoding_rate(enc, cfg.sample_rate or (MODEL_RATE if enc == "pcm16" else 8000))
        language = check_language(cfg.language)
        decode = decoder(enc)
        resampler = StreamResampler(rate, MODEL_RATE)
        vad = VADStream(self.stages.vad_probs, self.args.vad)
        max_samples = int(self.args.gateway.max_stream_s * rate)
        received = 0
        while True:
            msg = await anext(request_stream, None)
            if msg is None:
                if request_stream.is_cancelled():
                    return  # the client is gone: no final decode for nobody
                events = await vad.flush()
            elif msg.WhichOneof("message") != "audio":
                raise FailedPrecondition("after the config, Transcribe takes only audio messages")
            else:
                samples = decode_audio(msg.audio.data, self.args.gateway.max_message_bytes, decode)
                received += samples.size
                if received > max_samples:
                    raise ResourceExhausted(f"stream exceeded its {self.args.gateway.max_stream_s:.0f} s audio limit")
                events = await vad.push(resampler.push(samples))
            for event in events:
                if isinstance(event, SpeechEnd):
                    result = await self.stages.transcribe(event.audio, language)
                    if result.text.strip():
                        yield pb.TranscriptEvent(text=result.text.strip(), is_final=True,
                                                 language=result.language or "",
                                                 start_ms=event.start_ms, end_ms=event.end_ms)
            if msg is None:
                return

    # --- gRPC health (grpc.health.v1.Health, registered beside our servicer) ------------------------

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext | None = None) -> health_pb2.HealthCheckResponse:
        """SERVING while every stage answers now (asked again every few seconds: a dead stage
        turns it NOT_SERVING). No API key needed: probes must reach it."""
        if request.service not in HEALTH_SERVICES:
            _fail(grpc_context, NotFound(f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        ok = await self.hub.healthy()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    # --- Synthesize -----------------------------------------------------------------------------

    async def Synthesize(self, request: pb.SynthesizeRequest,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.AudioChunk]:
        try:
            self._authorize(grpc_context)
            text = check_text(request.text, self.args.gateway.max_text_chars)
            if request.voice not in ("", "default") and request.voice != self.args.tts.voice:
                raise InvalidArgument(f"unknown voice {request.voice!r}; leave voice empty")
            info = await self.hub.stage_info()
            rate = check_encoding_rate("pcm16", request.sample_rate) if request.sample_rate else info["voice_rate"]
            offset = 0.0
            async for pcm in self.stages.synthesize(text, voice=request.voice, sample_rate=rate):
                yield pb.AudioChunk(data=pcm, sample_rate=rate, offset_ms=int(offset))
                offset += 1000.0 * (len(pcm) // 2) / rate
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _fail(grpc_context, exc)
            yield pb.AudioChunk()  # empty: it carries the status


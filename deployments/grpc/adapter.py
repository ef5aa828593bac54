"""The gRPC methods of ``voxserve.v1.VoiceAssistant``: Converse, Transcribe, Synthesize.

``Converse`` drives one ``services.conversation.Conversation`` per stream, opened through the
shared ``SessionHub``: a reader task validates and feeds the client's messages while the method
streams the conversation's events back, so a reply never blocks listening. Errors end a stream
with their status code (``deployments.grpc.status``). The Gateway deployment delegates its
methods of the same names here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream

from deployments.auth import ApiKeyAuth
from deployments.grpc.mapper import event_to_proto
from deployments.grpc.session_config import resumed_settings, settings_from_config
from deployments.grpc.status import set_status
from deployments.grpc.wire import AudioWire
from deployments.metrics import GatewayMetrics
from deployments.session_checks import check_language, check_text, check_voice
from deployments.sessions import SessionHub
from protos.voxserve.v1 import voice_pb2 as pb
from services.audio import MODEL_RATE, StreamResampler
from services.codecs import check_encoding_rate
from services.conversation import Conversation, SessionSettings
from services.conversation.aio import TaskGroup, cancel_and_wait
from services.conversation.events import ErrorEvent
from services.conversation.snapshot import restore_settings
from services.conversation.vad_stream import SpeechEnd, VADStream
from services.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    VoxError,
    to_vox_error,
)

#: Why a stream's input may end with Ray's cancel flag set: the client went away, or Ray's proxy
#: could not decode one of its messages (it ends the input stream the same way).
CUT_STREAM = ("the stream was cut: the client cancelled it, or sent bytes that are not a "
              "voxserve.v1.ClientMessage")


#: How a moved session's stream ends (after its SessionMoved event).
MOVED = ("this server is shutting down: the session moved; reconnect with the resume_token of SessionMoved "
         "(SessionConfig.resume_token) to continue it")


#: Client messages read ahead of the conversation (a bound: past it, reading waits).
INBOX_MESSAGES = 64
_ENDED = object()  # the request stream ended (without EndOfInput)


class _Liveness:
    """When a Converse client last sent anything, and whether it streams audio."""

    def __init__(self) -> None:
        self.last_message = time.monotonic()
        self.audio = False


class GrpcAdapter:
    """The gRPC transport of one gateway replica: authentication, sessions, the three methods."""

    def __init__(self, hub: SessionHub, auth: ApiKeyAuth, metrics: GatewayMetrics) -> None:
        self.hub = hub
        self.args = hub.args
        self.stages = hub.stages
        self.auth = auth
        self.metrics = metrics
        self._tasks = TaskGroup()  # Converse supervisors: they outlive a generator Ray stops pulling

    def _authorize(self, context: RayServegRPCContext | None) -> str:
        """Who the caller is ('' without authentication); UNAUTHENTICATED without a valid key."""
        if context is None:
            return ""
        return self.auth.check_grpc_metadata(context.invocation_metadata(), peer=context.peer())

    async def _first(self, stream: gRPCInputStream, kind: str) -> Any:
        try:
            return await asyncio.wait_for(anext(stream), self.args.gateway.first_message_timeout_s)
        except StopAsyncIteration:
            if stream.is_cancelled():
                raise InvalidArgument(f"{CUT_STREAM}; the first message must be a {kind}") from None
            raise InvalidArgument(f"the stream ended before its {kind}; send a {kind} first") from None
        except TimeoutError:
            raise DeadlineExceeded(f"no {kind} within {self.args.gateway.first_message_timeout_s:.0f} s") from None

    # --- Converse -------------------------------------------------------------------------------

    async def converse(self, request_stream: gRPCInputStream,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncGenerator[pb.ServerEvent, None]:
        """Relays the conversation's events; the session itself is owned by a supervisor task.

        Ray's proxy can lose a client's hang-up: it then neither cancels this generator nor ends
        the input stream, and may stop pulling this generator for good. So nothing that must
        happen (reading, the liveness watchdog, closing the conversation, freeing the slot) runs
        in this generator: the supervisor does it whatever becomes of the generator.
        """
        supervisor: asyncio.Task[None] | None = None
        try:
            owner = self._authorize(grpc_context)
            self.hub.admit(resuming=True)  # draining or a stage down: refused before anything is read
            first = await self._first(request_stream, "SessionConfig")
            if first.WhichOneof("message") != "config":
                raise FailedPrecondition("the first message must be a SessionConfig (got "
                                         f"{first.WhichOneof('message') or 'an empty message'})")
            # a refused new call ends before the client streams audio (it waits for SessionStarted);
            # a resumed one is a live call moving in (see SessionHub.admit)
            self.hub.admit(resuming=bool(first.config.resume_token))
            info = await self.hub.stage_info()
            restored: dict[str, Any] | None = None
            if first.config.resume_token:
                restored = await self.hub.resume(first.config.resume_token, owner)
                settings, wire = resumed_settings(first.config, restore_settings(restored), self.args,
                                                  voice_rate=info["voice_rate"],
                                                  speech_native_available=info["speech_native"])
            else:
                settings, wire = settings_from_config(first.config, self.args, voice_rate=info["voice_rate"],
                                                      speech_native_available=info["speech_native"])
            opened: asyncio.Future[Conversation] = asyncio.get_running_loop().create_future()
            supervisor = self._tasks.spawn(self._supervise(request_stream, settings, wire, opened, owner, restored),
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
            err = set_status(grpc_context, exc)
            if supervisor is None:
                self.metrics.session_started()
                self.metrics.session_ended(err.code)
            yield pb.ServerEvent(error=pb.Error(code=err.code, message=err.message))  # carries the status
        finally:
            if supervisor is not None and not supervisor.done():
                supervisor.cancel()  # the client is gone: the supervisor stops everything

    async def _supervise(self, stream: gRPCInputStream, settings: SessionSettings, wire: AudioWire,
                         opened: asyncio.Future[Conversation], owner: str = "",
                         restored: dict[str, Any] | None = None) -> None:
        """Owns one Converse session: opens it, runs the reader and the liveness watchdog, and
        closes everything (LLM requests aborted, slot freed) however the stream ends. A session
        the hub moves (drain) gets its SessionMoved, then the stream ends with UNAVAILABLE."""
        status = "OK"
        self.metrics.session_started()
        try:
            async with self.hub.session(settings, owner=owner, restored=restored) as conv:
                opened.set_result(conv)
                alive = _Liveness()
                reader = asyncio.create_task(self._read(stream, conv, wire, alive))
                watchdog = asyncio.create_task(self._watch(alive))
                moved = asyncio.create_task(self.hub.wait_moved(conv))
                try:
                    done, _ = await asyncio.wait({reader, watchdog, moved}, return_when=asyncio.FIRST_COMPLETED)
                    if moved in done:
                        await conv.aclose(drain=True)  # SessionMoved reaches the client, then the end
                        raise Unavailable(MOVED)
                    for task in done:
                        task.result()  # the reader's error, or the watchdog's verdict
                finally:
                    await cancel_and_wait(reader, watchdog, moved)
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

    @staticmethod
    async def _receive(stream: gRPCInputStream, inbox: asyncio.Queue[Any], alive: _Liveness) -> None:
        """Pulls the client's messages as they come, while the conversation works on earlier ones:
        behind Serve's gRPC proxy each message is an actor round trip, and waiting for the
        conversation between round trips made streams of short messages fall behind real time.
        Ends with ``_ENDED`` (or the stream's error) in the inbox; stops after EndOfInput."""
        end: Any = _ENDED
        try:
            async for msg in stream:
                alive.last_message = time.monotonic()
                await inbox.put(msg)
                if msg.WhichOneof("message") == "end_of_input":
                    return
        except asyncio.CancelledError:
            # the reader cancelled us (it is done), or the stream's read was: then the reader must
            # not wait for more (with a full inbox, the liveness watchdog ends it)
            with contextlib.suppress(asyncio.QueueFull):
                inbox.put_nowait(_ENDED)
            raise
        except Exception as exc:
            end = exc
        await inbox.put(end)

    async def _read(self, stream: gRPCInputStream, conv: Conversation, wire: AudioWire, alive: _Liveness) -> None:
        """Reader: validate each client message, in order, and feed the conversation. Audio
        messages that queued up while the conversation was busy go in as one piece (one VAD
        pass), so a backlog drains faster than it built up."""
        g = self.args.gateway
        max_samples = int(g.max_stream_s * conv.settings.input_sample_rate)
        received = 0
        half_closed = False
        inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=INBOX_MESSAGES)
        receiver = asyncio.create_task(self._receive(stream, inbox, alive))
        try:
            pending: Any = None
            while True:
                msg = pending if pending is not None else await inbox.get()
                pending = None
                if msg is _ENDED or stream.is_cancelled():
                    break  # (a hung-up client's read-ahead messages start nothing)
                if isinstance(msg, BaseException):
                    raise msg
                kind = msg.WhichOneof("message")
                if kind == "audio":
                    pieces = [wire.decode(msg.audio.data)]
                    while not inbox.empty() and len(pieces) < INBOX_MESSAGES:
                        nxt = inbox.get_nowait()
                        if isinstance(nxt, pb.ClientMessage) and nxt.WhichOneof("message") == "audio":
                            pieces.append(wire.decode(nxt.audio.data))
                        else:
                            pending = nxt  # handled next, in order
                            break
                    samples = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                    received += samples.size
                    alive.audio = True
                    if received > max_samples:
                        raise ResourceExhausted(f"stream exceeded its {g.max_stream_s:.0f} s audio limit")
                    if samples.size:
                        await conv.push_audio(samples)
                elif kind == "text":
                    await conv.push_text(check_text(msg.text.text, g.max_text_chars), interrupt=msg.text.interrupt)
                elif kind == "playback":
                    p = msg.playback
                    if not math.isfinite(p.underrun_ms) or p.underrun_ms < 0:
                        raise InvalidArgument(f"PlaybackPosition.underrun_ms must be a finite number >= 0 "
                                              f"(got {p.underrun_ms})")
                    conv.playback(p.response_id, p.played_ms, p.underruns, p.underrun_ms)
                elif kind in ("commit", "clear", "cancel_response", "create_response"):
                    await self._control(conv, kind)
                elif kind == "tool_result":
                    await self._tool_result(conv, msg.tool_result)
                elif kind == "end_of_input":
                    half_closed = True
                    break
                elif kind == "config":
                    raise FailedPrecondition("SessionConfig may only be sent once, as the first message")
                else:
                    raise InvalidArgument("empty ClientMessage: set one of config, audio, text, playback, "
                                          "commit, clear, cancel_response, create_response, tool_result, "
                                          "end_of_input")
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
        finally:
            await cancel_and_wait(receiver)

    @staticmethod
    async def _control(conv: Conversation, kind: str) -> None:
        """Turn control messages: a mistake (nothing to commit) is reported, the stream goes on."""
        try:
            if kind == "commit":
                await conv.commit_audio()
            elif kind == "clear":
                await conv.clear_audio()
            elif kind == "create_response":
                await conv.create_response()
            else:
                await conv.cancel_response()
        except VoxError as exc:
            await conv.emit(ErrorEvent(code=exc.code, message=exc.message))

    @staticmethod
    async def _tool_result(conv: Conversation, result: pb.ToolResult) -> None:
        """A tool's result: an unknown call id or a second result is reported, the stream goes on."""
        try:
            await conv.submit_tool_result(result.call_id, result.output_json)
        except VoxError as exc:
            if conv.closed:
                raise
            await conv.emit(ErrorEvent(code=exc.code, message=exc.message, tool_call_id=result.call_id or "?"))

    # --- Transcribe -----------------------------------------------------------------------------

    async def transcribe(self, request_stream: gRPCInputStream,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncGenerator[pb.TranscriptEvent, None]:
        try:
            self._authorize(grpc_context)
            async with self.hub.slot():
                async for event in self._transcribe(request_stream):
                    yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            set_status(grpc_context, exc)
            yield pb.TranscriptEvent()  # empty: it carries the status

    async def _transcribe(self, request_stream: gRPCInputStream) -> AsyncIterator[pb.TranscriptEvent]:
        first = await self._first(request_stream, "TranscribeConfig")
        if first.WhichOneof("message") != "config":
            raise FailedPrecondition("the first message must be a TranscribeConfig")
        cfg = first.config
        g = self.args.gateway
        wire = AudioWire.for_input(cfg.encoding, cfg.sample_rate, max_bytes=g.max_message_bytes)
        language = check_language(cfg.language)
        resampler = StreamResampler(wire.input_rate, MODEL_RATE)
        vad = VADStream(self.stages.vad_probs, self.args.vad)
        max_samples = int(g.max_stream_s * wire.input_rate)
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
                samples = wire.decode(msg.audio.data)
                received += samples.size
                if received > max_samples:
                    raise ResourceExhausted(f"stream exceeded its {g.max_stream_s:.0f} s audio limit")
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

    # --- Synthesize -----------------------------------------------------------------------------

    async def synthesize(self, request: pb.SynthesizeRequest,
                         grpc_context: RayServegRPCContext | None = None) -> AsyncGenerator[pb.AudioChunk, None]:
        try:
            self._authorize(grpc_context)
            text = check_text(request.text, self.args.gateway.max_text_chars)
            check_voice(request.voice, self.args, hint="leave voice empty")
            info = await self.hub.stage_info()
            rate = check_encoding_rate("pcm16", request.sample_rate) if request.sample_rate else info["voice_rate"]
            offset = 0.0
            async for pcm in self.stages.synthesize(text, voice=request.voice, sample_rate=rate):
                yield pb.AudioChunk(data=pcm, sample_rate=rate, offset_ms=int(offset))
                offset += 1000.0 * (len(pcm) // 2) / rate
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            set_status(grpc_context, exc)
            yield pb.AudioChunk()  # empty: it carries the status

"""Engine events -> the gRPC ``ServerEvent`` a client gets (the engine never sees protobuf)."""

from __future__ import annotations

from deployments.grpc.wire import AudioWire
from protos.voxserve.v1 import voice_pb2 as pb
from services.conversation import events as ev
from services.conversation.settings import SPEECH_NATIVE


def event_to_proto(e: ev.Event, wire: AudioWire | None = None) -> pb.ServerEvent | None:
    """The gRPC event for ``e``; None for engine events gRPC clients do not get."""
    out = pb.ServerEvent(server_time_ms=e.server_time_ms, audio_time_ms=e.audio_time_ms)
    if isinstance(e, ev.AudioOut):
        data = wire.encode(e.pcm16) if wire is not None else e.pcm16
        out.audio.CopyFrom(pb.AudioChunk(data=data, sample_rate=e.sample_rate, response_id=e.response_id,
                                         offset_ms=e.offset_ms, text=e.text))
    elif isinstance(e, ev.TextDelta):
        out.text_delta.CopyFrom(pb.ResponseTextDelta(response_id=e.response_id, text=e.text))
    elif isinstance(e, ev.SpeechStarted):
        out.speech_started.SetInParent()
    elif isinstance(e, ev.SpeechStopped):
        out.speech_stopped.utterance_ms = e.utterance_ms
    elif isinstance(e, ev.InputCommitted):
        out.input_committed.CopyFrom(pb.InputCommitted(input_id=e.input_id, utterance_ms=e.utterance_ms,
                                                       text=e.text))
    elif isinstance(e, ev.InputCleared):
        return None  # the client asked for it
    elif isinstance(e, ev.PartialTranscript):
        out.partial_transcript.text = e.text
    elif isinstance(e, ev.FinalTranscript):
        out.final_transcript.CopyFrom(pb.FinalTranscript(text=e.text, language=e.language,
                                                         utterance_ms=e.utterance_ms, input_id=e.input_id))
    elif isinstance(e, ev.ResponseStarted):
        out.response_started.CopyFrom(pb.ResponseStarted(response_id=e.response_id, input_id=e.input_id,
                                                         filler=e.filler))
    elif isinstance(e, ev.ResponseDone):
        lat = e.latency
        out.response_done.CopyFrom(pb.ResponseDone(
            response_id=e.response_id, text=e.text, audio_ms=e.audio_ms,
            latency=pb.TurnLatency(**{f: getattr(lat, f) for f in pb.TurnLatency.DESCRIPTOR.fields_by_name})))
    elif isinstance(e, ev.ResponseInterrupted):
        out.response_interrupted.CopyFrom(pb.ResponseInterrupted(
            response_id=e.response_id, heard_text=e.heard_text, heard_ms=e.heard_ms,
            generated_text=e.generated_text, reason=e.reason))
    elif isinstance(e, ev.ResponsePaused):
        out.response_paused.CopyFrom(pb.ResponsePaused(response_id=e.response_id, played_ms=e.played_ms))
    elif isinstance(e, ev.ResponseResumed):
        out.response_resumed.CopyFrom(pb.ResponseResumed(response_id=e.response_id, reason=e.reason))
    elif isinstance(e, ev.Truncated):
        return None  # the realtime API's event
    elif isinstance(e, ev.SessionStarted):
        out.session_started.CopyFrom(pb.SessionStarted(
            session_id=e.session_id, output_sample_rate=e.output_sample_rate,
            response_mode=pb.SPEECH_NATIVE if e.mode == SPEECH_NATIVE else pb.CASCADE,
            llm_model=e.llm_model, asr_model=e.asr_model, resume_token=e.resume_token, resumed=e.resumed,
            restored_turns=e.restored_turns))
    elif isinstance(e, ev.SessionMoved):
        out.session_moved.CopyFrom(pb.SessionMoved(resume_token=e.resume_token, reason=e.reason))
    elif isinstance(e, ev.ToolCallStarted):
        out.tool_call.CopyFrom(pb.ToolCall(response_id=e.response_id, call_id=e.call_id, name=e.name))
    elif isinstance(e, ev.ToolCallArguments):
        out.tool_call.CopyFrom(pb.ToolCall(response_id=e.response_id, call_id=e.call_id, arguments_delta=e.delta))
    elif isinstance(e, ev.ToolCallDone):
        out.tool_call.CopyFrom(pb.ToolCall(response_id=e.response_id, call_id=e.call_id, name=e.name, done=True,
                                           arguments_json=e.arguments, error=e.error))
    elif isinstance(e, ev.ToolCallCancelled):
        out.tool_call_cancelled.CopyFrom(pb.ToolCallCancelled(call_id=e.call_id, reason=e.reason))
    elif isinstance(e, ev.ToolResultAccepted):
        out.tool_result_accepted.CopyFrom(pb.ToolResultAccepted(call_id=e.call_id, late=e.late))
    elif isinstance(e, ev.ErrorEvent):
        out.error.CopyFrom(pb.Error(code=e.code, message=e.message, response_id=e.response_id))
    else:  # pragma: no cover - a new event type without a mapping is a bug
        raise TypeError(f"no protobuf mapping for {type(e).__name__}")
    return out

"""Engine events -> OpenAI Realtime server events.

``EventMapper`` turns each engine event into the server events it stands for, and keeps the
string ids (items, responses) that the protocol needs and the engine does not have.
"""

from __future__ import annotations

import base64
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from deployments.realtime.error_events import CodeOnly, RealtimeError, error_for, error_payload
from deployments.realtime.session_config import RealtimeConfig
from services.audio import pcm16_to_float
from services.codecs import AudioEncoding, encoder
from services.conversation import events as ev

#: Item and response ids remembered for truncate and transcripts (older ones are forgotten).
REMEMBERED_IDS = 64


@dataclass
class WireEvent(ev.Event):
    """A server event the adapter itself sends (session.updated, error...), queued in the
    conversation's outbox so that it keeps its place among the engine's events."""

    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Response:
    """One engine response as the client knows it."""

    rid: int
    id: str
    item_id: str
    text_only: bool
    encoding: AudioEncoding
    rate: int
    voice: str
    max_output_tokens: int | None
    transcript: list[str] = field(default_factory=list)
    deltas: int = 0
    done: bool = False  # response.done was sent: final (a later cut is a conversation.item.truncated)
    audio_ms: float = 0.0
    error: dict[str, Any] | None = None
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # call id -> its function_call item
    indices: dict[str, int] = field(default_factory=dict)  # item id -> output_index (in order of appearance)
    filler: bool = False  # said while a tool runs (voxserve.filler in response.done)

    @property
    def text(self) -> str:
        return "".join(self.transcript).strip()


class Ids:
    """Ids of one session: a random part (unique across sessions) and a counter."""

    def __init__(self) -> None:
        self._salt = secrets.token_hex(4)
        self._n = 0

    def new(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._salt}{self._n:04x}"


_CANCEL_REASONS = {"barge_in": "turn_detected"}
_LATENCY_FIELDS = ("vad_end_delay_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_ms",
                   "voice_to_voice_ms", "total_ms", "llm_tokens", "llm_tokens_per_s", "speculative",
                   "underruns", "underrun_ms", "min_buffer_ms")


class EventMapper:
    """Engine events -> OpenAI server events, with the ids the protocol needs.

    Stateful and used from the session's two tasks: the reader registers what the client asked
    for (ids of created text items), the sender maps events. Both run on one event loop.
    """

    def __init__(self, config: RealtimeConfig, session_id: str = "") -> None:
        self.config = config
        self.session_id = session_id
        self.ids = Ids()
        self.conversation_id = self.ids.new("conv")
        self._speech_item: str | None = None  # user item of the speech in progress
        self._text_items: deque[str] = deque()  # ids for typed items, in the order they were pushed
        self._by_input: OrderedDict[int, str] = OrderedDict()  # engine input id -> user item id
        self._last_audio_item: str | None = None
        self._last_item: str | None = None
        self._responses: OrderedDict[int, _Response] = OrderedDict()
        self._by_item: OrderedDict[str, int] = OrderedDict()  # assistant item id -> engine response id
        self._by_id: dict[str, int] = {}  # response id -> engine response id
        self.current: _Response | None = None  # started, not done
        self._call_items: OrderedDict[str, tuple[str, str]] = OrderedDict()  # call id -> (response id, item id)
        self._outputs: dict[str, list[tuple[str, str]]] = {}  # call id -> (item id, output) sent, oldest first

    # --- what the reader needs ----------------------------------------------------------------------

    def expect_text_item(self, item_id: str | None) -> str:
        """Reserve the id of a typed user item about to be pushed (its InputCommitted follows)."""
        item = item_id or self.ids.new("item")
        if item in self._by_item or item in self._by_input.values():
            raise RealtimeError(f"item id {item!r} is already used in this conversation", "invalid_value", "item.id")
        self._text_items.append(item)
        return item

    def forget_text_item(self, item_id: str) -> None:
        if self._text_items and self._text_items[-1] == item_id:
            self._text_items.pop()

    def response_of_item(self, item_id: str) -> int:
        """The engine response id of an assistant item (RealtimeError for an unknown item)."""
        if item_id in self._by_item:
            return self._by_item[item_id]
        if item_id in self._by_input.values():
            raise RealtimeError(f"item {item_id!r} is a user message; only assistant audio items can be truncated",
                                "invalid_value", "item_id")
        raise RealtimeError(f"no assistant item {item_id!r} in this conversation (or it is too old)", "invalid_value",
                            "item_id")

    @property
    def last_item(self) -> str | None:
        return self._last_item

    def expect_tool_output(self, call_id: str, item_id: str | None, output: str) -> str:
        """Reserve the item of a function_call_output about to be submitted (ToolResultAccepted follows)."""
        item = item_id or self.ids.new("item")
        used = {i for pending in self._outputs.values() for i, _ in pending}
        if item in self._by_item or item in self._by_input.values() or item in used:
            raise RealtimeError(f"item id {item!r} is already used in this conversation", "invalid_value", "item.id")
        self._outputs.setdefault(call_id, []).append((item, output))
        return item

    def forget_tool_output(self, call_id: str, item_id: str) -> None:
        """An output the conversation refused: its reserved item is released."""
        pending = [p for p in self._outputs.get(call_id, []) if p[0] != item_id]
        if pending:
            self._outputs[call_id] = pending
        else:
            self._outputs.pop(call_id, None)

    # --- mapping --------------------------------------------------------------------------------------

    def map(self, e: ev.Event) -> list[dict[str, Any]]:
        """The server events for ``e`` (without event ids); [] for engine events the protocol lacks."""
        if isinstance(e, WireEvent):
            return [e.payload]
        if isinstance(e, ev.AudioOut):
            return self._audio(e)
        if isinstance(e, ev.TextDelta):
            return self._text(e)
        if isinstance(e, ev.SpeechStarted):
            self._speech_item = self._speech_item or self.ids.new("item")
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": e.audio_time_ms,
                     "item_id": self._speech_item}]
        if isinstance(e, ev.SpeechStopped):
            if self._speech_item is None:  # a manual commit: there was no speech_started either
                return []
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": e.audio_time_ms,
                     "item_id": self._speech_item}]
        if isinstance(e, ev.InputCommitted):
            return self._committed(e)
        if isinstance(e, ev.InputCleared):
            self._speech_item = None
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(e, ev.FinalTranscript):
            return self._transcript(e)
        if isinstance(e, ev.ResponseStarted):
            out = self._started(e.response_id)
            self._responses[e.response_id].filler = e.filler
            return out
        if isinstance(e, ev.ResponseDone):
            return self._finish(e.response_id, "completed", latency=e.latency, tokens=e.latency.llm_tokens)
        if isinstance(e, ev.ResponseInterrupted):
            return self._interrupted(e)
        if isinstance(e, ev.Truncated):
            r = self._responses.get(e.response_id)
            if r is None:
                return []
            return [{"type": "conversation.item.truncated", "item_id": r.item_id, "content_index": 0,
                     "audio_end_ms": e.audio_end_ms}]
        if isinstance(e, ev.ErrorEvent):
            payload = error_for(CodeOnly(e.code, e.message))
            r = self._responses.get(e.response_id) if e.response_id else None
            if r is not None:
                r.error = payload["error"]
            return [payload]
        if isinstance(e, ev.ToolCallStarted | ev.ToolCallArguments | ev.ToolCallDone):
            return self._tool_call(e)
        if isinstance(e, ev.ToolCallCancelled):
            _, item_id = self._call_items.get(e.call_id, ("", ""))
            payload = error_for(CodeOnly("CANCELLED", (
                f"function call {e.call_id} was cancelled ({e.reason}): its result is no longer awaited; one sent "
                "later is recorded in the conversation, not spoken")))
            payload["error"].update(code="function_call_cancelled", param="call_id")
            payload["voxserve"] = {"call_id": e.call_id, "item_id": item_id, "reason": e.reason}
            return [payload]
        if isinstance(e, ev.ToolResultAccepted):
            pending = self._outputs.get(e.call_id) or [(self.ids.new("item"), "")]
            item_id, output = pending.pop(0)
            if not pending:
                self._outputs.pop(e.call_id, None)
            item = {"id": item_id, "type": "function_call_output", "object": "realtime.item", "status": "completed",
                    "call_id": e.call_id, "output": output}
            previous = self._last_item
            return [self._added(item), {"type": "conversation.item.done", "previous_item_id": previous, "item": item}]
        if isinstance(e, ev.SessionStarted):
            self.session_id = e.session_id
            # voxserve extension: how to resume this session (/v1/realtime?resume_token=...)
            return [{"type": "session.created", "session": self.config.session_json(e.session_id),
                     "voxserve": {"resume_token": e.resume_token, "resumed": e.resumed,
                                  "restored_turns": e.restored_turns}}]
        if isinstance(e, ev.SessionMoved):
            # OpenAI has no such event: an ``error`` (the SDK parses it) whose voxserve field says
            # how to come back; the socket then closes with 1012 (service restart)
            payload = error_payload("session_moved", "this server is shutting down: reconnect with "
                                    "/v1/realtime?resume_token=<voxserve.resume_token> to continue the session",
                                    error_type="server_error")
            payload["voxserve"] = {"resume_token": e.resume_token, "reason": e.reason}
            return [payload]
        if isinstance(e, ev.ResponsePaused | ev.ResponseResumed | ev.PartialTranscript):
            # pause-then-decide has no OpenAI events: speech_started already told the client;
            # partial transcripts are not switched on by this adapter
            return []
        raise TypeError(f"no realtime mapping for {type(e).__name__}")  # pragma: no cover

    def session_updated(self) -> dict[str, Any]:
        return {"type": "session.updated", "session": self.config.session_json(self.session_id)}

    # --- input side -----------------------------------------------------------------------------------

    def _remember_input(self, input_id: int, item_id: str) -> None:
        self._by_input[input_id] = item_id
        while len(self._by_input) > REMEMBERED_IDS:
            self._by_input.popitem(last=False)

    def _added(self, item: dict[str, Any]) -> dict[str, Any]:
        event = {"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item}
        self._last_item = item["id"]
        return event

    def _committed(self, e: ev.InputCommitted) -> list[dict[str, Any]]:
        if e.text:  # a typed item (conversation.item.create)
            item_id = self._text_items.popleft() if self._text_items else self.ids.new("item")
            self._remember_input(e.input_id, item_id)
            item = {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": "user",
                    "content": [{"type": "input_text", "text": e.text}]}
            previous = self._last_item
            return [self._added(item), {"type": "conversation.item.done", "previous_item_id": previous, "item": item}]
        item_id = self._speech_item or self.ids.new("item")
        self._speech_item = None
        self._last_audio_item = item_id
        self._remember_input(e.input_id, item_id)
        previous = self._last_item
        item = {"id": item_id, "type": "message", "object": "realtime.item", "status": "in_progress", "role": "user",
                "content": [{"type": "input_audio", "transcript": None}]}
        return [{"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id},
                self._added(item)]

    def _transcript(self, e: ev.FinalTranscript) -> list[dict[str, Any]]:
        # A speculative answer's transcript is made before its turn is committed (input id 0 then):
        # it belongs to the newest committed audio item.
        item_id = self._by_input.get(e.input_id) if e.input_id else None
        item_id = item_id or self._last_audio_item
        if item_id is None:
            return []
        out: list[dict[str, Any]] = []
        enabled = self.config.transcription is not None
        if enabled:
            out.append({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                        "content_index": 0, "transcript": e.text,
                        "usage": {"type": "duration", "seconds": round(e.utterance_ms / 1000, 3)}})
        item = {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": "user",
                "content": [{"type": "input_audio", "transcript": e.text if enabled else None}]}
        out.append({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        return out

    # --- responses ------------------------------------------------------------------------------------

    def _started(self, rid: int) -> list[dict[str, Any]]:
        cfg = self.config
        r = _Response(rid=rid, id=self.ids.new("resp"), item_id=self.ids.new("item"), text_only=cfg.text_only,
                      encoding=cfg.output_encoding, rate=cfg.output_rate, voice=cfg.voice,
                      max_output_tokens=cfg.max_output_tokens)
        self._responses[rid] = r
        self._by_item[r.item_id] = rid
        self._by_id[r.id] = rid
        while len(self._responses) > REMEMBERED_IDS:
            old = self._responses.popitem(last=False)[1]
            self._by_item.pop(old.item_id, None)
            self._by_id.pop(old.id, None)
        self.current = r
        return [{"type": "response.created", "response": self._response(r, "in_progress", output=[])}]

    def _open(self, r: _Response) -> list[dict[str, Any]]:
        """The answer's message item, announced with its first text or audio (a response that only
        calls functions has none, as OpenAI's)."""
        if r.item_id in r.indices:
            return []
        r.indices[r.item_id] = len(r.indices)
        item = self._item(r, "in_progress", with_content=False)
        part = {"type": "text", "text": ""} if r.text_only else {"type": "audio", "transcript": ""}
        ref = {"response_id": r.id, "item_id": r.item_id, "output_index": r.indices[r.item_id], "content_index": 0}
        return [
            {"type": "response.output_item.added", "response_id": r.id, "output_index": ref["output_index"],
             "item": item},
            self._added(item),
            {"type": "response.content_part.added", **ref, "part": part},
        ]

    def _item(self, r: _Response, status: str, *, with_content: bool = True) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if with_content:
            content = [{"type": "output_text", "text": r.text}] if r.text_only else \
                [{"type": "output_audio", "transcript": r.text}]
        return {"id": r.item_id, "type": "message", "object": "realtime.item", "status": status, "role": "assistant",
                "content": content}

    def _response(self, r: _Response, status: str, *, output: list[dict[str, Any]],
                  details: dict[str, Any] | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": r.id, "object": "realtime.response", "status": status, "status_details": details,
            "conversation_id": self.conversation_id, "output": output,
            "output_modalities": ["text"] if r.text_only else ["audio"],
            "audio": {"output": {"format": self.config.format_json(r.encoding, r.rate), "voice": r.voice}},
            "max_output_tokens": r.max_output_tokens if r.max_output_tokens is not None else "inf",
            "metadata": None, "usage": usage,
        }

    def _text(self, e: ev.TextDelta) -> list[dict[str, Any]]:
        r = self._responses.get(e.response_id)
        if r is None:
            return []
        out = self._open(r)
        r.transcript.append(e.text)
        r.deltas += 1
        kind = "response.output_text.delta" if r.text_only else "response.output_audio_transcript.delta"
        return [*out, {"type": kind, "response_id": r.id, "item_id": r.item_id,
                       "output_index": r.indices[r.item_id], "content_index": 0, "delta": e.text}]

    def _tool_call(self, e: ev.ToolCallStarted | ev.ToolCallArguments | ev.ToolCallDone) -> list[dict[str, Any]]:
        r = self._responses.get(e.response_id)
        if r is None:
            return []
        if isinstance(e, ev.ToolCallStarted):
            new: dict[str, Any] = {"id": self.ids.new("item"), "type": "function_call", "object": "realtime.item",
                                   "status": "in_progress", "name": e.name, "call_id": e.call_id, "arguments": ""}
            r.calls[e.call_id] = new
            r.indices[new["id"]] = len(r.indices)
            self._call_items[e.call_id] = (r.id, new["id"])
            while len(self._call_items) > REMEMBERED_IDS:
                self._call_items.popitem(last=False)
            return [{"type": "response.output_item.added", "response_id": r.id, "output_index": r.indices[new["id"]],
                     "item": dict(new)}, self._added(dict(new))]
        item = r.calls.get(e.call_id)
        if item is None:
            return []
        ref = {"response_id": r.id, "item_id": item["id"], "output_index": r.indices[item["id"]], "call_id": e.call_id}
        if isinstance(e, ev.ToolCallArguments):
            item["arguments"] += e.delta
            return [{"type": "response.function_call_arguments.delta", **ref, "delta": e.delta}]
        item.update(arguments=e.arguments, status="incomplete" if e.error else "completed")
        # a call off its schema is not made: voxserve.error says why (an error event follows)
        vox = {"voxserve": {"error": e.error}} if e.error else {}
        return [{"type": "response.function_call_arguments.done", **ref, "name": e.name, "arguments": e.arguments,
                 **vox},
                {"type": "response.output_item.done", "response_id": r.id, "output_index": ref["output_index"],
                 "item": dict(item), **vox},
                {"type": "conversation.item.done", "previous_item_id": None, "item": dict(item)}]

    def _audio(self, e: ev.AudioOut) -> list[dict[str, Any]]:
        r = self._responses.get(e.response_id)
        if r is None or r.text_only:
            return []  # text only: the audio is not sent (nor counted as heard: playback 'none')
        out = self._open(r)
        r.audio_ms += 1000.0 * (len(e.pcm16) // 2) / e.sample_rate
        data = e.pcm16 if r.encoding is AudioEncoding.PCM16 else encoder(r.encoding)(pcm16_to_float(e.pcm16))
        return [*out, {"type": "response.output_audio.delta", "response_id": r.id, "item_id": r.item_id,
                       "output_index": r.indices[r.item_id], "content_index": 0,
                       "delta": base64.b64encode(data).decode("ascii")}]

    def _interrupted(self, e: ev.ResponseInterrupted) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if e.response_id not in self._responses:
            # ended before its first event reached the client: announce it, so that every
            # response.done follows its response.created
            out += self._started(e.response_id)
        r = self._responses[e.response_id]
        if r.done:
            # all of it was sent (response.done: completed) and the client cut the playback: the
            # item's truncation says so, as OpenAI does; a response has one response.done
            return out
        if e.reason == "error":
            details: dict[str, Any] = {"type": "failed", "error": r.error or {
                "type": "server_error", "code": "internal", "message": "the response failed"}}
            status = "failed"
        else:
            details = {"type": "cancelled", "reason": _CANCEL_REASONS.get(e.reason, "client_cancelled")}
            status = "cancelled"
        extra = {"heard_text": e.heard_text, "heard_ms": e.heard_ms, "reason": e.reason}
        return out + self._finish(e.response_id, status, details=details, tokens=r.deltas, extra=extra)

    def _finish(self, rid: int, status: str, *, details: dict[str, Any] | None = None,
                latency: ev.TurnLatency | None = None, tokens: int = 0,
                extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        r = self._responses.get(rid)
        if r is None or r.done:
            return []
        r.done = True
        if self.current is r:
            self.current = None
        item_status = "completed" if status == "completed" else "incomplete"
        item = self._item(r, item_status)
        out: list[dict[str, Any]] = []
        if r.item_id in r.indices:  # the message item was announced: it ends here
            ref = {"response_id": r.id, "item_id": r.item_id, "output_index": r.indices[r.item_id],
                   "content_index": 0}
            if r.text_only:
                out.append({"type": "response.output_text.done", **ref, "text": r.text})
                part = {"type": "text", "text": r.text}
            else:
                out.append({"type": "response.output_audio.done", **ref})
                out.append({"type": "response.output_audio_transcript.done", **ref, "transcript": r.text})
                part = {"type": "audio", "transcript": r.text}
            out.append({"type": "response.content_part.done", **ref, "part": part})
            out.append({"type": "response.output_item.done", "response_id": r.id, "output_index": ref["output_index"],
                        "item": item})
            out.append({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        usage = {"total_tokens": tokens, "input_tokens": 0, "output_tokens": tokens,
                 "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
                 "output_token_details": {"text_tokens": tokens, "audio_tokens": 0}}
        items = {r.item_id: item, **{c["id"]: dict(c) for c in r.calls.values()}}
        output = [items[i] for i in sorted(r.indices, key=r.indices.__getitem__)]
        response = self._response(r, status, output=output, details=details, usage=usage)
        # voxserve's own fields (clients ignore unknown ones): server-measured latency, audio sent
        vox: dict[str, Any] = {"audio_ms": int(r.audio_ms), **({"filler": True} if r.filler else {})}
        if latency is not None:
            vox["latency"] = {f: getattr(latency, f) for f in _LATENCY_FIELDS}
        vox.update(extra or {})
        response["voxserve"] = vox
        out.append({"type": "response.done", "response": response})
        return out

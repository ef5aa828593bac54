"""Prometheus metrics of the voxserve deployments, through Ray Serve's metrics API.

The gateway creates one ``GatewayMetrics`` per replica and reports each session and each
conversation event to it; stage deployments may time their requests with ``StageMetrics``. Ray
exports application metrics with a ``ray_`` prefix and adds the ``deployment``, ``replica`` and
``application`` tags itself (see docs/metrics.md for every name, type and label).

Ray is imported lazily so that this module (and its unit tests) load without a Ray cluster;
``ray.serve.metrics`` objects work outside a replica too (they simply carry no Serve tags).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from services.conversation import events as ev

PREFIX = "voxserve_"

#: Latency buckets in ms: fine below 1 s where real-time targets live, coarse up to a minute.
LATENCY_BOUNDARIES_MS: list[float] = [
    5, 10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 650, 800, 1000, 1250, 1500, 2000, 2500,
    3000, 4000, 5000, 7500, 10000, 20000, 60000,
]
TOKENS_PER_S_BOUNDARIES: list[float] = [1, 2, 5, 10, 15, 20, 30, 40, 60, 80, 120, 200, 400]

#: TurnLatency fields recorded per stage in ``voxserve_stage_latency_ms`` (stage label -> field).
STAGE_FIELDS: dict[str, str] = {
    "vad_end": "vad_end_delay_ms",
    "asr": "asr_ms",
    "llm_first_token": "llm_first_token_ms",
    "tts_first_audio": "tts_first_audio_ms",
}

#: Every metric this module defines: name (without Ray's ``ray_`` prefix) -> (type, labels, help).
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "voxserve_sessions_active": ("gauge", (), "Converse streams open on this gateway replica."),
    "voxserve_sessions_total": ("counter", ("status",),
                                "Converse streams ended, by final gRPC status code name."),
    "voxserve_turns_total": ("counter", ("outcome",),
                             "Answered user turns by outcome: done, interrupted, error."),
    "voxserve_barge_ins_total": ("counter", (), "Answers interrupted by the user speaking (barge-in)."),
    "voxserve_speculations_total": ("counter", ("outcome",),
                                    "Answers started during the user's pause: started, used (released at "
                                    "the end of turn), discarded (the user spoke on; aborted, never sent)."),
    "voxserve_interruptions_total": ("counter", ("outcome",),
                                     "User speech over an answer: paused, interrupted, resumed_noise, "
                                     "resumed_backchannel (false interruptions that resumed the answer)."),
    "voxserve_turn_ends_total": ("counter", ("state", "reason"),
                                 "Responses by how they ended: committed, interrupted, discarded; and why."),
    "voxserve_errors_total": ("counter", ("code", "where"),
                              "Errors by gRPC status code name; where = turn (the conversation goes on), "
                              "tool_call (about a tool call: timeout, invalid arguments, unknown id), "
                              "or stream (the stream ended with this status)."),
    "voxserve_stage_latency_ms": ("histogram", ("stage",),
                                  "Per-turn latency of each stage on the answer's critical path: "
                                  "vad_end, asr, llm_first_token, tts_first_audio."),
    "voxserve_first_audio_ms": ("histogram", (), "Turn declared over -> first answer audio sent (server)."),
    "voxserve_voice_to_voice_ms": ("histogram", (),
                                   "User's last speech sample received -> first answer audio sent (server)."),
    "voxserve_turn_total_ms": ("histogram", (), "Turn declared over -> answer fully sent."),
    "voxserve_llm_tokens_per_s": ("histogram", (), "LLM decode speed per answer."),
    "voxserve_stalled_turns_total": ("counter", (),
                                     "Answers whose audio ran dry at the caller at least once (counted when "
                                     "the answer ends: the server's estimate, or the client's PlaybackPosition "
                                     "reports where larger)."),
    "voxserve_underrun_ms": ("histogram", (),
                             "Silence inside one stalled answer: the caller's buffer ran dry this long "
                             "(the server's estimate, or the client's reports where larger)."),
    "voxserve_min_buffer_ms": ("histogram", (),
                               "Least audio the caller had in hand when a later text chunk's audio was sent "
                               "(per answer)."),
    "voxserve_tool_calls_total": ("counter", ("outcome",),
                                  "Tool calls by outcome: made, result, result_after_cancel (recorded, not "
                                  "spoken), cancelled, timed_out, invalid (arguments off the schema: not made), "
                                  "filler (a filler was spoken while one ran)."),
    "voxserve_tool_latency_ms": ("histogram", ("span",),
                                 "Tool calls: call -> result (the client's tool), and result -> first audio "
                                 "of the answer that uses it (ours)."),
    "voxserve_journal_writes_total": ("counter", ("outcome",),
                                      "Session journal writes: ok, or failed (the store did not answer; the "
                                      "next change of turn writes again)."),
    "voxserve_journal_write_ms": ("histogram", (), "One session journal write (beside the answer, never "
                                  "before it)."),
    "voxserve_session_moves_total": ("counter", ("kind",),
                                     "Sessions resumed on this replica (kind=resumed) and moved away by its "
                                     "drain (kind=moved)."),
    "voxserve_stage_request_ms": ("histogram", ("stage", "method"),
                                  "Duration of one request inside a stage deployment replica "
                                  "(for streams: until the last item)."),
    "voxserve_stage_requests_total": ("counter", ("stage", "method", "status"),
                                      "Requests handled by a stage deployment replica, by status."),
}


def _make(name: str) -> Any:
    from ray.serve import metrics as m

    kind, labels, doc = METRICS[name]
    tag_keys: Any = labels or None  # Ray's stubs say tuple[str] but mean any length
    if kind == "counter":
        return m.Counter(name, description=doc, tag_keys=tag_keys)
    if kind == "gauge":
        return m.Gauge(name, description=doc, tag_keys=tag_keys)
    bounds = TOKENS_PER_S_BOUNDARIES if name.endswith("_per_s") else LATENCY_BOUNDARIES_MS
    return m.Histogram(name, description=doc, boundaries=bounds, tag_keys=tag_keys)


class GatewayMetrics:
    """What the gateway reports: sessions, turn latencies, barge-ins, errors.

    ``backend`` maps metric names to objects with ``inc``/``set``/``observe`` (tests pass fakes);
    by default the Ray Serve metrics are created on first use.
    """

    _NAMES = ("voxserve_sessions_active", "voxserve_sessions_total", "voxserve_turns_total",
              "voxserve_barge_ins_total", "voxserve_speculations_total", "voxserve_interruptions_total",
              "voxserve_turn_ends_total", "voxserve_errors_total", "voxserve_stage_latency_ms",
              "voxserve_first_audio_ms", "voxserve_voice_to_voice_ms", "voxserve_turn_total_ms",
              "voxserve_llm_tokens_per_s", "voxserve_stalled_turns_total", "voxserve_underrun_ms",
              "voxserve_min_buffer_ms", "voxserve_tool_calls_total", "voxserve_tool_latency_ms",
              "voxserve_journal_writes_total", "voxserve_journal_write_ms", "voxserve_session_moves_total")

    def __init__(self, backend: dict[str, Any] | None = None) -> None:
        self._m = backend if backend is not None else {name: _make(name) for name in self._NAMES}
        self.active = 0

    def session_started(self) -> None:
        self.active += 1
        self._m["voxserve_sessions_active"].set(self.active)

    def session_ended(self, status: str = "OK") -> None:
        """A stream ended with gRPC status ``status`` (a code name: OK, INVALID_ARGUMENT, ...)."""
        self.active = max(0, self.active - 1)
        self._m["voxserve_sessions_active"].set(self.active)
        self._m["voxserve_sessions_total"].inc(1, tags={"status": status})
        if status not in ("OK", "CANCELLED"):
            self.error(status, where="stream")

    def error(self, code: str, where: str = "turn") -> None:
        self._m["voxserve_errors_total"].inc(1, tags={"code": code, "where": where})

    def barge_in(self) -> None:
        self._m["voxserve_barge_ins_total"].inc(1)

    # services.conversation.Observer: what no client event shows
    def speculation(self, outcome: str) -> None:
        self._m["voxserve_speculations_total"].inc(1, tags={"outcome": outcome})

    def interruption(self, outcome: str) -> None:
        self._m["voxserve_interruptions_total"].inc(1, tags={"outcome": outcome})

    def turn_ended(self, state: str, reason: str) -> None:
        self._m["voxserve_turn_ends_total"].inc(1, tags={"state": state, "reason": reason or "done"})

    def answered(self, latency: ev.TurnLatency) -> None:
        pass  # recorded from the ResponseDone event in observe()

    def played(self, underruns: int, underrun_ms: float) -> None:
        if underruns > 0:
            self._m["voxserve_stalled_turns_total"].inc(1)
            self._m["voxserve_underrun_ms"].observe(float(underrun_ms))

    def tool_call(self, outcome: str, seconds: float | None = None) -> None:
        if outcome == "result_to_audio":
            self._m["voxserve_tool_latency_ms"].observe(1000 * (seconds or 0.0), tags={"span": "result_to_audio"})
            return
        self._m["voxserve_tool_calls_total"].inc(1, tags={"outcome": outcome})
        if outcome == "result" and seconds is not None:
            self._m["voxserve_tool_latency_ms"].observe(1000 * seconds, tags={"span": "call_to_result"})

    def journal_write(self, ms: float, ok: bool) -> None:
        self._m["voxserve_journal_writes_total"].inc(1, tags={"outcome": "ok" if ok else "failed"})
        if ok:
            self._m["voxserve_journal_write_ms"].observe(ms)

    def session_moved(self, kind: str) -> None:
        """``resumed`` (a session continued here) or ``moved`` (sent away by the drain)."""
        self._m["voxserve_session_moves_total"].inc(1, tags={"kind": kind})

    def turn_latency(self, lat: ev.TurnLatency) -> None:
        """Record an answered turn's latency breakdown (``ResponseDone.latency``)."""
        self._m["voxserve_turns_total"].inc(1, tags={"outcome": "done"})
        for stage, name in STAGE_FIELDS.items():
            value = float(getattr(lat, name))
            # 0 means the stage was not on this turn's path (text turn: no VAD/ASR; no audio)
            if value > 0:
                self._m["voxserve_stage_latency_ms"].observe(value, tags={"stage": stage})
        if lat.first_audio_ms > 0:
            self._m["voxserve_first_audio_ms"].observe(float(lat.first_audio_ms))
        if lat.voice_to_voice_ms > 0:
            self._m["voxserve_voice_to_voice_ms"].observe(float(lat.voice_to_voice_ms))
        if lat.total_ms > 0:
            self._m["voxserve_turn_total_ms"].observe(float(lat.total_ms))
        if lat.llm_tokens_per_s > 0:
            self._m["voxserve_llm_tokens_per_s"].observe(float(lat.llm_tokens_per_s))
        if lat.first_audio_ms > 0:
            self._m["voxserve_min_buffer_ms"].observe(float(lat.min_buffer_ms))

    def observe(self, event: ev.Event) -> None:
        """Feed every event a conversation emits; the ones that matter are counted."""
        if isinstance(event, ev.ResponseDone):
            if not event.filler:  # a filler said while a tool ran is no answer
                self.turn_latency(event.latency)
        elif isinstance(event, ev.ResponseInterrupted):
            self._m["voxserve_turns_total"].inc(1, tags={"outcome": "interrupted"})
            if event.reason == "barge_in":
                self.barge_in()
        elif isinstance(event, ev.ToolCallDone) and event.error:
            self.tool_call("invalid")
        elif isinstance(event, ev.ErrorEvent) and event.tool_call_id:
            self.error(event.code, where="tool_call")  # the turn itself went on
        elif isinstance(event, ev.ErrorEvent):
            self._m["voxserve_turns_total"].inc(1, tags={"outcome": "error"})
            self.error(event.code, where="turn")


class StageMetrics:
    """Request timing inside a stage deployment (``stage`` is vad, asr, llm or tts)."""

    def __init__(self, stage: str, backend: dict[str, Any] | None = None) -> None:
        self.stage = stage
        names = ("voxserve_stage_request_ms", "voxserve_stage_requests_total")
        self._m = backend if backend is not None else {name: _make(name) for name in names}

    def record(self, method: str, ms: float, status: str = "OK") -> None:
        tags = {"stage": self.stage, "method": method}
        self._m["voxserve_stage_request_ms"].observe(ms, tags=tags)
        self._m["voxserve_stage_requests_total"].inc(1, tags={**tags, "status": status})

    @contextmanager
    def time(self, method: str) -> Iterator[None]:
        """``with metrics.time("transcribe"): ...``; an exception is counted with its status."""
        from services.errors import status_name

        t0 = time.monotonic()
        status = "OK"
        try:
            yield
        except BaseException as exc:
            status = "CANCELLED" if isinstance(exc, GeneratorExit | asyncio.CancelledError) else status_name(exc)
            raise
        finally:
            self.record(method, 1000 * (time.monotonic() - t0), status)

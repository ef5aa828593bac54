"""Calls that come back by themselves: ``converse_resuming`` reconnects a broken or moved session
with its resume token, with backoff, and carries on with the turns not yet answered.

After a break, each turn is in one of three states: answered (kept, never asked again),
committed by the server but not answered (the server answers it after the resume: the client
waits for that answer and sends nothing, ``UserTurn.restored``), or not committed (its utterance
is sent again). ``ResumeReport`` says what it took: how many resumes, the time from each break to
the resumed ``SessionStarted``, and the turns lost on the way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from clients.voice_client import SessionResult, TurnResult, UserTurn, VoiceClient
from protos.voxserve.v1 import voice_pb2 as pb

#: Statuses after which a session may be resumed: the server went away or moved it, or the
#: connection broke, or the stream went silent and the client gave it up (DEADLINE_EXCEEDED, see
#: ``VoiceClient.converse``). Anything else (a refused token, a bad config) is final.
RESUMABLE = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED", "DEADLINE_EXCEEDED"})


@dataclass
class ResumeReport:
    resumes: int = 0
    """Streams opened again with the resume token (after a break or a move)."""
    resume_ms: list[float] = field(default_factory=list)
    """For each resume: the break (or SessionMoved) -> the resumed SessionStarted, client clock."""
    attempts: int = 0
    """Connection attempts, failed ones included."""
    turns_lost: int = 0
    """Turns that never got their answer."""
    lost: bool = False
    """The call could not be continued (gave up, or the token was refused)."""


@dataclass
class Backoff:
    first_s: float = 0.1
    max_s: float = 2.0
    give_up_s: float = 90.0
    """Stop trying when no turn was answered for this long since the break."""
    max_attempts: int = 50
    """Stop after this many connection attempts without a turn answered in between."""


def _answered(turn: TurnResult) -> bool:
    return turn.answered


async def converse_resuming(client: VoiceClient, turns: list[UserTurn], config: pb.SessionConfig | None = None, *,
                            backoff: Backoff | None = None, **kwargs: Any) -> tuple[SessionResult, ResumeReport]:
    """``client.converse`` that resumes the session until every turn is answered (or it gives up).
    The result's turns are each turn's last attempt, in order; its status is the last stream's."""
    cfg = config or pb.SessionConfig()
    plan = backoff or Backoff()
    report = ResumeReport()
    done: list[TurnResult] = []
    remaining = list(turns)
    token = ""
    broke_at = 0.0
    merged = SessionResult(turns=done)
    delay = plan.first_s
    stuck_since = 0.0  # first break since a turn was last answered (0: none)
    stuck_attempts = 0
    while True:
        attempt = pb.SessionConfig()
        attempt.CopyFrom(cfg)
        attempt.resume_token = token
        report.attempts += 1
        result = await client.converse(remaining, attempt, **kwargs)
        merged.status, merged.details = result.status, result.details
        merged.audio += result.audio
        merged.events += result.events
        merged.extra_answers += result.extra_answers
        answered_before = len(done)
        if result.t_started:
            merged.session_id = merged.session_id or result.session_id
            merged.output_sample_rate = result.output_sample_rate
            if token:
                report.resumes += 1
                report.resume_ms.append(1000 * (result.t_started - broke_at))
                merged.resumed = True
        # what this stream settled, and what the next one must do
        nxt: list[UserTurn] = []
        for i, turn in enumerate(remaining):
            got = result.turns[i] if i < len(result.turns) else None
            if got is not None and _answered(got):
                done.append(got)
                continue
            said = got.transcript.strip() or (turn.text or "").strip() if got is not None else ""
            if got is not None and got.committed and said:
                # the server has its words (a typed turn, or speech it transcribed): it answers it
                nxt.append(UserTurn(text=said, restored=True, label=turn.label))
            elif turn.restored and got is not None and not got.committed:
                nxt.append(turn)  # still pending on the server
            else:
                nxt.append(turn)
            nxt += remaining[i + 1:]
            break
        remaining = nxt
        if len(done) > answered_before:  # progress: the backoff and the give-up clock start over
            delay, stuck_since, stuck_attempts = plan.first_s, 0.0, 0
        if result.resume_token:
            token = result.resume_token
        if not remaining or (result.status == "OK" and not result.moved):
            break
        if result.status not in RESUMABLE or not token:
            report.lost = True
            break
        now = time.monotonic()
        if result.t_started or not broke_at:
            broke_at = now  # a new break (a failed reconnect keeps the first one's time)
        stuck_since = stuck_since or now
        stuck_attempts += 1
        if now - stuck_since > plan.give_up_s or stuck_attempts >= plan.max_attempts:
            report.lost = True
            break
        if not result.moved:  # a moved session may come back at once; a broken one waits a little
            await asyncio.sleep(delay)
            delay = min(plan.max_s, delay * 2)
    if not remaining and merged.status != "OK":  # every turn was answered before the break
        merged.details = f"the stream ended with {merged.status} after its last answer: {merged.details}"
        merged.status = "OK"
    report.turns_lost = len(remaining) + sum(1 for t in done if not _answered(t))
    merged.turns += [TurnResult(label=t.label, error="lost: never answered") for t in remaining]
    return merged, report

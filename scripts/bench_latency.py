"""Voice-to-voice latency: the old listening path against the new one, side by side, in one run.

    old  Whisper base, a fixed 500 ms end-of-turn silence, nothing started before the turn ends
    new  the CPU default: Moonshine Tiny (English), semantic end of turn (Smart Turn + transcript,
         300 ms / 1500 ms), the answer speculated from 150 ms of silence

Same engines in one process (services.local: no Ray, so the figures are the conversation's own),
same spoken questions (Piper, cached), each asked in a fresh conversation at real-time pace, the
two paths alternating question by question. Voice-to-voice runs from the last speech sample fed
(the end of speech in the audio, not the end of the file) to the first answer audio emitted.
Also measured: each stage's share (end-of-turn delay, ASR, LLM first token, TTS first audio),
the speculation hit rate, and the false end-of-turn rate on utterances with a pause inside a
sentence ("So I was thinking that we could ... go to the beach tomorrow").

    .venv/bin/python scripts/bench_latency.py --questions 8 --repeats 2 --out out/bench/latency.json

Needs a quiet machine (every figure is a wall-clock time on 2 shared cores): ~6 min.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_common import local_env

local_env()

from clients.audio import speech_end  # noqa: E402
from clients.speech_cache import QUESTIONS, load_questions  # noqa: E402
from clients.stats import percentile  # noqa: E402

CHUNK_S = 0.02
RATE = 16000
#: A sentence with a pause inside, in two halves (Piper renders each as its own utterance).
PAUSED = ("So I was thinking that we could", "go to the beach tomorrow.")
PAUSE_S = 0.7


def settings_for(path: str) -> Any:
    from services.conversation import SessionSettings, TurnDetection

    if path == "old":
        return SessionSettings(output_sample_rate=22050, playback="none",
                               turn=TurnDetection(mode="silence", min_silence_ms=500, speculate=False))
    return SessionSettings(output_sample_rate=22050, playback="none")


class Counter:
    """Observer: counts speculation outcomes."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def speculation(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def interruption(self, outcome: str) -> None:
        pass

    def turn_ended(self, state: str, reason: str) -> None:
        pass

    def answered(self, latency: Any) -> None:
        pass

    def played(self, underruns: int, underrun_ms: float) -> None:
        pass

    def tool_call(self, outcome: str, seconds: float | None = None) -> None:
        pass


async def ask(stages: Any, path: str, audio: np.ndarray) -> dict[str, Any]:
    """One conversation, one utterance fed at real-time pace (then silence until the answer)."""
    from services.conversation import Conversation
    from services.conversation import events as ev

    observer = Counter()
    conv = Conversation(stages, settings_for(path), observer=observer)
    committed = 0
    first_audio: float | None = None
    done: ev.ResponseDone | None = None
    finished = asyncio.Event()

    async def read() -> None:
        nonlocal committed, first_audio, done
        async for event in conv.events():
            if isinstance(event, ev.InputCommitted):
                committed += 1
            elif isinstance(event, ev.AudioOut) and first_audio is None:
                first_audio = time.monotonic()
            elif isinstance(event, ev.ResponseDone | ev.ErrorEvent):
                done = event if isinstance(event, ev.ResponseDone) else None
                finished.set()

    reader = asyncio.create_task(read())
    await conv.start()
    x = np.concatenate([np.zeros(int(0.3 * RATE), np.float32), audio])
    end = speech_end(x, RATE)
    step = int(CHUNK_S * RATE)
    t_next = time.monotonic()
    t_speech_end = 0.0
    i = 0
    deadline = time.monotonic() + 30
    while not finished.is_set() and time.monotonic() < deadline:
        piece = x[i:i + step] if i < x.size else np.zeros(step, np.float32)
        await asyncio.sleep(max(0.0, t_next - time.monotonic()))
        await conv.push_audio(piece)
        t_next += CHUNK_S
        if i < end <= i + step:
            t_speech_end = time.monotonic()
        i += step
    await conv.aclose()
    await reader
    lat = done.latency if done is not None else None
    return {
        "path": path, "answered": done is not None, "committed": committed,
        "voice_to_voice_ms": 1000 * (first_audio - t_speech_end) if first_audio and t_speech_end else None,
        "end_of_turn_ms": lat.vad_end_delay_ms if lat else None, "asr_ms": lat.asr_ms if lat else None,
        "llm_first_token_ms": lat.llm_first_token_ms if lat else None,
        "tts_first_audio_ms": lat.tts_first_audio_ms if lat else None,
        "first_audio_ms": lat.first_audio_ms if lat else None, "speculative": bool(lat and lat.speculative),
        "speculations": observer.counts, "answer": done.text if done else "",
    }


def summarize(rows: list[dict[str, Any]], path: str) -> dict[str, Any]:
    mine = [r for r in rows if r["path"] == path and not r.get("paused")]
    out: dict[str, Any] = {"n": len(mine), "answered": sum(r["answered"] for r in mine)}
    for key in ("voice_to_voice_ms", "end_of_turn_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms",
                "first_audio_ms"):
        values = [r[key] for r in mine if r[key] is not None]
        out[key] = {"p50": percentile(values, 50), "p95": percentile(values, 95)}
    started = sum(r["speculations"].get("started", 0) for r in mine)
    used = sum(r["speculations"].get("used", 0) for r in mine)
    out["speculation"] = {"started": started, "used": used,
                          "discarded": sum(r["speculations"].get("discarded", 0) for r in mine),
                          "hit_rate": used / started if started else None}
    paused = [r for r in rows if r["path"] == path and r.get("paused")]
    out["pause_inside_sentence"] = {"n": len(paused), "false_end_of_turn": sum(r["committed"] > 1 for r in paused)}
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from services.asr import ASRRouter
    from services.asr_base import ASRConfig
    from services.cpu import machine_record
    from services.llm import LLMConfig
    from services.local import LocalStages

    new = LocalStages.load(llm=LLMConfig(cpu_threads=args.llm_threads))
    old_asr = ASRRouter.load(ASRConfig(engine="whisper"))
    old_asr.warm_up()
    old = LocalStages(new.vad, old_asr, new.llm, new.tts, new.turn_model)
    stages = {"old": old, "new": new}
    questions = load_questions(tuple(QUESTIONS[: args.questions]))
    halves = load_questions(PAUSED)
    paused = np.concatenate([halves[0].audio, np.zeros(int(PAUSE_S * RATE), np.float32), halves[1].audio])
    rows: list[dict[str, Any]] = []
    for path in ("old", "new"):  # warm-up conversation per path, not recorded
        await ask(stages[path], path, questions[0].audio)
    for rep in range(args.repeats):
        for q in questions:
            for path in ("old", "new"):
                row = await ask(stages[path], path, q.audio)
                row.update(question=q.text, repeat=rep)
                rows.append(row)
                print(f"{path:3} {row['voice_to_voice_ms'] or 0:7.0f} ms  {q.text!r} -> {row['answer'][:50]!r}",
                      flush=True)
        for path in ("old", "new"):
            row = await ask(stages[path], path, paused)
            row.update(question=" ... ".join(PAUSED), repeat=rep, paused=True)
            rows.append(row)
            print(f"{path:3} pause inside a sentence: {row['committed']} turn(s)", flush=True)
    new.shutdown()
    return {"machine": machine_record(), "questions": args.questions, "repeats": args.repeats,
            "summary": {p: summarize(rows, p) for p in ("old", "new")}, "rows": rows}


def table(result: dict[str, Any]) -> str:
    s = result["summary"]

    def cell(path: str, key: str) -> str:
        v = s[path][key]
        return f"{v['p50']:.0f} / {v['p95']:.0f}" if v["p50"] is not None else "-"

    lines = ["| path | voice-to-voice p50 / p95 (ms) | end of turn | ASR | LLM first token | TTS first audio "
             "| speculation hit rate | false end of turn (pause in sentence) |",
             "|---|---|---|---|---|---|---|---|"]
    for path in ("old", "new"):
        spec = s[path]["speculation"]
        hit = f"{spec['used']}/{spec['started']}" if spec["started"] else "-"
        pause = s[path]["pause_inside_sentence"]
        lines.append(f"| {path} | {cell(path, 'voice_to_voice_ms')} | {cell(path, 'end_of_turn_ms')} | "
                     f"{cell(path, 'asr_ms')} | {cell(path, 'llm_first_token_ms')} | "
                     f"{cell(path, 'tts_first_audio_ms')} | {hit} | {pause['false_end_of_turn']}/{pause['n']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8, help="spoken questions (from the load tester's set)")
    p.add_argument("--repeats", type=int, default=2, help="times each question is asked per path")
    p.add_argument("--llm-threads", type=int, default=0, help="vLLM CPU threads (0 = the engine's default)")
    p.add_argument("--out", default="out/bench/latency.json", help="results JSON")
    a = p.parse_args()
    res = asyncio.run(main(a))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\nmachine: {res['machine']['cpu']} (load {res['machine']['load_average']})")
    print(table(res))
    print(f"wrote {a.out}")

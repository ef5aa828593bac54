"""Time to first audio: voxserve on Ray Serve vs the same streaming pipeline in one process vs a
naive sequential baseline, plus the latency Ray Serve adds per DeploymentHandle hop.

Variants (same engines, same CPU-profile settings, same spoken questions, one fresh conversation
per question, a warm-up question first):
  naive      the usual first attempt: whole transcript, then the whole LLM reply, then TTS of the
             whole reply; the first audio exists only when everything is done.
  inprocess  services.conversation.Conversation over services.local.LocalStages: streaming LLM ->
             chunker -> TTS, audio pushed at real-time pace, no Ray.
  ray        `deployments.server.start_local` (the CPU profile) and the reference gRPC client
             (clients.voice_client) streaming at real-time pace.
Latency is "turn end -> first audio": from the moment the turn is declared over (the VAD saw
enough silence; for the naive baseline, the whole utterance is available) to the first answer
audio. "Voice-to-voice" adds the end-of-turn detection delay (min_silence_ms), which is the same
for every variant (the naive baseline is given the in-process variant's measured delay).

Per-hop overhead: a trivial unary call (TTS.sample_rate), VAD scoring of 512 samples and the
first chunk of a short TTS stream, each through a DeploymentHandle vs the same work in-process.

    .venv/bin/python scripts/bench_pipeline.py --questions 5 --out out/bench_pipeline.json

Runs the variants one after another (never two LLMs at once); ~4 min on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_common import local_app, local_env, versions

local_env()

from clients.speech_cache import QUESTIONS, SpokenQuestion, load_questions  # noqa: E402
from clients.stats import percentile  # noqa: E402
from services.cpu import machine_record  # noqa: E402

CHUNK_MS = 20
LEAD_SILENCE_S = 0.3


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: the machine record, memory, platform and package versions."""
    mem_gib = 0.0
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        mem_gib = kb / 1024 / 1024
    return {**machine_record(), "memory_gib": round(mem_gib, 1), "platform": platform.platform(),
            "versions": versions("ray", "vllm", "faster_whisper", "piper", "onnxruntime", "grpc")}


def app_args() -> Any:
    from deployments.config import AppArgs
    from deployments.profiles import load_serve_config

    return AppArgs.model_validate(load_serve_config("cpu")["applications"][0]["args"])


def stats(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    return {"n": len(vals), "p50": percentile(vals, 50), "p95": percentile(vals, 95),
            "mean": statistics.fmean(vals) if vals else None, "min": min(vals) if vals else None,
            "max": max(vals) if vals else None}


# --- in one process: naive and streaming -----------------------------------------------------------


async def naive_turn(stages: Any, args: Any, q: SpokenQuestion) -> dict[str, Any]:
    """Whole transcript -> whole reply -> whole TTS; first audio = all done."""
    t0 = time.perf_counter()
    transcript = await stages.transcribe(q.audio, "en")
    t_asr = time.perf_counter()
    messages = [{"role": "system", "content": args.llm.system_prompt},
                {"role": "user", "content": transcript.text.strip()}]
    reply = "".join([d async for d in stages.generate(messages, max_tokens=None)])
    t_llm = time.perf_counter()
    pcm = b"".join([c async for c in stages.synthesize(reply.strip() or "OK.", voice="", sample_rate=0)])
    t_tts = time.perf_counter()
    return {"question": q.text, "transcript": transcript.text.strip(), "reply": reply.strip(),
            "asr_ms": 1000 * (t_asr - t0), "llm_ms": 1000 * (t_llm - t_asr), "tts_ms": 1000 * (t_tts - t_llm),
            "first_audio_ms": 1000 * (t_tts - t0), "done_ms": 1000 * (t_tts - t0),
            "audio_ms": 1000 * len(pcm) / 2 / stages.tts.sample_rate}


async def streaming_turn(stages: Any, args: Any, q: SpokenQuestion, timeout_s: float = 60) -> dict[str, Any]:
    """One conversation turn through Conversation + LocalStages, audio pushed at real-time pace."""
    from services.conversation import ChatHistory, Conversation, SessionSettings
    from services.conversation import events as ev

    settings = SessionSettings(input_sample_rate=q.sample_rate, language="en", vad=args.vad,
                               turn=args.gateway.turn, interruptions=args.gateway.interruptions,
                               output_sample_rate=stages.tts.sample_rate,
                               history_turns=args.gateway.history_turns,
                               output_chunk_ms=args.gateway.output_chunk_ms, chunker=args.tts.chunker)
    conv = Conversation(stages, settings, history=ChatHistory(args.llm.system_prompt))
    await conv.start()
    out: dict[str, Any] = {"question": q.text}
    done = asyncio.Event()
    marks: dict[str, float] = {}

    async def feed() -> None:
        n = q.sample_rate * CHUNK_MS // 1000
        silence = np.zeros(n, np.float32)
        audio = np.concatenate([np.zeros(int(LEAD_SILENCE_S * q.sample_rate), np.float32), q.audio])
        t_next = time.perf_counter()
        for i in range(0, audio.size, n):
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            await conv.push_audio(audio[i:i + n])
            t_next += n / q.sample_rate
        marks["speech_end"] = max(time.perf_counter(), t_next)
        deadline = time.perf_counter() + timeout_s
        while not done.is_set() and time.perf_counter() < deadline:
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            await conv.push_audio(silence)
            t_next += n / q.sample_rate
        await conv.end_input()

    feeder = asyncio.create_task(feed())
    async for event in conv.events():
        if isinstance(event, ev.FinalTranscript):
            out["transcript"] = event.text
        elif isinstance(event, ev.AudioOut) and "first_audio" not in marks:
            marks["first_audio"] = time.perf_counter()
        elif isinstance(event, ev.ResponseDone):
            lat = event.latency
            out.update(reply=event.text, audio_ms=event.audio_ms, vad_end_delay_ms=lat.vad_end_delay_ms,
                       asr_ms=lat.asr_ms, llm_first_token_ms=lat.llm_first_token_ms,
                       tts_first_audio_ms=lat.tts_first_audio_ms, first_audio_ms=lat.first_audio_ms,
                       server_voice_to_voice_ms=lat.voice_to_voice_ms, done_ms=lat.total_ms)
            done.set()
        elif isinstance(event, ev.ErrorEvent):
            out["error"] = f"{event.code}: {event.message}"
            done.set()
    await feeder
    if "first_audio" in marks and "speech_end" in marks:
        out["voice_to_voice_ms"] = 1000 * (marks["first_audio"] - marks["speech_end"])
    return out


async def run_local(questions: list[SpokenQuestion], repeats: int, variants: set[str]) -> dict[str, Any]:
    from services.local import LocalStages

    args = app_args()
    t0 = time.perf_counter()
    stages = await asyncio.to_thread(LocalStages.load, args.vad, args.asr, args.llm, args.tts,
                                     args.gateway.turn_detector)
    print(f"local engines loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results: dict[str, Any] = {}
    try:
        for name, fn in (("naive", naive_turn), ("inprocess", streaming_turn)):
            if name not in variants:
                continue
            await fn(stages, args, questions[0])  # warm-up: first-call costs are not the pipeline's
            turns = []
            for _ in range(repeats):
                for q in questions:
                    r = await fn(stages, args, q)
                    turns.append(r)
                    print(f"  {name:9} {r.get('first_audio_ms', 0):7.0f} ms  {q.text}", file=sys.stderr, flush=True)
            results[name] = {"turns": turns}
    finally:
        stages.shutdown()
    return results


# --- on Ray Serve -------------------------------------------------------------------------------------


async def ray_turns(address: str, questions: list[SpokenQuestion], repeats: int) -> list[dict[str, Any]]:
    from clients.voice_client import UserTurn, VoiceClient
    from protos.voxserve.v1 import voice_pb2 as pb

    cfg = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=questions[0].sample_rate, language="en")

    async def one(q: SpokenQuestion) -> dict[str, Any]:
        client = VoiceClient(address)
        try:
            lead = np.zeros(int(LEAD_SILENCE_S * q.sample_rate), np.float32)
            res = await client.converse([UserTurn(audio=np.concatenate([lead, q.audio]), label=q.text)], cfg)
        finally:
            await client.close()
        t = res.turns[0] if res.turns else None
        if t is None or res.status != "OK":
            return {"question": q.text, "error": f"{res.status}: {res.details}"}
        s = t.server_latency
        return {"question": q.text, "transcript": t.transcript, "reply": t.response_text,
                "voice_to_voice_ms": t.voice_to_voice_ms, "first_audio_ms": s.get("first_audio_ms"),
                "server_voice_to_voice_ms": s.get("voice_to_voice_ms"), "vad_end_delay_ms": s.get("vad_end_delay_ms"),
                "asr_ms": s.get("asr_ms"), "llm_first_token_ms": s.get("llm_first_token_ms"),
                "tts_first_audio_ms": s.get("tts_first_audio_ms"), "done_ms": s.get("total_ms"),
                "audio_ms": t.audio_ms, "underrun_ms": t.underrun_ms, "error": t.error}

    await one(questions[0])  # warm-up
    out = []
    for _ in range(repeats):
        for q in questions:
            r = await one(q)
            out.append(r)
            print(f"  ray       {r.get('first_audio_ms') or 0:7.0f} ms  {q.text}", file=sys.stderr, flush=True)
    return out


async def hop_overhead(iters: int) -> dict[str, Any]:
    """The same small work through a DeploymentHandle and in-process (ms per call)."""
    from ray import serve

    from services.tts import PiperTTS
    from services.vad import SileroModel, VADState

    args = app_args()
    vad_h = serve.get_deployment_handle("VAD", app_name="voxserve")
    tts_h = serve.get_deployment_handle("TTS", app_name="voxserve")
    vad = SileroModel.load(args.vad)
    tts = PiperTTS.load(args.tts)
    x = (0.01 * np.random.default_rng(0).standard_normal(512)).astype(np.float32)
    text = "Hello there."

    async def timed(fn: Any, n: int) -> list[float]:
        await fn()  # warm-up
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await fn()
            out.append(1000 * (time.perf_counter() - t))
        return out

    async def unary_remote() -> None:
        await tts_h.sample_rate.remote()

    async def unary_local() -> None:
        _ = tts.sample_rate

    async def vad_remote() -> None:
        await vad_h.probs.remote(x, VADState())

    async def vad_local() -> None:
        vad.probs(x, VADState())

    async def tts_remote() -> None:
        gen: Any = tts_h.options(stream=True).synthesize.remote(text, 0)
        async for _ in gen:
            break
        gen.cancel()

    async def tts_local() -> None:
        agen = tts.synthesize(text)
        async for _ in agen:
            break
        await agen.aclose()

    probes = {"unary (TTS.sample_rate)": (unary_remote, unary_local, iters),
              "VAD probs, 512 samples": (vad_remote, vad_local, iters),
              "TTS stream, first chunk of 'Hello there.'": (tts_remote, tts_local, max(5, iters // 3))}
    result: dict[str, Any] = {}
    for name, (remote, local, n) in probes.items():
        r, loc = await timed(remote, n), await timed(local, n)
        result[name] = {"handle": stats(r), "in_process": stats(loc),
                        "overhead_p50_ms": (percentile(r, 50) or 0) - (percentile(loc, 50) or 0)}
        await asyncio.sleep(0)
    if tts.active_syntheses:
        await tts.wait_idle()
    return result


def run_ray(questions: list[SpokenQuestion], repeats: int, hop_iters: int, grpc_port: int) -> dict[str, Any]:
    with local_app(grpc_port=grpc_port) as server:
        async def both() -> dict[str, Any]:
            turns = await ray_turns(server.grpc_address, questions, repeats)
            hops = await hop_overhead(hop_iters) if hop_iters else {}
            return {"turns": turns, "hops": hops}

        return asyncio.run(both())


# --- report -------------------------------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    v = results["variants"]
    vad_delay = None
    for name in ("inprocess", "ray"):
        if name in v:
            vad_delay = percentile([t["vad_end_delay_ms"] for t in v[name]["turns"] if "vad_end_delay_ms" in t], 50)
            if vad_delay is not None:
                break
    if "naive" in v and vad_delay is not None:
        for t in v["naive"]["turns"]:
            t["voice_to_voice_ms"] = vad_delay + t["first_audio_ms"]
            t["voice_to_voice_note"] = "first_audio_ms + measured median VAD end delay of a streaming variant"
    table: dict[str, Any] = {}
    for name, data in v.items():
        turns = [t for t in data["turns"] if not t.get("error")]
        row: dict[str, Any] = {key: stats([t[key] for t in turns if t.get(key) is not None])
                       for key in ("first_audio_ms", "voice_to_voice_ms", "done_ms", "asr_ms",
                                   "llm_first_token_ms", "llm_ms", "tts_first_audio_ms", "tts_ms")}
        row["errors"] = len(data["turns"]) - len(turns)
        table[name] = row
    return table


def markdown(results: dict[str, Any]) -> str:
    t = results["summary"]

    def f(d: dict[str, Any], k: str, s: str = "p50") -> str:
        x = d.get(k, {}).get(s)
        return "-" if x is None else f"{x:.0f}"

    labels = {"naive": "naive sequential (whole ASR -> whole LLM -> whole TTS)",
              "inprocess": "streaming pipeline, one process (no Ray)",
              "ray": "voxserve on Ray Serve (gRPC client)"}
    lines = ["| variant | turn end -> first audio p50 (ms) | p95 | voice-to-voice p50 (ms) "
             "| answer done p50 (ms) | n |",
             "|---|---|---|---|---|---|"]
    for name, row in t.items():
        lines.append(f"| {labels.get(name, name)} | {f(row, 'first_audio_ms')} | {f(row, 'first_audio_ms', 'p95')} | "
                     f"{f(row, 'voice_to_voice_ms')} | {f(row, 'done_ms')} | {row['first_audio_ms']['n']} |")
    hops = results.get("hops") or {}
    if hops:
        lines += ["", "| one hop | through a DeploymentHandle p50 (ms) | in process p50 (ms) | overhead (ms) |",
                  "|---|---|---|---|"]
        for name, h in hops.items():
            lines.append(f"| {name} | {h['handle']['p50']:.2f} | {h['in_process']['p50']:.2f} | "
                         f"{h['overhead_p50_ms']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=5, help="spoken questions per variant (default: 5)")
    p.add_argument("--repeats", type=int, default=1, help="times each question is asked (default: 1)")
    p.add_argument("--variants", default="naive,inprocess,ray", help="comma-separated subset to run")
    p.add_argument("--hop-iters", type=int, default=50, help="calls per hop probe (0 = skip; default: 50)")
    p.add_argument("--grpc-port", type=int, default=0, help="gRPC port of the Ray app (default: a free one)")
    p.add_argument("--out", default="out/bench_pipeline.json", help="JSON results (a .md table lands beside it)")
    a = p.parse_args()
    variants = set(a.variants.split(","))
    questions = load_questions(QUESTIONS[: a.questions])
    results: dict[str, Any] = {"machine": machine_info(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "questions": [q.text for q in questions], "variants": {}}
    t0 = time.perf_counter()
    if variants & {"naive", "inprocess"}:
        results["variants"].update(asyncio.run(run_local(questions, a.repeats, variants)))
    if "ray" in variants:
        ray = run_ray(questions, a.repeats, a.hop_iters, a.grpc_port)
        results["variants"]["ray"] = {"turns": ray["turns"]}
        results["hops"] = ray["hops"]
    results["wall_s"] = time.perf_counter() - t0
    results["summary"] = summarize(results)
    md = markdown(results)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

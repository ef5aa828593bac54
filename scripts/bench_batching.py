"""Cross-session batching of the listening engines: ASR, VAD and end of turn.

    .venv/bin/python scripts/bench_batching.py [--clients 8] [--out docs/bench/bench_batching.json]

ASR (Moonshine Tiny English, Whisper base): ``--clients`` sessions each send their next Piper
utterance (1-8 s, VAD-style padding) as soon as the last one is transcribed, against an engine
that batches at most 1, 4 or 8 utterances: utterances per second, latency (submit to transcript)
p50/p95, the batch sizes that formed, and whether every transcript equals the one of the first run.

VAD: 32 ms windows scored per second for 8 and 32 streams, one model call per stream and window
(what each session did on its own) against one ``probs_many`` call per tick for all streams; and
through the gateway's path (asyncio sessions pushing 32 ms chunks at once), inline versus
``VADBatcher``.

End of turn (Smart Turn): 1, 4 and 8 sessions asking at once, one thread per call (the gateway's
old path) against the detector's queue (one or two threads, max_batch 1 or 4).

The CPU model, its flags and the load average before and after go into the results: figures taken
while other work runs are not comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_asr import SENTENCES, piper_voice, with_vad_padding
from scripts.bench_common import pct, versions
from services.asr import WhisperASR
from services.asr_base import ASRConfig, PooledASR
from services.audio import MODEL_RATE
from services.cpu import machine_record
from services.moonshine_asr import MoonshineASR
from services.turn_detection import SmartTurnModel, TurnDetectorConfig
from services.vad import WINDOW, SileroModel, VADBatcher, VADState

BATCHES = (1, 4, 8)
#: VADBatcher ticks compared (VADConfig.batch_tick_ms).
TICKS_MS = (4.0, 8.0, 16.0)


# --- ASR -----------------------------------------------------------------------------------------


async def closed_loop(engine: PooledASR, utterances: list[np.ndarray], clients: int,
                      rounds: int) -> dict[str, Any]:
    """``clients`` sessions, each sending ``rounds`` utterances one after another."""
    latencies: list[float] = []
    texts: dict[int, str] = {}

    async def session(c: int) -> None:
        for r in range(rounds):
            k = (c * rounds + r) % len(utterances)
            t0 = time.perf_counter()
            result = await engine.transcribe(utterances[k], "en")
            latencies.append(1000 * (time.perf_counter() - t0))
            texts[k] = result.text

    stats_before = engine.batcher.stats.items, engine.batcher.stats.batches
    t0 = time.perf_counter()
    await asyncio.gather(*(session(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    items = engine.batcher.stats.items - stats_before[0]
    batches = engine.batcher.stats.batches - stats_before[1]
    return {"utterances": len(latencies), "wall_s": round(wall, 2),
            "utterances_per_s": round(len(latencies) / wall, 2),
            "p50_ms": pct(latencies, 50), "p95_ms": pct(latencies, 95),
            "mean_batch": round(items / batches, 2) if batches else 0.0, "texts": texts}


def bench_asr(name: str, make: Callable[[int], PooledASR], utterances: list[np.ndarray],
              clients: int, rounds: int, batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    reference: dict[int, str] | None = None
    for b in batches:
        engine = make(b)
        try:
            engine.warm_up()
            row = asyncio.run(closed_loop(engine, utterances, clients, rounds))
        finally:
            engine.close()
        texts = row.pop("texts")
        reference = reference or texts
        row["same_texts_as_first"] = all(texts[k] == reference.get(k) for k in texts)
        rows[str(b)] = row
        print(f"  {name} max_batch {b}: {row['utterances_per_s']} utt/s, p50 {row['p50_ms']} ms, "
              f"p95 {row['p95_ms']} ms, mean batch {row['mean_batch']}", flush=True)
    return rows


# --- VAD -----------------------------------------------------------------------------------------


def bench_vad_direct(model: SileroModel, streams: int, seconds: float) -> dict[str, Any]:
    """Windows per second: one call per stream and window vs one probs_many per tick."""
    rng = np.random.default_rng(0)
    chunks = [(0.1 * rng.standard_normal(WINDOW)).astype(np.float32) for _ in range(streams)]
    ticks = int(seconds / 0.032)
    states = [VADState() for _ in range(streams)]
    t0 = time.perf_counter()
    for _ in range(ticks):
        for k in range(streams):
            _, states[k] = model.probs(chunks[k], states[k])
    single = ticks * streams / (time.perf_counter() - t0)
    states = [VADState() for _ in range(streams)]
    t0 = time.perf_counter()
    for _ in range(ticks):
        out = model.probs_many(list(zip(chunks, states, strict=True)))
        states = [st for _, st in out]
    batched = ticks * streams / (time.perf_counter() - t0)
    return {"single_windows_per_s": round(single), "batched_windows_per_s": round(batched),
            "speedup": round(batched / single, 2)}


async def bench_vad_sessions(model: SileroModel, streams: int, seconds: float,
                             batcher: VADBatcher | None) -> dict[str, Any]:
    """The gateway's path: ``streams`` asyncio sessions push a 32 ms chunk each per 32 ms tick
    (real time, staggered); CPU time per window and the latency of each scoring call."""
    rng = np.random.default_rng(1)
    chunk = [(0.1 * rng.standard_normal(WINDOW)).astype(np.float32) for _ in range(streams)]
    ticks = int(seconds / 0.032)
    latencies: list[float] = []

    async def session(k: int) -> None:
        state = VADState()
        await asyncio.sleep(0.032 * k / streams)  # sessions' chunks arrive spread over a tick
        start = time.perf_counter()
        for i in range(ticks):
            t0 = time.perf_counter()
            if batcher is None:
                _, state = model.probs(chunk[k], state)
            else:
                _, state = await batcher.score(chunk[k], state)
            latencies.append(1000 * (time.perf_counter() - t0))
            await asyncio.sleep(max(0.0, start + 0.032 * (i + 1) - time.perf_counter()))

    cpu0 = time.process_time()
    await asyncio.gather(*(session(k) for k in range(streams)))
    cpu = time.process_time() - cpu0
    windows = ticks * streams
    return {"cpu_us_per_window": round(1e6 * cpu / windows, 1), "call_p50_ms": pct(latencies, 50),
            "call_p95_ms": pct(latencies, 95)}


# --- end of turn ---------------------------------------------------------------------------------


async def bench_turn(model: SmartTurnModel, turn_audio: np.ndarray, sessions: int,
                     how: str, rounds: int = 3) -> dict[str, Any]:
    latencies: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        if how == "thread per call":
            await asyncio.to_thread(model.predict, turn_audio)
        else:
            await model.apredict(turn_audio)
        latencies.append(1000 * (time.perf_counter() - t0))

    t0 = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(sessions)))
    wall = time.perf_counter() - t0
    return {"calls_per_s": round(len(latencies) / wall, 2), "p50_ms": pct(latencies, 50),
            "p95_ms": pct(latencies, 95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent ASR sessions")
    ap.add_argument("--rounds", type=int, default=3, help="utterances per Moonshine session")
    ap.add_argument("--whisper-rounds", type=int, default=1, help="utterances per Whisper session")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES),
                    help="ASR max_batch values, run in this order")
    ap.add_argument("--vad-seconds", type=float, default=3.0, help="audio per VAD stream")
    ap.add_argument("--skip", nargs="*", default=[], choices=["moonshine", "whisper", "vad", "turn"])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    machine = machine_record()
    print(f"CPU: {machine['cpu']}; load average {machine['load_average']}", flush=True)
    speak = piper_voice()
    utterances = [with_vad_padding(speak(s)) for s in SENTENCES]
    results: dict[str, Any] = {
        "benchmark": "bench_batching", "machine": machine, "clients": args.clients,
        "versions": versions("onnxruntime", "onnx", "faster-whisper", "ctranslate2"),
        "utterance_s": {"min": round(min(u.size for u in utterances) / MODEL_RATE, 2),
                        "max": round(max(u.size for u in utterances) / MODEL_RATE, 2),
                        "mean": round(float(np.mean([u.size for u in utterances])) / MODEL_RATE, 2)},
        "asr": {}, "vad": {}, "turn": {},
    }

    if "moonshine" not in args.skip:
        base = MoonshineASR.load(ASRConfig())
        base.close()  # keep its model (and batch-safe decoder) for engines of each batch size
        results["asr"]["moonshine-tiny-en"] = bench_asr(
            "moonshine", lambda b: MoonshineASR(base.model, ASRConfig(max_batch=b), base.name, base.languages),
            utterances, args.clients, args.rounds, tuple(args.batches))
    if "whisper" not in args.skip:
        whisper = WhisperASR.load(ASRConfig())
        whisper.close()
        results["asr"]["whisper-base"] = bench_asr(
            "whisper", lambda b: WhisperASR(whisper.model, ASRConfig(max_batch=b)),
            utterances, args.clients, args.whisper_rounds, tuple(args.batches))

    if "vad" not in args.skip:
        vad = SileroModel.load()
        for streams in (8, 32):
            row = bench_vad_direct(vad, streams, args.vad_seconds)
            row["sessions_inline"] = asyncio.run(bench_vad_sessions(vad, streams, args.vad_seconds, None))
            for tick in TICKS_MS:
                batcher = VADBatcher(vad, tick_ms=tick)
                key = f"sessions_batcher_{tick:g}ms"
                row[key] = asyncio.run(bench_vad_sessions(vad, streams, args.vad_seconds, batcher))
                row[key]["mean_batch"] = round(batcher.stats.mean_batch, 1)
                batcher.close()
            results["vad"][str(streams)] = row
            print(f"  vad {streams} streams: {row}", flush=True)

    if "turn" not in args.skip:
        turn_audio = np.concatenate([speak("What is the capital of France?"),
                                     np.zeros(MODEL_RATE // 5, np.float32)])
        single = SmartTurnModel.load(TurnDetectorConfig())
        single.warm_up()
        batched = SmartTurnModel(single.session, TurnDetectorConfig(max_batch=4), single.path)
        two = SmartTurnModel(single.session, TurnDetectorConfig(max_concurrent=2), single.path)
        for sessions in (1, 4, 8):
            row = {}
            for how, model in (("thread per call", single), ("queue, 1 thread", single),
                               ("queue, 2 threads", two), ("queue, max_batch 4", batched)):
                row[how] = asyncio.run(bench_turn(model, turn_audio, sessions, how))
            results["turn"][str(sessions)] = row
            print(f"  turn {sessions} sessions: {row}", flush=True)
        for m in (single, batched, two):
            m.close()

    results["load_average_after"] = machine_record()["load_average"]
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")


def print_table(r: dict[str, Any]) -> None:
    print(f"\nCPU: {r['machine']['cpu']}")
    print(f"load average before {r['machine']['load_average']}, after {r['load_average_after']}")
    print(f"\nASR, {r['clients']} sessions sending utterances back to back "
          f"({r['utterance_s']['min']}-{r['utterance_s']['max']} s, mean {r['utterance_s']['mean']} s)")
    print(f"  {'engine':18} {'max_batch':>9} {'utt/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'mean batch':>10} "
          f"{'same text':>9}")
    for engine, rows in r["asr"].items():
        for b, row in rows.items():
            print(f"  {engine:18} {b:>9} {row['utterances_per_s']:7.2f} {row['p50_ms']:7.0f} "
                  f"{row['p95_ms']:7.0f} {row['mean_batch']:10.2f} {row['same_texts_as_first']!s:>9}")
    if r["vad"]:
        print("\nVAD, 32 ms windows: model calls alone (windows/s), and asyncio sessions pushing 32 ms "
              "chunks (CPU us per window incl. the event loop, call latency p50/p95 ms, mean batch)")
        for streams, row in r["vad"].items():
            print(f"  {streams:>2} streams: one call per window {row['single_windows_per_s']} w/s, "
                  f"one probs_many per tick {row['batched_windows_per_s']} w/s (x{row['speedup']})")
            for key, v in row.items():
                if key.startswith("sessions_"):
                    how = key.removeprefix("sessions_").replace("_", " ")
                    batch = f", batch {v['mean_batch']}" if "mean_batch" in v else ""
                    print(f"      {how:16} {v['cpu_us_per_window']:7.1f} us/window, "
                          f"{v['call_p50_ms']:.1f}/{v['call_p95_ms']:.1f} ms{batch}")
    if r["turn"]:
        print("\nEnd of turn (Smart Turn), sessions asking at once: calls/s, p50/p95 ms")
        for sessions, row in r["turn"].items():
            cells = "   ".join(f"{how}: {v['calls_per_s']:.1f}/s {v['p50_ms']:.0f}/{v['p95_ms']:.0f}"
                               for how, v in row.items())
            print(f"  {sessions:>2}: {cells}")


if __name__ == "__main__":
    main()

"""Benchmark the Piper TTS engine: voice load, time to first audio, real-time factor.

Time to first audio (TTFA) for one long sentence:
  (a) the sentence given whole to ``PiperTTS.synthesize`` (Piper speaks it as one chunk);
  (b) the same sentence pushed as LLM-like token deltas through ``TTSStream`` (the chunker
      cuts a short first chunk).
Both are measured with the text available at once, and with tokens arriving at
``--tokens-per-s`` (a simulated LLM): then (a) must also wait for the whole sentence.

    .venv/bin/python scripts/bench_tts.py --repeats 5 --out /tmp/bench_tts.json

``--scaling`` instead measures what pays on this CPU when several sessions synthesize at once
(issue 20): 4 concurrent syntheses of a clause-sized chunk under each (onnxruntime threads,
``max_concurrent`` slots) pair, giving audio seconds per wall second and the time each synthesis
took; and one ONNX run with a batch of 2 against two runs of 1 (does batching across sessions
pay?). Nothing else may run meanwhile.

    .venv/bin/python scripts/bench_tts.py --scaling --out docs/bench/issue20/tts_scaling.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.conversation.tts_stream import TTSStream
from services.tts import PiperTTS, TTSConfig

LONG_SENTENCE = (
    "Well, the weather today looks mostly sunny with a light breeze coming from the west, "
    "although the forecast says that clouds will gather in the late afternoon and bring some "
    "rain to the northern parts of the city before the evening."
)


def token_deltas(text: str) -> list[str]:
    """Word-piece deltas like an LLM's: a leading space joined to each word, long words split."""
    out: list[str] = []
    for i, word in enumerate(text.split(" ")):
        piece = word if i == 0 else " " + word
        while len(piece) > 6:
            out.append(piece[:5])
            piece = piece[5:]
        out.append(piece)
    return out


async def whole_text(tts: PiperTTS, text: str, delay_s: float) -> dict[str, float]:
    """(a): wait ``delay_s`` for the text (the LLM writing it), then synthesize it whole."""
    t0 = time.perf_counter()
    await asyncio.sleep(delay_s)
    first = None
    samples = 0
    t_syn = time.perf_counter()
    async for pcm in tts.synthesize(text):
        if first is None:
            first = time.perf_counter() - t0
        samples += pcm.size
    synth_s = time.perf_counter() - t_syn
    audio_s = samples / tts.sample_rate
    return {"ttfa_s": first or 0.0, "synth_s": synth_s, "audio_s": audio_s,
            "rtf": synth_s / audio_s}


async def streamed(tts: PiperTTS, text: str, tokens_per_s: float) -> dict[str, Any]:
    """(b): push token deltas (0 rate = all at once) into a TTSStream."""
    deltas = token_deltas(text)
    cfg = tts.config
    stream = TTSStream(tts.synthesize, sample_rate=tts.sample_rate, chunker=cfg.chunker,
                       audio_queue=cfg.audio_queue, max_pending_chunks=cfg.max_pending_chunks)
    t0 = time.perf_counter()

    async def feed() -> None:
        for i, d in enumerate(deltas):
            if tokens_per_s > 0:
                await asyncio.sleep(max(0.0, t0 + (i + 1) / tokens_per_s - time.perf_counter()))
            stream.push_text(d)
        stream.end_input()

    feeder = asyncio.create_task(feed())
    first = None
    first_text = ""
    samples = 0
    chunks = 0
    async for piece in stream:
        if first is None:
            first, first_text = time.perf_counter() - t0, piece.text
        samples += len(piece.pcm) // 2 if isinstance(piece.pcm, bytes) else piece.pcm.size  # PCM16 or float32
        chunks += piece.is_last_in_chunk
    total = time.perf_counter() - t0
    await feeder
    await stream.aclose()
    audio_s = samples / tts.sample_rate
    return {"ttfa_s": first or 0.0, "total_s": total, "audio_s": audio_s, "chunks": chunks,
            "first_chunk": first_text}


CHUNK = "the forecast says that clouds will gather in the late afternoon,"


async def concurrent(tts: PiperTTS, callers: int, repeats: int) -> dict[str, float]:
    """``callers`` syntheses of CHUNK at once, ``repeats`` times: throughput and latency."""
    latencies: list[float] = []
    audio = 0.0

    async def one() -> None:
        nonlocal audio
        t0 = time.perf_counter()
        async for pcm in tts.synthesize(CHUNK):
            audio += pcm.size / tts.sample_rate
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    for _ in range(repeats):
        await asyncio.gather(*(one() for _ in range(callers)))
    wall = time.perf_counter() - t0
    return {"audio_per_wall_s": audio / wall, "synthesis_s_p50": statistics.median(latencies),
            "synthesis_s_max": max(latencies)}


def batch_pays(tts: PiperTTS, repeats: int) -> dict[str, float]:
    """One ONNX run over a batch of 2 copies of CHUNK's phonemes vs two runs of one."""
    voice = tts.voice
    ids = [i for sentence in voice.phonemize(CHUNK) for i in voice.phonemes_to_ids(sentence)]
    scales = np.array([voice.config.noise_scale, voice.config.length_scale, voice.config.noise_w_scale],
                      dtype=np.float32)

    def run(batch: int) -> float:
        x = np.array([ids] * batch, dtype=np.int64)
        t0 = time.perf_counter()
        voice.session.run(None, {"input": x, "input_lengths": np.array([len(ids)] * batch, dtype=np.int64),
                                 "scales": scales})
        return time.perf_counter() - t0

    run(1)
    try:
        run(2)
    except Exception as exc:  # a voice exported without a dynamic batch axis
        return {"batch2_error": str(exc)[:200]}  # type: ignore[dict-item]
    one = statistics.median(run(1) for _ in range(repeats))
    two = statistics.median(run(2) for _ in range(repeats))
    return {"one_run_s": one, "batch_of_2_s": two, "batch_of_2_vs_two_runs": two / (2 * one)}


async def scaling(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for threads in (1, 2):
        for slots in (1, 2):
            tts = PiperTTS.load(TTSConfig(voice=args.voice, num_threads=threads, max_concurrent=slots))
            await concurrent(tts, 1, 1)  # warm up
            row = {"num_threads": threads, "max_concurrent": slots, **await concurrent(tts, 4, args.repeats)}
            rows.append(row)
            print(f"threads {threads}  slots {slots}: {row['audio_per_wall_s']:.2f} s audio / s, "
                  f"synthesis p50 {row['synthesis_s_p50'] * 1000:.0f} ms, max {row['synthesis_s_max'] * 1000:.0f} ms",
                  flush=True)
    batch = batch_pays(PiperTTS.load(TTSConfig(voice=args.voice, num_threads=1)), args.repeats * 2)
    print(f"batch of 2 in one ONNX run: {batch}")
    return {"chunk": CHUNK, "callers": 4, "repeats": args.repeats, "configs": rows, "batching": batch}


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--voice", default="", help="voice .onnx path ('' = embedded joe voice)")
    ap.add_argument("--threads", type=int, default=TTSConfig().num_threads,
                    help="onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens-per-s", type=float, default=30.0,
                    help="simulated LLM speed for the 'llm' rows")
    ap.add_argument("--text", default=LONG_SENTENCE)
    ap.add_argument("--scaling", action="store_true",
                    help="measure threads x slots x concurrent syntheses, and batching (see above)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.scaling:
        from services.cpu import machine_record

        result = {"machine": machine_record(), **await scaling(args)}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
            print(f"wrote {args.out}")
        return

    t0 = time.perf_counter()
    tts = PiperTTS.load(TTSConfig(voice=args.voice, num_threads=args.threads))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    async for _ in tts.synthesize("Warm up."):
        pass
    warmup_s = time.perf_counter() - t0

    n_tokens = len(token_deltas(args.text))
    llm_s = n_tokens / args.tokens_per_s
    runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "a_llm": [], "b_llm": []}
    for _ in range(args.repeats):
        runs["a"].append(await whole_text(tts, args.text, 0.0))
        runs["b"].append(await streamed(tts, args.text, 0.0))
        runs["a_llm"].append(await whole_text(tts, args.text, llm_s))
        runs["b_llm"].append(await streamed(tts, args.text, args.tokens_per_s))

    result = {
        "voice": tts.voice_path,
        "sample_rate": tts.sample_rate,
        "num_threads": args.threads,
        "repeats": args.repeats,
        "text_words": len(args.text.split()),
        "tokens": n_tokens,
        "tokens_per_s": args.tokens_per_s,
        "voice_load_s": load_s,
        "first_synthesis_s": warmup_s,
        "audio_s": median(runs["a"], "audio_s"),
        "rtf": median(runs["a"], "rtf"),
        "ttfa_whole_text_s": median(runs["a"], "ttfa_s"),
        "ttfa_stream_s": median(runs["b"], "ttfa_s"),
        "ttfa_whole_text_llm_s": median(runs["a_llm"], "ttfa_s"),
        "ttfa_stream_llm_s": median(runs["b_llm"], "ttfa_s"),
        "stream_chunks": runs["b"][0]["chunks"],
        "stream_first_chunk": runs["b"][0]["first_chunk"],
        "stream_rtf": median(runs["b"], "total_s") / median(runs["b"], "audio_s"),
    }
    print(f"voice load            {load_s * 1000:8.0f} ms   (first synthesis {warmup_s * 1000:.0f} ms)")
    print(f"sentence              {result['text_words']} words, {n_tokens} token deltas, "
          f"{result['audio_s']:.1f} s of audio")
    print(f"real-time factor      {result['rtf']:8.3f}      (stream: {result['stream_rtf']:.3f})")
    print("time to first audio   text ready      tokens at "
          f"{args.tokens_per_s:g}/s (LLM needs {llm_s:.2f} s)")
    print(f"  (a) whole text      {result['ttfa_whole_text_s'] * 1000:8.0f} ms   "
          f"{result['ttfa_whole_text_llm_s'] * 1000:8.0f} ms")
    print(f"  (b) TTSStream       {result['ttfa_stream_s'] * 1000:8.0f} ms   "
          f"{result['ttfa_stream_llm_s'] * 1000:8.0f} ms")
    print(f"  first chunk: {result['stream_first_chunk']!r} ({result['stream_chunks']} chunks)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())

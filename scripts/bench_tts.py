"""Benchmark the Piper TTS engine: voice load, time to first audio, real-time factor.

Time to first audio (TTFA) for one long sentence:
  (a) the sentence given whole to ``PiperTTS.synthesize`` (Piper speaks it as one chunk);
  (b) the same sentence pushed as LLM-like token deltas through ``TTSStream`` (the chunker
      cuts a short first chunk).
Both are measured with the text available at once, and with tokens arriving at
``--tokens-per-s`` (a simulated LLM): then (a) must also wait for the whole sentence.

    .venv/bin/python scripts/bench_tts.py --repeats 5 --out /tmp/bench_tts.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

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
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

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

"""Benchmark the speech-native mode's audio LLMs on the tiny local checkpoints.

For each architecture (Qwen2-Audio, Ultravox): time to build the tiny checkpoint (fresh, into a
temporary folder), vLLM AsyncLLM start time, TTFT with N seconds of audio (processor + audio
encoder + prefill + first token), TTFT of the same prompt without audio, and decode speed.
The tiny models have random audio encoders: the numbers measure plumbing and compute, not
answer quality. (The cascade side of the comparison is scripts/bench_pipeline.py.)

    .venv/bin/python scripts/bench_modes.py [--arch qwen2_audio ultravox] [--audio-s 2]
        [--runs 5] [--out bench_modes.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from services.cpu import machine_record
from services.speech_llm import AudioArch


def speech(seconds: float) -> np.ndarray:
    """Piper speech padded or cut to ``seconds`` at 16 kHz."""
    from piper import PiperVoice

    from services.audio import MODEL_RATE, resample
    from services.models import default_tts_voice

    voice = PiperVoice.load(default_tts_voice())
    chunks = list(voice.synthesize("What is the capital of France? Please answer briefly."))
    audio = resample(np.concatenate([c.audio_float_array for c in chunks]),
                     chunks[0].sample_rate, MODEL_RATE)
    n = int(seconds * MODEL_RATE)
    return np.pad(audio, (0, max(0, n - audio.size)))[:n].astype(np.float32)


async def timed(engine: Any, inputs: dict[str, Any], max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, generated tokens) of one request."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, last = None, None
    async for item in engine.generate(inputs, params, request_id=uuid.uuid4().hex):
        if ttft is None:
            ttft = time.perf_counter() - t0
        last = item
    assert last is not None and ttft is not None
    return ttft, time.perf_counter() - t0, len(last.outputs[0].token_ids)


async def bench_arch(arch: AudioArch, audio: np.ndarray, runs: int, max_tokens: int,
                     kv_bytes: int) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.checkpoints import fix_checkpoint
    from services import speech_llm
    from services.audio import MODEL_RATE
    from tests import tiny_models

    build = (tiny_models.build_tiny_qwen2_audio if arch == speech_llm.QWEN2_AUDIO
             else tiny_models.build_tiny_ultravox)
    res: dict[str, Any] = {"arch": arch, "audio_s": audio.size / MODEL_RATE}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        t = time.perf_counter()
        built = build(Path(tmp) / arch)
        res["build_s"] = round(time.perf_counter() - t, 2)
        args = AsyncEngineArgs(model=fix_checkpoint(built), enforce_eager=True, dtype="bfloat16",
                               kv_cache_memory_bytes=kv_bytes, max_num_seqs=4,
                               **speech_llm.engine_kwargs(arch, max_audio_s=10.0))
        t = time.perf_counter()
        engine = AsyncLLM.from_engine_args(args)
        res["start_s"] = round(time.perf_counter() - t, 2)
        try:
            tok = engine.get_tokenizer()
            history = [{"role": "user", "content": ""}]
            with_audio = {"prompt": speech_llm.build_audio_prompt(arch, tok, history),
                          "multi_modal_data": {"audio": (audio, MODEL_RATE)}}
            text_only = {"prompt": speech_llm.build_audio_prompt(arch, tok, history, 0)}
            await timed(engine, with_audio, 2)  # warm-up: first-call allocations
            audio_runs = [await timed(engine, with_audio, max_tokens) for _ in range(runs)]
            text_runs = [await timed(engine, text_only, 2) for _ in range(runs)]
        finally:
            engine.shutdown()
    res["audio_tokens"] = speech_llm.audio_token_count(arch, res["audio_s"])
    res["ttft_audio_ms"] = round(1000 * statistics.median(r[0] for r in audio_runs), 1)
    res["ttft_audio_ms_all"] = [round(1000 * r[0], 1) for r in audio_runs]
    res["ttft_text_only_ms"] = round(1000 * statistics.median(r[0] for r in text_runs), 1)
    res["decode_tok_s"] = round(statistics.median(
        (r[2] - 1) / (r[1] - r[0]) for r in audio_runs if r[2] > 1 and r[1] > r[0]), 1)
    return res


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["qwen2_audio", "ultravox"],
                    choices=["qwen2_audio", "ultravox"])
    ap.add_argument("--audio-s", type=float, default=2.0, help="seconds of audio per request")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-mib", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    a = ap.parse_args()
    # Run the model in the engine-core process (one process spawn fewer at start on CPU).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    audio = speech(a.audio_s)
    results: dict[str, Any] = {"machine": {**machine_record(), "VLLM_ENABLE_V1_MULTIPROCESSING":
                                           os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]}, "runs": []}
    arch: AudioArch
    for arch in a.arch:  # one engine at a time: two may not fit in memory together
        r = await bench_arch(arch, audio, a.runs, a.max_tokens, a.kv_mib << 20)
        print(json.dumps(r), flush=True)
        results["runs"].append(r)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # vLLM starts its engine process with spawn
    asyncio.run(main())

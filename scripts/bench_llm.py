"""Benchmark the LLM engines: start time, TTFT and tokens/s (one request), aggregate tokens/s
and TTFT at several concurrency levels, how long this process's event loop stalls meanwhile, and
the TTFT of a long system prompt the first time (prefix cache miss) and again with another
question (hit). Several engines run one after the other in one run (side by side).

    .venv/bin/python scripts/bench_llm.py [--engine vllm,ctranslate2] [--concurrency 1,2,4,8]
                                          [--model PATH] [--max-tokens 64] [--out bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Tell me a long story about a dragon and a knight."


class LoopProbe:
    """Measures event-loop stalls: the largest gap between wake-ups of a 10 ms sleeper."""

    def __init__(self) -> None:
        self.max_gap_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            self.max_gap_s = max(self.max_gap_s, time.monotonic() - t - 0.01)

    def __enter__(self) -> LoopProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


#: A long system prompt (~440 tokens with SmolLM2's tokenizer) for the prefix-cache figure.
LONG_SYSTEM = " ".join(["You are the voice assistant of a hardware store. Answer in one or two short spoken "
                        "sentences, never lists, never markdown, and ask a question back when the request is "
                        "unclear. Prices are in euros and the store opens from eight to eight."] * 10)


async def one(engine: Any, max_tokens: int, prompt: str = PROMPT, system: str = "") -> Any:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    async with engine.stream_chat(messages, max_tokens=max_tokens, temperature=0) as stream:
        async for _ in stream:
            pass
    return stream.stats


async def main(args: argparse.Namespace) -> dict[str, object]:
    from services.cpu import machine_record

    runs = {}
    for name in args.engine.split(","):
        runs[name] = await bench_engine(name, args)
    return {"machine": machine_record(), "engines": runs}


async def bench_engine(name: str, args: argparse.Namespace) -> dict[str, object]:
    from services.cpu import describe_cpu, resolve_llm_dtype
    from services.llm import LLMConfig
    from services.llm_engines import create_llm_engine

    cfg = LLMConfig(model=args.model, max_model_len=args.max_model_len, dtype=args.dtype,
                    kv_cache_gib=args.kv_cache_gib, cpu_multiprocessing=args.multiprocessing,
                    enable_prefix_caching=not args.no_prefix_caching, engine=name,
                    cpu_threads=args.threads, max_parallel=args.max_parallel)
    t0 = time.monotonic()
    with LoopProbe() as start_probe:
        engine = await create_llm_engine(cfg)
    start_s = time.monotonic() - t0
    on_cpu = getattr(engine, "on_cpu", True)
    dtype = resolve_llm_dtype(args.dtype, on_cpu) if engine.name == "vllm" else cfg.ct2_compute_type
    print(f"=== {engine.name}: {engine.model}")
    print(f"CPU: {describe_cpu()}; dtype {args.dtype} -> {dtype}")
    print(f"engine start: {start_s:.1f} s (max loop stall {start_probe.max_gap_s * 1000:.0f} ms)")
    try:
        await one(engine, 8)  # warm-up
        singles = []
        with LoopProbe() as gen_probe:
            for _ in range(args.repeat):
                singles.append(await one(engine, args.max_tokens))
        ttft = statistics.mean(s.ttft_s or 0.0 for s in singles)
        tps = statistics.mean(s.tokens_per_s for s in singles)
        dtps = statistics.mean(s.decode_tokens_per_s for s in singles)
        print(f"single: TTFT {ttft * 1000:.0f} ms, {tps:.1f} tok/s end to end, "
              f"{dtps:.1f} tok/s decode (mean of {args.repeat}, "
              f"{statistics.mean(s.tokens for s in singles):.0f} tokens each)")
        prompts = [PROMPT, "Explain how rain forms, in detail.", "Describe a busy market.",
                   "Write a letter to a friend about a trip to the sea."]
        concurrent = []
        stall = gen_probe.max_gap_s
        for n in (int(c) for c in args.concurrency.split(",")):
            t1 = time.monotonic()
            with LoopProbe() as conc_probe:
                many = await asyncio.gather(*(one(engine, args.max_tokens, prompts[i % len(prompts)])
                                              for i in range(n)))
            wall = time.monotonic() - t1
            total = sum(s.tokens for s in many)
            ttfts = sorted(s.ttft_s or 0.0 for s in many)
            stall = max(stall, conc_probe.max_gap_s)
            concurrent.append({"n": n, "aggregate_tokens_per_s": round(total / wall, 1),
                               "ttft_ms_mean": round(1000 * statistics.mean(ttfts), 1),
                               "ttft_ms_max": round(1000 * ttfts[-1], 1), "tokens": total, "wall_s": round(wall, 2)})
            print(f"{n} concurrent: {total / wall:.1f} tok/s aggregate ({total} tokens in {wall:.1f} s), "
                  f"TTFT mean {1000 * statistics.mean(ttfts):.0f} ms, max {1000 * ttfts[-1]:.0f} ms; "
                  f"max loop stall {conc_probe.max_gap_s * 1000:.0f} ms")
        miss = await one(engine, 8, "Do you sell hammers?", LONG_SYSTEM)
        hit = await one(engine, 8, "When do you open on Sunday?", LONG_SYSTEM)
        print(f"long system prompt: TTFT {1000 * (miss.ttft_s or 0):.0f} ms the first time, "
              f"{1000 * (hit.ttft_s or 0):.0f} ms with another question (prefix cache "
              f"{'on' if cfg.enable_prefix_caching else 'off'})")
        return {
            "engine": engine.name,
            "model": engine.model,
            "long_system_prompt": {"ttft_first_ms": round(1000 * (miss.ttft_s or 0), 1),
                                   "ttft_again_ms": round(1000 * (hit.ttft_s or 0), 1),
                                   "prefix_caching": cfg.enable_prefix_caching},
            "device": "cpu" if on_cpu else "gpu",
            "cpu_multiprocessing": args.multiprocessing,
            "dtype": dtype,
            "engine_start_s": round(start_s, 2),
            "max_loop_stall_during_start_ms": round(start_probe.max_gap_s * 1000, 1),
            "single": {"ttft_ms": round(ttft * 1000, 1), "tokens_per_s": round(tps, 1),
                       "decode_tokens_per_s": round(dtps, 1), "runs": args.repeat,
                       "max_tokens": args.max_tokens},
            "concurrent": concurrent,
            "max_loop_stall_during_generation_ms": round(stall * 1000, 1),
            "cpu_count": os.cpu_count(),
        }
    finally:
        engine.shutdown()


if __name__ == "__main__":  # vLLM starts its engine process with spawn
    sys.path.insert(0, str(ROOT))
    for key, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        os.environ.setdefault(key, str(ROOT / ".cache" / sub))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="HF folder or hub id ('' = embedded SmolLM2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--dtype", default="auto", help="auto (from the CPU), bfloat16 or float32")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's prefix caching off")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated numbers of requests at once")
    p.add_argument("--engine", default="vllm,ctranslate2", help="comma-separated: vllm, ctranslate2, auto")
    p.add_argument("--threads", type=int, default=0, help="llm.cpu_threads (0 = the engine's default)")
    p.add_argument("--max-parallel", type=int, default=8, help="llm.max_parallel (CTranslate2)")
    p.add_argument("--multiprocessing", action="store_true",
                   help="CPU: model in a separate worker process (VLLM_ENABLE_V1_MULTIPROCESSING)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    ns = p.parse_args()
    result = asyncio.run(main(ns))
    if ns.out:
        ns.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {ns.out}")

"""Memory: per process, per added session, and over a long soak at steady load.

Starts the CPU profile locally, then
  1. samples the resident memory (RSS) of every voxserve process (each deployment's replicas,
     vLLM's engine process, Ray's own processes) at rest;
  2. opens ``--idle-sessions`` idle Converse streams and measures what each adds (gateway);
  3. runs ``--callers`` simulated callers (voxserve loadtest) for ``--minutes`` while sampling
     every ``--sample-s`` seconds, and reports each process's growth between the first and the
     last quarter of the soak (steady state: no growth beyond noise).

    .venv/bin/python scripts/bench_soak.py --minutes 30 --callers 4 --out out/bench/soak

Writes soak.json (every sample) and soak.png (RSS per process over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_common import local_app, local_env

local_env()

MiB = 1024 * 1024


def process_name(cmdline: list[str]) -> str | None:
    """A stable label for a voxserve-related process, or None for unrelated ones."""
    text = " ".join(cmdline)
    if "ServeReplica:voxserve:" in text:
        return "replica:" + text.split("ServeReplica:voxserve:")[1].split()[0].split(".")[0]
    if "EngineCore" in text or "VLLM::EngineCore" in text:
        return "vllm-engine"
    for ray_proc in ("ServeController", "ProxyActor", "raylet", "gcs_server", "dashboard_agent", "log_monitor"):
        if ray_proc in text:
            return "ray:" + ray_proc
    return None


def sample_rss() -> dict[str, float]:
    """RSS in MiB per labelled process (summed when a label has several processes)."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            name = process_name(p.info["cmdline"] or [])
            if name is None or p.info["memory_info"] is None:
                continue
            out[name] = out.get(name, 0.0) + p.info["memory_info"].rss / MiB
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


async def idle_sessions(address: str, n: int, hold_s: float) -> list[Any]:
    """``n`` Converse streams that send a config and then silence (a caller who says nothing)."""
    import grpc
    import numpy as np

    from clients.audio import float_to_pcm16
    from protos.voxserve.v1 import voice_pb2 as pb
    from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc

    silence = float_to_pcm16(np.zeros(320, np.float32))

    async def one() -> None:
        async def requests() -> Any:
            yield pb.ClientMessage(config=pb.SessionConfig(input_sample_rate=16000))
            end = time.monotonic() + hold_s
            while time.monotonic() < end:
                await asyncio.sleep(0.02)
                yield pb.ClientMessage(audio=pb.AudioInput(data=silence))
            yield pb.ClientMessage(end_of_input=pb.EndOfInput())

        async with grpc.aio.insecure_channel(address) as channel:
            async for _ in pb_grpc.VoiceAssistantStub(channel).Converse(requests()):
                pass

    return [asyncio.create_task(one()) for _ in range(n)]


async def run(args: argparse.Namespace, address: str) -> dict[str, Any]:
    from clients.loadtest import run_loadtest
    from clients.loadtest_config import LoadTestConfig
    from clients.loadtest_report import summary_dict
    from services.cpu import machine_record

    result: dict[str, Any] = {"machine": machine_record(), "args": vars(args)}
    await asyncio.sleep(5)
    rest = sample_rss()
    result["at_rest_mib"] = rest
    print("at rest (MiB):", {k: round(v) for k, v in sorted(rest.items())}, flush=True)

    # A few sessions first (one-time allocations of a first session land there), then more: the
    # difference over the added sessions is what one more session costs.
    base_n, more_n = 2, args.idle_sessions
    tasks = await idle_sessions(address, base_n, hold_s=40)
    await asyncio.sleep(8)
    at_base = sample_rss()
    tasks += await idle_sessions(address, more_n, hold_s=25)
    await asyncio.sleep(8)
    at_more = sample_rss()
    per_session = {name: (at_more.get(name, 0) - at_base.get(name, 0)) / more_n for name in at_more}
    result["mib_per_added_idle_session"] = per_session
    print(f"per added idle session (MiB, {base_n} -> {base_n + more_n} sessions):",
          {k: round(v, 2) for k, v in sorted(per_session.items()) if abs(v) >= 0.05}, flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)

    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()

    async def sampler() -> None:
        while True:
            samples.append({"t_s": time.monotonic() - t0, "rss_mib": sample_rss()})
            await asyncio.sleep(args.sample_s)

    sampling = asyncio.create_task(sampler())
    cfg = LoadTestConfig(address=address, callers=args.callers, hold_s=args.minutes * 60, turns_per_call=3,
                         max_duration_s=min(3600.0, args.minutes * 60 + 120), progress=False, replicas="off")
    report = await run_loadtest(cfg)
    sampling.cancel()
    result["load"] = summary_dict(report)
    result["samples"] = samples
    quarter = max(1, len(samples) // 4)
    growth: dict[str, dict[str, float]] = {}
    for name in sorted({k for s in samples for k in s["rss_mib"]}):
        first = [s["rss_mib"][name] for s in samples[:quarter] if name in s["rss_mib"]]
        last = [s["rss_mib"][name] for s in samples[-quarter:] if name in s["rss_mib"]]
        if first and last:
            a, b = sum(first) / len(first), sum(last) / len(last)
            growth[name] = {"first_quarter_mib": round(a, 1), "last_quarter_mib": round(b, 1),
                            "growth_mib": round(b - a, 1), "growth_pct": round(100 * (b - a) / a, 2)}
    result["growth"] = growth
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    names = sorted({k for s in result["samples"] for k in s["rss_mib"]})
    for name in names:
        pts = [(s["t_s"] / 60, s["rss_mib"][name]) for s in result["samples"] if name in s["rss_mib"]]
        ax.plot(*zip(*pts, strict=True), label=name)
    ax.set_xlabel("minutes of steady load")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"voxserve soak: {result['args']['callers']} callers, {result['args']['minutes']} min")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30, help="length of the soak at steady load")
    p.add_argument("--callers", type=int, default=4, help="concurrent simulated callers during the soak")
    p.add_argument("--idle-sessions", type=int, default=8, help="idle sessions opened to measure their memory")
    p.add_argument("--sample-s", type=float, default=30, help="seconds between memory samples")
    p.add_argument("--out", default="out/bench/soak", help="output folder")
    args = p.parse_args()

    with local_app() as server:
        result = asyncio.run(run(args, server.grpc_address))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "soak.png")
    print("growth first -> last quarter (MiB):")
    for name, g in result["growth"].items():
        print(f"  {name:28} {g['first_quarter_mib']:8.0f} -> {g['last_quarter_mib']:8.0f}  ({g['growth_pct']:+.1f}%)")
    v2v = result["load"]["metrics"]["voice_to_voice_ms"]
    print(f"load: {result['load']['turns']} turns, errors {result['load']['errors']}, "
          f"v2v p50 {v2v['p50'] or 0:.0f} ms p95 {v2v['p95'] or 0:.0f} ms")
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")


if __name__ == "__main__":
    main()

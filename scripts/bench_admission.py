"""Admission under a burst: N streams opened at once against one gateway replica.

Starts the CPU profile, keeps ``--callers`` real callers talking (voxserve loadtest), and after
``--warm-s`` opens ``--burst`` Converse streams at the same moment (each sends its config, then a
live microphone's silence). Reports how many were admitted and refused, how fast a refusal came
(it must be RESOURCE_EXHAUSTED within milliseconds, with our message and a retry hint, never
Ray's own "backpressure" text), and the running callers' voice-to-voice before and during the
burst (sessions already running keep their latency).

    .venv/bin/python scripts/bench_admission.py --burst 80 --callers 2 --out out/bench/admission.json
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


async def one_stream(address: str, hold_s: float) -> dict[str, Any]:
    import grpc
    import numpy as np

    from clients.audio import float_to_pcm16
    from protos.voxserve.v1 import voice_pb2 as pb
    from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc

    silence = float_to_pcm16(np.zeros(320, np.float32))
    started = asyncio.Event()  # audio only after SessionStarted, as clients should (README)

    async def requests() -> Any:
        yield pb.ClientMessage(config=pb.SessionConfig(input_sample_rate=16000))
        await started.wait()
        if call.done():
            return
        end = time.monotonic() + hold_s
        while time.monotonic() < end:
            await asyncio.sleep(0.02)
            yield pb.ClientMessage(audio=pb.AudioInput(data=silence))
        yield pb.ClientMessage(end_of_input=pb.EndOfInput())

    t0 = time.monotonic()
    out: dict[str, Any] = {"admitted": False}
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.VoiceAssistantStub(channel).Converse(requests())
        try:
            async for event in call:
                if event.WhichOneof("event") == "session_started":
                    out.update(admitted=True, admit_ms=1000 * (time.monotonic() - t0))
                    started.set()
            out["status"] = "OK"
        except grpc.aio.AioRpcError as exc:
            out.update(status=exc.code().name, details=exc.details() or "", status_ms=1000 * (time.monotonic() - t0))
            trailers = await call.trailing_metadata() or ()
            out["retry_after_ms"] = next((v for k, v in trailers if k == "retry-after-ms"), None)
        finally:
            started.set()  # the request generator never waits on a call that is over
    return out


async def run(args: argparse.Namespace, address: str) -> dict[str, Any]:
    from clients.loadtest import run_loadtest
    from clients.loadtest_config import LoadTestConfig
    from clients.stats import percentile
    from services.cpu import machine_record

    cfg = LoadTestConfig(address=address, callers=args.callers, hold_s=args.warm_s + args.after_s, turns_per_call=2,
                         progress=False, replicas="off", max_duration_s=args.warm_s + args.after_s + 120)
    load = asyncio.create_task(run_loadtest(cfg))
    await asyncio.sleep(args.warm_s)
    t_burst = time.monotonic()
    burst = asyncio.gather(*(one_stream(address, hold_s=args.after_s / 2) for _ in range(args.burst)))
    await asyncio.sleep(3)
    # one at a time while the replica is still full: the refusal time without 80 clients connecting at once
    probes = [await one_stream(address, hold_s=1) for _ in range(args.probes)]
    bursts = await burst
    report = await load
    t_burst_rel = t_burst - (time.monotonic() - report.duration_s)
    before = [t.voice_to_voice_ms for t in report.turns if t.voice_to_voice_ms and t.t_s < t_burst_rel]
    during = [t.voice_to_voice_ms for t in report.turns if t.voice_to_voice_ms and t.t_s >= t_burst_rel]
    refused = [b for b in bursts if b["status"] == "RESOURCE_EXHAUSTED"]
    probe_ms = [p["status_ms"] for p in probes if p["status"] == "RESOURCE_EXHAUSTED"]
    other = [b for b in bursts if not b["admitted"] and b["status"] != "RESOURCE_EXHAUSTED"]
    ray_text = [b["details"] for b in refused if "backpressure" in b.get("details", "").lower()]
    return {
        "machine": machine_record(), "args": vars(args),
        "burst": {"streams": args.burst, "admitted": sum(b["admitted"] for b in bursts), "refused": len(refused),
                  "other_failures": other[:5],
                  "refusal_ms_p50": percentile([b["status_ms"] for b in refused], 50),
                  "refusal_ms_max": max((b["status_ms"] for b in refused), default=None),
                  "refusals_with_retry_hint": sum(1 for b in refused if b.get("retry_after_ms")),
                  "refusals_with_ray_text": len(ray_text), "ray_text_example": ray_text[0] if ray_text else "",
                  "example": refused[0]["details"] if refused else ""},
        "probes_while_full": {"n": len(probes), "refused": len(probe_ms),
                              "refusal_ms_p50": percentile(probe_ms, 50),
                              "refusal_ms_max": max(probe_ms, default=None)},
        "running_callers": {"turns_before": len(before), "v2v_p50_before": percentile(before, 50),
                            "turns_during": len(during), "v2v_p50_during": percentile(during, 50),
                            "v2v_p95_during": percentile(during, 95), "errors": report.errors()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--burst", type=int, default=80, help="streams opened at the same moment")
    p.add_argument("--probes", type=int, default=10, help="single streams opened one by one while full")
    p.add_argument("--callers", type=int, default=2, help="callers talking throughout")
    p.add_argument("--warm-s", type=float, default=40, help="seconds of normal load before the burst")
    p.add_argument("--after-s", type=float, default=40, help="seconds of load after the burst")
    p.add_argument("--out", default="out/bench/admission.json", help="results JSON")
    args = p.parse_args()

    with local_app() as server:
        result = asyncio.run(run(args, server.grpc_address))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("burst", "probes_while_full", "running_callers")}, indent=1))


if __name__ == "__main__":
    main()

"""Calls that survive their replica: kill -9 the Gateway replica under load, and redeploy it.

The CPU profile runs in this process (``local_app``); ``voxserve loadtest``'s engine drives N
callers that resume with their tokens (``clients.resume``). Three runs:

- ``kill1``: one Gateway replica; SIGKILL its process every ``--every`` seconds (Serve restarts it,
  the callers resume on the new one);
- ``kill2``: two Gateway replicas; SIGKILL one of them each time (the callers resume on the other);
- ``redeploy``: a rolling redeploy of the Gateway (a changed config) in the middle of the run;
- ``tts2``: two TTS replicas; kill one (``ray.kill``, as a crash) every ``--every`` seconds: the
  answers in flight retry their chunk on the other (largest stall inside an answer, errors);
- ``journal`` / ``nojournal``: the same load without chaos, with the embedded journal and with
  ``sessions.journal: off``: what journaling costs the answers (voice-to-voice), if anything.

For each: time from the break to the resumed SessionStarted (p50/p95, client clock), calls
resumed and lost, turns lost, turns answered twice, voice-to-voice of the answered turns, and the
journal's write times (Gateway ``stats()``). Writes ``resume.json`` and ``lscpu.txt``.

    .venv/bin/python scripts/bench_resume.py [--callers 4] [--kills 10] [--every 60] [--out docs/bench/issue18]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_common import ROOT, local_app, local_env, pct, versions

GATEWAY_TITLE = "ServeReplica:voxserve:Gateway"


def gateway_pids() -> list[int]:
    """Processes of the Gateway replicas (Ray titles each replica's worker process)."""
    out = subprocess.run(["pgrep", "-f", GATEWAY_TITLE], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split() if int(p) != os.getpid())


async def killer(kills: int, every_s: float, log: list[dict[str, Any]], t0: float) -> None:
    for i in range(kills):
        await asyncio.sleep(every_s)
        pids = await asyncio.to_thread(gateway_pids)
        if not pids:
            log.append({"t_s": time.monotonic() - t0, "killed": None, "note": "no Gateway process"})
            continue
        pid = pids[i % len(pids)]
        os.kill(pid, signal.SIGKILL)
        log.append({"t_s": round(time.monotonic() - t0, 1), "killed": pid, "alive_before": len(pids)})
        print(f"[kill {i + 1}/{kills}] SIGKILL Gateway pid {pid} ({len(pids)} running)", file=sys.stderr, flush=True)


async def tts_killer(kills: int, every_s: float, log: list[dict[str, Any]], t0: float) -> None:
    import ray

    for i in range(kills):
        await asyncio.sleep(every_s)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and "#TTS#" in a["name"]]
        if not names:
            continue
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        log.append({"t_s": round(time.monotonic() - t0, 1), "killed": names[0], "alive_before": len(names)})
        print(f"[tts kill {i + 1}/{kills}] {names[0]} ({len(names)} running)", file=sys.stderr, flush=True)


async def redeployer(server: Any, after_s: float, log: list[dict[str, Any]], t0: float) -> None:
    from ray import serve

    from deployments.app import build_app
    from deployments.profiles import load_serve_config

    await asyncio.sleep(after_s)
    app = load_serve_config("cpu")["applications"][0]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    options["Gateway"]["ray_actor_options"] = {**options["Gateway"]["ray_actor_options"], "num_cpus": 0.3}
    log.append({"t_s": round(time.monotonic() - t0, 1), "redeploy": "Gateway num_cpus 0.25 -> 0.3"})
    print("[redeploy] Gateway with a changed config", file=sys.stderr, flush=True)
    await asyncio.to_thread(serve.run, build_app(app["args"], options), name=server.app_name, route_prefix="/",
                            blocking=False)


async def journal_stats() -> dict[str, Any]:
    from ray import serve

    stats = await serve.get_deployment_handle("Gateway", "voxserve").stats.remote()
    return dict(stats.get("journal", {}))


async def run(name: str, server: Any, callers: int, hold_s: float, chaos: Any) -> dict[str, Any]:
    from clients.loadtest import run_loadtest
    from clients.loadtest_config import LoadTestConfig
    from clients.loadtest_report import summary_dict

    cfg = LoadTestConfig(address=server.grpc_address, callers=callers, ramp_up_s=5, hold_s=hold_s, turns_per_call=4,
                         pause_s=1.0, max_duration_s=hold_s + 240, turn_timeout_s=60, replicas="off",
                         progress=True)
    events: list[dict[str, Any]] = []
    t0 = time.monotonic()
    chaos_task = asyncio.create_task(chaos(events, t0))
    try:
        report = await run_loadtest(cfg)
    finally:
        chaos_task.cancel()
    s = summary_dict(report)
    v2v = [t.voice_to_voice_ms for t in report.turns if t.voice_to_voice_ms is not None]
    resume_ms = [ms for c in report.calls for ms in c.resume_ms]
    out = {
        "run": name, "callers": callers, "hold_s": hold_s, "events": events,
        "calls": s["calls"], "calls_resumed": s["calls_resumed"], "resumes": s["resumes"],
        "calls_lost": s["calls_lost"], "turns": s["turns"], "turns_lost": s["turns_lost"],
        "turns_answered_twice": s["turns_answered_twice"],
        "time_to_resume_ms": {"n": len(resume_ms), "p50": pct(resume_ms, 50), "p95": pct(resume_ms, 95),
                              "max": round(max(resume_ms), 1) if resume_ms else None},
        "v2v_ms": {"n": len(v2v), "p50": pct(v2v, 50), "p95": pct(v2v, 95)},
        "statuses": sorted({c.status for c in report.calls}),
        "turn_errors": s["errors"],
        "turn_error_samples": sorted({f"{t.error_code}: {t.error}"[:160] for t in report.turns if t.error_code})[:10],
        "underrun_ms": {"turns_with_underrun": s["underrun_turns"],
                        "p95": pct([t.underrun_ms for t in report.turns if t.answered], 95),
                        "max": max((t.underrun_ms for t in report.turns if t.answered), default=0.0)},
        "journal": await journal_stats(),
    }
    print(json.dumps(out, indent=1), file=sys.stderr, flush=True)
    return out


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def lscpu() -> str:
    return subprocess.run(["lscpu"], capture_output=True, text=True).stdout


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", type=int, default=4)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--every", type=float, default=60.0, help="seconds between kills")
    p.add_argument("--runs", default="kill1,kill2,redeploy")
    p.add_argument("--quiet-hold", type=float, default=120.0, help="hold of the journal/nojournal runs")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "issue18"))
    args = p.parse_args()
    local_env()
    out_dir = Path(args.out)
    cpu = lscpu()
    write(out_dir / "lscpu.txt", cpu)
    results: list[dict[str, Any]] = []
    hold = args.kills * args.every + 20
    for name in args.runs.split(","):
        gateways = 2 if name == "kill2" else 1
        overrides: dict[str, Any] = {"deployments": {"Gateway": {"autoscaling_config": {
            "min_replicas": gateways, "max_replicas": gateways}}}}
        if name == "tts2":
            overrides["deployments"]["TTS"] = {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}
        if name == "nojournal":
            overrides["args"] = {"sessions": {"journal": "off"}}
        with local_app(overrides) as server:
            if name.startswith("kill"):
                def chaos(log: list[dict[str, Any]], t0: float) -> Any:
                    return killer(args.kills, args.every, log, t0)
                results.append(await run(name, server, args.callers, hold, chaos))
            elif name == "tts2":
                def chaos(log: list[dict[str, Any]], t0: float) -> Any:
                    return tts_killer(max(1, args.kills // 2), args.every, log, t0)
                results.append(await run(name, server, args.callers, max(1, args.kills // 2) * args.every + 20,
                                         chaos))
            elif name == "redeploy":
                def chaos(log: list[dict[str, Any]], t0: float, srv: Any = server) -> Any:
                    return redeployer(srv, 40.0, log, t0)
                results.append(await run(name, server, args.callers, 100.0, chaos))
            else:
                def chaos(log: list[dict[str, Any]], t0: float) -> Any:
                    return asyncio.sleep(0)
                results.append(await run(name, server, args.callers, args.quiet_hold, chaos))
    doc = {"results": results, "versions": versions("ray", "vllm", "ctranslate2", "piper-tts"),
           "cpu": cpu.splitlines()[:20]}
    name = "resume.json" if "kill1" in args.runs else f"resume-{args.runs.replace(',', '-')}.json"
    write(out_dir / name, json.dumps(doc, indent=1))
    print(f"wrote {out_dir / name}")


if __name__ == "__main__":
    asyncio.run(main())

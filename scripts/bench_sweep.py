"""Concurrency sweep and autoscaling run of the CPU profile, with the load tester.

  sweep      for each caller count (--levels), a load test holding that many callers; the
             answer is the largest count whose p95 voice-to-voice stays under --target-ms.
             Stops after the first level over the target (--keep-going runs them all).
  autoscale  callers ramp 1 -> N, hold, ramp down, then an idle cool-down: replicas of the
             bottleneck stage scale up under load and back down after it (Serve's replica counts
             are polled every second and drawn under the latency plot). The profile's autoscaling
             delays are shortened (--upscale-delay, --downscale-delay) so a run fits in minutes.

Each mode starts its own local app (start_local, the CPU profile) in this process and writes
JSON, PNG and a markdown fragment for BENCHMARKS.md into --out:

    .venv/bin/python scripts/bench_sweep.py sweep --levels 1,2,3,4,6,8 --hold 60 --out out/bench
    .venv/bin/python scripts/bench_sweep.py autoscale --callers 8 --ramp-up 60 --hold 120 \\
        --ramp-down 60 --cooldown 90 --out out/bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from deployments.server import set_local_env  # noqa: E402

set_local_env(ROOT / ".cache")

from clients.loadtest import (  # noqa: E402
    LoadTestConfig,
    LoadTestReport,
    run_loadtest,
    summarize,
    summary_dict,
    write_outputs,
)
from clients.speech_cache import load_questions  # noqa: E402


def start(overrides: dict[str, Any] | None = None) -> Any:
    from deployments.profiles import load_serve_config
    from deployments.server import free_port, start_local

    t0 = time.perf_counter()
    server = start_local(load_serve_config("cpu", overrides), grpc_port=free_port())
    print(f"app ready in {time.perf_counter() - t0:.0f} s at {server.grpc_address}", file=sys.stderr, flush=True)
    return server


def _machine() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_pipeline import machine_info

    return machine_info()


def sweep(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    levels = [int(x) for x in a.levels.split(",")]
    questions = load_questions()
    server = start()
    rows: list[dict[str, Any]] = []
    try:
        for n in levels:
            # a short spread keeps callers from speaking in lockstep; the hold is what is measured
            ramp = min(10.0, 2.0 * (n - 1))
            cfg = LoadTestConfig(address=server.grpc_address, callers=n, ramp_up_s=ramp, hold_s=a.hold,
                                 turns_per_call=a.turns, pause_s=a.pause, max_duration_s=a.hold + ramp + 300,
                                 seed=n, progress=not a.quiet)
            print(f"--- {n} callers", file=sys.stderr, flush=True)
            report = asyncio.run(run_loadtest(cfg, questions=questions))
            write_outputs(report, out / f"sweep-{n}", plot_png=True)
            s = summary_dict(report)
            v2v = s["metrics"]["voice_to_voice_ms"]
            row = {"callers": n, "turns": s["turns"], "answered": s["answered"], "errors": s["errors"],
                   "p50": v2v["p50"], "p95": v2v["p95"], "p99": v2v["p99"],
                   "first_text_p50": s["metrics"]["first_text_ms"]["p50"],
                   "underrun_turns": s["underrun_turns"], "max_replicas": s["max_replicas"],
                   "ok": s["ok"], "under_target": s["ok"] and v2v["p95"] is not None and v2v["p95"] < a.target_ms}
            rows.append(row)
            print(summarize(report), file=sys.stderr, flush=True)
            if not row["under_target"] and not a.keep_going:
                break
    finally:
        server.stop()
    best = max((r["callers"] for r in rows if r["under_target"]), default=0)
    return {"levels": rows, "target_ms": a.target_ms, "max_callers_under_target": best}


def sweep_markdown(res: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    lines = [f"Largest number of callers with p95 voice-to-voice under {res['target_ms']:.0f} ms: "
             f"**{res['max_callers_under_target']}**", "",
             "| callers | turns | answered | errors | v2v p50 (ms) | p95 | p99 | first text p50 | "
             "turns with underruns | max replicas |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["levels"]:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        reps = " ".join(f"{k}={v}" for k, v in sorted(r["max_replicas"].items()))
        lines.append(f"| {r['callers']} | {r['turns']} | {r['answered']} | {errors} | {f(r['p50'])} | "
                     f"{f(r['p95'])} | {f(r['p99'])} | {f(r['first_text_p50'])} | {r['underrun_turns']} | {reps} |")
    return "\n".join(lines)


def sweep_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["levels"] if r["p50"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("p50", "p95", "p99"):
        ax.plot([r["callers"] for r in rows], [r[key] for r in rows], marker="o", label=key)
    ax.axhline(res["target_ms"], color="gray", ls="--", lw=1, label=f"{res['target_ms']:.0f} ms")
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("voice-to-voice (ms)")
    ax.set_title("voxserve CPU profile: latency vs concurrent callers")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def autoscale(a: argparse.Namespace, out: Path) -> tuple[LoadTestReport, dict[str, Any]]:
    delays = {"upscale_delay_s": a.upscale_delay, "downscale_delay_s": a.downscale_delay}
    deployments = {name: {"autoscaling_config": dict(delays)} for name in ("ASR", "LLM", "TTS", "Gateway")}
    server = start({"deployments": deployments})
    try:
        cfg = LoadTestConfig(address=server.grpc_address, callers=a.callers, ramp_up_s=a.ramp_up, hold_s=a.hold,
                             ramp_down_s=a.ramp_down, turns_per_call=a.turns, pause_s=a.pause,
                             barge_in_rate=a.barge_in_rate, cooldown_s=a.cooldown,
                             max_duration_s=a.ramp_up + a.hold + a.ramp_down + 300, progress=not a.quiet)
        report = asyncio.run(run_loadtest(cfg))
    finally:
        server.stop()
    paths = write_outputs(report, out / "autoscale")
    return report, {"paths": {k: str(v) for k, v in paths.items()}, "autoscaling_overrides": delays}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sweep", "autoscale", "both"])
    p.add_argument("--out", default="out/bench", help="output folder (default: out/bench)")
    p.add_argument("--turns", type=int, default=2, help="questions per call (default: 2)")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between turns and calls (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    g = p.add_argument_group("sweep")
    g.add_argument("--levels", default="1,2,3,4,6,8", help="caller counts to try (default: 1,2,3,4,6,8)")
    g.add_argument("--hold", type=float, default=60.0,
                   help="seconds at each sweep level, and at the autoscaling peak (default: 60)")
    g.add_argument("--target-ms", type=float, default=1500.0, help="p95 voice-to-voice target (default: 1500)")
    g.add_argument("--keep-going", action="store_true", help="run every level even after one misses the target")
    s = p.add_argument_group("autoscale")
    s.add_argument("--callers", type=int, default=8, help="peak callers (default: 8)")
    s.add_argument("--ramp-up", type=float, default=60.0, help="seconds from 1 to N callers (default: 60)")
    s.add_argument("--ramp-down", type=float, default=60.0, help="seconds from N to 0 callers (default: 60)")
    s.add_argument("--cooldown", type=float, default=90.0, help="idle seconds recorded after the load (default: 90)")
    s.add_argument("--barge-in-rate", type=float, default=0.0, help="share of interrupting turns (default: 0)")
    s.add_argument("--upscale-delay", type=float, default=5.0, help="Serve upscale_delay_s (default: 5)")
    s.add_argument("--downscale-delay", type=float, default=30.0, help="Serve downscale_delay_s (default: 30)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": _machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    md: list[str] = []
    t0 = time.perf_counter()
    if a.mode in ("sweep", "both"):
        res = sweep(a, out)
        result["sweep"] = res
        sweep_plot(res, out / "sweep.png")
        md += ["### Concurrency sweep (CPU profile)", "", sweep_markdown(res), "", "![sweep](sweep.png)", ""]
    if a.mode in ("autoscale", "both"):
        report, info = autoscale(a, out)
        result["autoscale"] = {"summary": summary_dict(report), **info}
        md += ["### Autoscaling run", "",
               f"{a.callers} callers: ramp-up {a.ramp_up:.0f} s, hold {a.hold:.0f} s, ramp-down {a.ramp_down:.0f} s, "
               f"cool-down {a.cooldown:.0f} s; Serve delays: {info['autoscaling_overrides']}.", "",
               summarize(report, markdown=True), "", "![autoscale](autoscale/loadtest.png)", ""]
    result["wall_s"] = time.perf_counter() - t0
    (out / "sweep_results.json").write_text(json.dumps(result, indent=1))
    (out / "bench_sweep.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out}/sweep_results.json and {out}/bench_sweep.md ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Concurrency sweep and autoscaling run of the CPU profile, with the load tester.

  sweep      for each caller count (--levels), a load test holding that many callers; the
             answer is the largest count whose p95 voice-to-voice stays under --target-ms.
             Stops after the first level over the target (--keep-going runs them all). Several
             --variants (unbatched, batched, batched+direct) run one after another, each on its
             own fresh app, for a side-by-side table.
  autoscale  callers ramp 1 -> N, hold, ramp down, then an idle cool-down: replicas of the
             bottleneck stage scale up under load and back down after it (Serve's replica counts
             are polled every second and drawn under the latency plot). The profile's autoscaling
             delays are shortened (--upscale-delay, --downscale-delay) so a run fits in minutes.

Each mode starts its own local app (start_local, the CPU profile) in this process and writes
JSON, PNG and a markdown fragment for BENCHMARKS.md into --out:

    .venv/bin/python scripts/bench_sweep.py sweep --levels 1,2,4,6,8 --hold 60 --keep-going \\
        --variants unbatched,batched,batched+direct --out out/bench
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_common import local_app, local_env

local_env()

from clients.loadtest import run_loadtest  # noqa: E402
from clients.loadtest_config import LoadTestConfig, parse_schedule  # noqa: E402
from clients.loadtest_report import LoadTestReport, summarize, summary_dict, write_outputs  # noqa: E402
from clients.speech_cache import load_questions  # noqa: E402
from services.cpu import machine_record  # noqa: E402

#: Sweep variants: app overrides and whether Serve's direct ingress is on.
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    # nothing batched across sessions: VAD scored per chunk inline, one ASR decode at a time
    "unbatched": ({"args": {"vad": {"batch_tick_ms": 0}, "asr": {"max_batch": 1}}}, False),
    "batched": ({}, False),  # the CPU profile as shipped
    # the same, with the gateway replica serving gRPC itself instead of through Serve's proxy actor
    "batched+direct": ({}, True),
}


def sweep_variant(a: argparse.Namespace, out: Path, name: str) -> dict[str, Any]:
    levels = [int(x) for x in a.levels.split(",")]
    questions = load_questions()
    overrides, direct = VARIANTS[name]
    rows: list[dict[str, Any]] = []
    with local_app(overrides, direct_ingress=direct) as server:
        address = server.direct_grpc_address or server.grpc_address
        for n in levels:
            # a short spread keeps callers from speaking in lockstep; the hold is what is measured
            ramp = min(10.0, 2.0 * (n - 1))
            cfg = LoadTestConfig(address=address, callers=n, ramp_up_s=ramp, hold_s=a.hold,
                                 turns_per_call=a.turns, pause_s=a.pause, max_duration_s=a.hold + ramp + 300,
                                 seed=n, progress=not a.quiet)
            print(f"--- {name}: {n} callers", file=sys.stderr, flush=True)
            report = asyncio.run(run_loadtest(cfg, questions=questions))
            write_outputs(report, out / f"sweep-{name}-{n}", plot_png=True)
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
    best = max((r["callers"] for r in rows if r["under_target"]), default=0)
    return {"levels": rows, "target_ms": a.target_ms, "max_callers_under_target": best}


def sweep(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {name: sweep_variant(a, out, name) for name in a.variants.split(",")}


def sweep_markdown(res: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    names = list(res)
    target = next(iter(res.values()))["target_ms"]
    lines = [f"Largest number of callers with p95 voice-to-voice under {target:.0f} ms: "
             + ", ".join(f"{n} **{r['max_callers_under_target']}**" for n, r in res.items()), "",
             "| callers | " + " | ".join(f"{n} p50 / p95 (ms)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    levels = sorted({row["callers"] for r in res.values() for row in r["levels"]})
    for n in levels:
        cells = []
        for name in names:
            row = next((x for x in res[name]["levels"] if x["callers"] == n), None)
            if row is None:
                cells.append("-")
                continue
            errors = sum(row["errors"].values())
            cells.append(f"{f(row['p50'])} / {f(row['p95'])}" + (f" ({errors} errors)" if errors else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(res.items()):
        rows = [x for x in r["levels"] if x["p50"] is not None]
        xs = [x["callers"] for x in rows]
        ax.plot(xs, [x["p95"] for x in rows], marker="o", color=f"C{i}", label=f"{name} p95")
        ax.plot(xs, [x["p50"] for x in rows], marker=".", ls=":", color=f"C{i}", label=f"{name} p50")
    target = next(iter(res.values()))["target_ms"]
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"{target:.0f} ms")
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("voice-to-voice (ms)")
    ax.set_title("voxserve CPU profile: latency vs concurrent callers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def autoscale(a: argparse.Namespace, out: Path) -> tuple[LoadTestReport, dict[str, Any]]:
    """The CPU profile as ``voxserve serve`` runs it (its own autoscaling delays and policy unless
    --upscale-delay/--downscale-delay override them), under a ramp or a --schedule."""
    delays = {k: v for k, v in (("upscale_delay_s", a.upscale_delay), ("downscale_delay_s", a.downscale_delay))
              if v is not None}
    deployments = ({name: {"autoscaling_config": dict(delays)} for name in ("ASR", "LLM", "TTS", "Gateway")}
                   if delays else {})
    with local_app({"deployments": deployments} if deployments else None) as server:
        if a.schedule:
            steps = parse_schedule(a.schedule)
            shape: dict[str, Any] = {"schedule": steps, "max_duration_s": steps[-1][0] + 300}
        else:
            shape = {"callers": a.callers, "ramp_up_s": a.ramp_up, "hold_s": a.hold, "ramp_down_s": a.ramp_down,
                     "max_duration_s": a.ramp_up + a.hold + a.ramp_down + 300}
        cfg = LoadTestConfig(address=server.grpc_address, turns_per_call=a.turns, pause_s=a.pause,
                             barge_in_rate=a.barge_in_rate, cooldown_s=a.cooldown, progress=not a.quiet, **shape)
        report = asyncio.run(run_loadtest(cfg))
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
    g.add_argument("--variants", default="batched", help=f"comma list of {', '.join(VARIANTS)} (default: batched)")
    s = p.add_argument_group("autoscale")
    s.add_argument("--callers", type=int, default=8, help="peak callers (default: 8)")
    s.add_argument("--ramp-up", type=float, default=60.0, help="seconds from 1 to N callers (default: 60)")
    s.add_argument("--ramp-down", type=float, default=60.0, help="seconds from N to 0 callers (default: 60)")
    s.add_argument("--cooldown", type=float, default=90.0, help="idle seconds recorded after the load (default: 90)")
    s.add_argument("--barge-in-rate", type=float, default=0.0, help="share of interrupting turns (default: 0)")
    s.add_argument("--schedule", default="", help="loadtest step schedule T:N,... (replaces the ramp options)")
    s.add_argument("--upscale-delay", type=float, default=None,
                   help="override Serve upscale_delay_s of ASR, LLM, TTS and Gateway (default: the profile's)")
    s.add_argument("--downscale-delay", type=float, default=None,
                   help="override Serve downscale_delay_s of ASR, LLM, TTS and Gateway (default: the profile's)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_record(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
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
        shape = (f"schedule {a.schedule}" if a.schedule else
                 f"{a.callers} callers: ramp-up {a.ramp_up:.0f} s, hold {a.hold:.0f} s, ramp-down {a.ramp_down:.0f} s")
        md += ["### Autoscaling run", "",
               f"{shape}, cool-down {a.cooldown:.0f} s; Serve delay overrides: "
               f"{info['autoscaling_overrides'] or 'none (the profile)'}.", "",
               summarize(report, markdown=True), "", "![autoscale](autoscale/loadtest.png)", ""]
    result["wall_s"] = time.perf_counter() - t0
    (out / "sweep_results.json").write_text(json.dumps(result, indent=1))
    (out / "bench_sweep.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out}/sweep_results.json and {out}/bench_sweep.md ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

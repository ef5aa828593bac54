"""Playback underruns and voice-to-voice latency at 1 and 6 callers, one configuration or several.

Answers that stall mid-sentence (audio arriving slower than it plays) are what this measures,
beside the first word's latency, which the fixes must not move up. For each configuration the
CPU profile starts locally (``voxserve serve``'s default), then

  1. one caller for ``--hold1`` seconds (issue 20: ``voxserve loadtest --callers 1 --hold 120``);
  2. six callers ramped up over ``--ramp6`` and held ``--hold6`` seconds (``--callers 6
     --ramp-up 20 --hold 90``),

and it prints, per load: turns, turns with an underrun (client-side, as the load tester's
simulated player hears them), the p50/p95/max of underrun time within stalled turns, and
voice-to-voice p50/p95. ``--compare`` runs the schedulers the TTS stage offers side by side in
one invocation (``fifo``: the order before deadline scheduling, fixed chunk sizes; ``deadline``:
earliest deadline first with chunk sizes that follow the buffer), for a before/after table from
one run on one machine. ``--config unpaced --config paced`` compares the CPU LLM without and with
pacing (an answer seconds ahead of its playback waits for one behind).

    .venv/bin/python scripts/bench_playout.py --compare --out docs/bench/issue20
    .venv/bin/python scripts/bench_playout.py --config unpaced --config paced --out docs/bench/issue20/pacing

Writes playout.json (machine record, every configuration's summary) into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_common import local_app, local_env, pct

local_env()

#: What --compare runs: name -> app overrides (merged into the CPU profile's app args).
CONFIGS: dict[str, dict[str, Any]] = {
    # the scheduling before issue 20: arrival order, the fixed chunk schedule, one chunk at a time,
    # the LLM unpaced
    "fifo": {"tts": {"scheduling": "fifo", "chunker": {"adaptive": False}},
             "gateway": {"playout": {"tts_lookahead": 1}}, "llm": {"yield_lead_s": 0.0}},
    # as shipped: earliest deadline first, chunks sized by the buffer, the next chunk queued early,
    # the LLM paced
    "deadline": {"tts": {"scheduling": "deadline", "chunker": {"adaptive": True}},
                 "gateway": {"playout": {"tts_lookahead": 2}}, "llm": {"yield_lead_s": 3.0, "urgent_lead_s": 1.0}},
    # the parts one at a time (not in --compare): deadline order with the fixed chunk schedule
    "deadline-fixed-chunks": {"tts": {"scheduling": "deadline", "chunker": {"adaptive": False}},
                              "gateway": {"playout": {"tts_lookahead": 2}}},
    # the CPU LLM's pacing (an answer far ahead waits for one behind) off, and as shipped
    "unpaced": {"llm": {"yield_lead_s": 0.0}},
    "paced": {"llm": {"yield_lead_s": 3.0, "urgent_lead_s": 1.0}},
}


def turn_figures(report: Any) -> dict[str, Any]:
    """Underrun and latency figures of one load test."""
    answered = [t for t in report.turns if t.answered]
    stalled = [t for t in answered if t.underruns > 0]
    v2v = [t.voice_to_voice_ms for t in answered if t.voice_to_voice_ms is not None]
    stall_ms = [t.underrun_ms for t in stalled]
    return {
        "turns": len(report.turns), "answered": len(answered), "stalled_turns": len(stalled),
        "stalled_pct": round(100 * len(stalled) / len(answered), 1) if answered else None,
        "stalled_over_200ms": sum(ms > 200 for ms in stall_ms),
        # 0 when no turn stalled (not NaN: the JSON stays strict)
        "underrun_ms_p50": pct(stall_ms, 50) if stall_ms else 0.0,
        "underrun_ms_p95": pct(stall_ms, 95) if stall_ms else 0.0,
        "underrun_ms_max": round(max(stall_ms), 1) if stall_ms else 0.0,
        "v2v_ms_p50": pct(v2v, 50), "v2v_ms_p95": pct(v2v, 95),
        "errors": report.errors(),
        # what each stalled turn was, to find why (server_latency holds the server's own estimate)
        "stalled": [{"caller": t.caller, "turn": t.turn, "t_s": round(t.t_s, 1), "underruns": t.underruns,
                     "underrun_ms": round(t.underrun_ms, 1), "audio_ms": round(t.audio_ms),
                     "v2v_ms": t.voice_to_voice_ms, "text": t.response_text[:120],
                     "server": t.server_latency} for t in stalled],
    }


async def one_load(address: str, callers: int, ramp_s: float, hold_s: float, out: Path | None) -> dict[str, Any]:
    from clients.loadtest import run_loadtest
    from clients.loadtest_config import LoadTestConfig

    cfg = LoadTestConfig(address=address, callers=callers, ramp_up_s=ramp_s, hold_s=hold_s,
                         max_duration_s=ramp_s + hold_s + 180, progress=False, replicas="off",
                         out_dir=str(out) if out else None)
    report = await run_loadtest(cfg)
    return turn_figures(report)


def llm_pacing() -> dict[str, Any]:
    """The LLM stage's pacing counters so far (one replica's, where Serve runs several)."""
    from ray import serve

    try:
        stats = serve.get_deployment_handle("LLM", app_name="voxserve").stats.remote().result(timeout_s=10)
    except Exception as exc:  # a figure missing from the record, not a failed benchmark
        return {"error": repr(exc)}
    return {k: stats[k] for k in ("yields", "yielded_s") if k in stats}


def run_config(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"overrides": overrides}
    with local_app(app_overrides=overrides) as server:
        many = (f"{args.callers} callers", args.callers, args.ramp6, args.hold6)
        for label, callers, ramp, hold in (("1 caller", 1, 0.0, args.hold1), many):
            if callers > args.max_callers or callers < args.min_callers:
                continue
            out = Path(args.out) / name / label.replace(" ", "_") if args.out else None
            figures = asyncio.run(one_load(server.grpc_address, callers, ramp, hold, out))
            figures["llm_pacing_so_far"] = llm_pacing()
            result[label] = figures
            summary = {k: v for k, v in figures.items() if k != "stalled"}
            print(f"[{name}] {label}: {json.dumps(summary)}", flush=True)
            for turn in figures["stalled"]:
                print(f"    stalled: {json.dumps(turn)}", flush=True)
    return result


def table(results: dict[str, Any]) -> str:
    head = ("| config | load | turns | stalled turns | stalled > 200 ms | underrun p50 / p95 / max ms "
            "| v2v p50 / p95 ms |\n|---|---|---|---|---|---|---|")
    rows = []
    for name, res in results.items():
        for label in [k for k in res if k.endswith(("caller", "callers"))]:
            f = res[label]
            if f:
                rows.append(f"| {name} | {label} | {f['answered']} | {f['stalled_turns']} ({f['stalled_pct']}%) | "
                            f"{f['stalled_over_200ms']} | {f['underrun_ms_p50']} / {f['underrun_ms_p95']} / "
                            f"{f['underrun_ms_max']} | {f['v2v_ms_p50']} / {f['v2v_ms_p95']} |")
    return "\n".join([head, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", action="store_true", help="run every configuration in CONFIGS (fifo, deadline)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, action="append",
                   help="run this configuration (repeatable; default: the profile as it ships)")
    p.add_argument("--hold1", type=float, default=120.0, help="seconds of the 1-caller run (default 120)")
    p.add_argument("--ramp6", type=float, default=20.0, help="ramp-up of the second load (default 20)")
    p.add_argument("--hold6", type=float, default=90.0, help="hold of the second load (default 90)")
    p.add_argument("--callers", type=int, default=6, help="callers of the second load (default 6, the issue's)")
    p.add_argument("--max-callers", type=int, default=6, help="skip loads above this many callers")
    p.add_argument("--min-callers", type=int, default=1, help="skip loads below this many callers")
    p.add_argument("--out", default="out/bench/playout", help="results folder ('' = none)")
    args = p.parse_args()
    from services.cpu import machine_record

    if args.compare:
        configs = {name: CONFIGS[name] for name in ("fifo", "deadline")}
    elif args.config:
        configs = {name: CONFIGS[name] for name in args.config}
    else:
        configs = {"shipped": {}}
    results = {name: run_config(name, overrides, args) for name, overrides in configs.items()}
    print(table(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "playout.json").write_text(json.dumps({"machine": machine_record(), "args": vars(args),
                                                      "results": results}, indent=1))
        (out / "playout.md").write_text(table(results) + "\n")
        print(f"wrote {out / 'playout.json'}")


if __name__ == "__main__":
    main()

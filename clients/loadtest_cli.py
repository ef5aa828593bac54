"""The ``voxserve loadtest`` command: its options, the ``LoadTestConfig`` they give, and its handler.

Importing this module costs the standard library only: ``voxserve`` builds its parser from here,
and the load tester (``clients.loadtest``, gRPC) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from clients.errors import InvalidInput, MissingPackage
from clients.loadtest_config import InvalidLoadTestConfig, LoadTestConfig, format_schedule, parse_schedule

__all__ = ["add_parser", "cmd_loadtest", "config_from_args"]


def _schedule(text: str) -> list[tuple[float, int]]:
    """argparse type of --schedule: its message, not argparse's "invalid value"."""
    try:
        return parse_schedule(text)
    except InvalidLoadTestConfig as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``voxserve loadtest`` on the CLI's subparsers; its handler is ``cmd_loadtest``."""
    d = LoadTestConfig()
    p: argparse.ArgumentParser = subparsers.add_parser(
        "loadtest", help="simulated callers speaking to a server over gRPC: latency, errors, replicas",
        description="Concurrent simulated callers, each a real Converse stream sending cached speech at "
                    "real-time pace, on a ramp (1 -> N over --ramp-up, --hold, --ramp-down) or a step "
                    "--schedule, so autoscaling shows: the summary has a row per phase (callers wanted, calls "
                    "started and refused, voice-to-voice p50/p95, max replicas) and the plot shows latency, "
                    "callers and refusals, replicas and each stage's load over its autoscaling targets. Writes "
                    "loadtest.json (every turn), summary.md and loadtest.png to --out.")
    p.add_argument("--address", default=d.address, help=f"server gRPC address (default: {d.address})")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback address (servers you own)")
    p.add_argument("--callers", type=int, default=None,
                   help=f"peak concurrent callers N (default: {d.callers}; with --schedule: its largest step)")
    p.add_argument("--ramp-up", type=float, default=d.ramp_up_s, help="seconds to go from 1 to N callers")
    p.add_argument("--hold", type=float, default=d.hold_s, help=f"seconds at N callers (default: {d.hold_s:.0f})")
    p.add_argument("--ramp-down", type=float, default=d.ramp_down_s, help="seconds to go from N callers to 0")
    p.add_argument("--schedule", type=_schedule, default=None, metavar="T:N,...",
                   help="step schedule instead of the ramp: from T seconds on, N callers are wanted, e.g. "
                        "0:1,30:4,60:10,150:4,180:1,210:0 (starts at 0, times increase, N in [0, 256], the last "
                        "step has 0 callers: calling stops there, then --cooldown); not with --callers, "
                        "--ramp-up, --hold or --ramp-down; must end within --max-duration")
    p.add_argument("--turns", type=int, default=d.turns_per_call, help="questions per call (default: 2)")
    p.add_argument("--calls", type=int, default=d.calls_per_caller,
                   help="calls per caller at most (default: 0 = until the schedule ends)")
    p.add_argument("--pause", type=float, default=d.pause_s, help="seconds of silence between turns and calls")
    p.add_argument("--barge-in-rate", type=float, default=d.barge_in_rate,
                   help="share of turns that interrupt the previous answer (default: 0)")
    p.add_argument("--max-duration", type=float, default=d.max_duration_s,
                   help=f"hard limit on the whole test in seconds (default: {d.max_duration_s:.0f})")
    p.add_argument("--cooldown", type=float, default=d.cooldown_s,
                   help="seconds to keep recording replicas after the last call (shows scale-down; default: 0)")
    p.add_argument("--turn-timeout", type=float, default=d.turn_timeout_s, help="seconds to wait for an answer")
    p.add_argument("--chunk-ms", type=int, default=d.chunk_ms,
                   help=f"audio per message in ms (default: {d.chunk_ms}, a WebRTC frame; larger messages cost the "
                        "server less behind Ray Serve's gRPC proxy)")
    p.add_argument("--no-resume", action="store_true",
                   help="do not resume a call whose stream breaks or moves (default: resume with its token)")
    p.add_argument("--language", default=d.language,
                   help="language hint (default: en; '' = the server's default, auto = detect)")
    p.add_argument("--question", action="append", help="a question to speak (repeatable; default: built-in set)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--out", default="out/loadtest", help="output folder (default: out/loadtest)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to read replica counts and autoscaler decisions from (default: attach to a "
                        "local one if running)")
    p.add_argument("--no-replicas", action="store_true", help="do not read replica counts or autoscaler decisions")
    p.add_argument("--app-name", default=d.app_name, help="Serve application name (default: voxserve)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_loadtest)
    return p


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    """The LoadTestConfig of parsed ``voxserve loadtest`` arguments (raises InvalidLoadTestConfig)."""
    schedule = getattr(args, "schedule", None)
    callers = args.callers
    if schedule is not None and callers is not None:
        raise InvalidLoadTestConfig("--callers is not used with --schedule (its largest step is the peak): leave "
                                    "it out")
    if callers is None:
        callers = max(n for _, n in schedule) if schedule is not None else LoadTestConfig().callers
    return LoadTestConfig(
        address=args.address, allow_remote=args.allow_remote, callers=callers, ramp_up_s=args.ramp_up,
        hold_s=args.hold, ramp_down_s=args.ramp_down, schedule=schedule, turns_per_call=args.turns,
        calls_per_caller=args.calls,
        pause_s=args.pause, barge_in_rate=args.barge_in_rate, max_duration_s=args.max_duration,
        turn_timeout_s=args.turn_timeout, chunk_ms=args.chunk_ms, resume=not args.no_resume,
        cooldown_s=args.cooldown, language=args.language,
        questions=args.question, seed=args.seed,
        out_dir=args.out, app_name=args.app_name, progress=not args.quiet,
        replicas="off" if args.no_replicas else (args.ray_address or "auto"))


def cmd_loadtest(args: argparse.Namespace) -> int:
    """Handler of ``voxserve loadtest``: 0 when every turn was answered without errors."""
    # the load tester and its gRPC stack only when the command runs
    from clients.loadtest import check_address, run_loadtest
    from clients.loadtest_report import summarize, write_outputs

    try:
        cfg = config_from_args(args)
        check_address(cfg.address, cfg.allow_remote)
    except InvalidInput as exc:
        print(f"voxserve loadtest: {exc}", file=sys.stderr)
        return 2
    timing = (f"schedule {format_schedule(cfg.schedule)}" if cfg.schedule is not None else
              f"ramp {cfg.ramp_up_s:.0f} s, hold {cfg.hold_s:.0f} s, ramp down {cfg.ramp_down_s:.0f} s")
    print(f"voxserve loadtest: {cfg.callers} callers against {cfg.address} ({timing}, cooldown "
          f"{cfg.cooldown_s:.0f} s, at most {cfg.max_duration_s:.0f} s)", file=sys.stderr, flush=True)
    report = asyncio.run(run_loadtest(cfg))
    print(summarize(report))
    if cfg.out_dir:
        try:
            paths = write_outputs(report, cfg.out_dir, plot_png=not args.no_plot)
        except MissingPackage as exc:  # no matplotlib: keep the measurements anyway
            print(f"voxserve loadtest: no plot: {exc}", file=sys.stderr)
            paths = write_outputs(report, cfg.out_dir, plot_png=False)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.ok else 1

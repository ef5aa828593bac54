"""Function tools over the real app: call accuracy on spoken requests, and result -> first audio.

The CPU profile runs in this process (``local_app``); each request is one gRPC session of the
reference client (``VoiceClient`` with local tools, as ``voxserve talk --tools``): the request is
spoken (Piper, the embedded voice, and espeak-ng voices no test uses), heard by the default ASR,
and answered by the default tool model with four tools offered. A call is right when its tool and
its arguments are (the words listed must appear in the arguments). The client runs the call
(canned results), sends the result, and measures the time from sending it to the first audio of
the answer that uses it. A few requests need no tool: a call there is a false call.

None of these requests is used by a test.

    .venv/bin/python scripts/bench_tools.py [--voices piper,espeak:en-us] [--out docs/bench/issue17]
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

from scripts.bench_common import ROOT, local_app, local_env, pct, versions

#: (request, tool it needs or None, words that must appear in the arguments (lower case))
REQUESTS: list[tuple[str, str | None, list[str]]] = [
    ("What's the weather like in Madrid right now?", "get_weather", ["madrid"]),
    ("Is it going to rain in Seattle today?", "get_weather", ["seattle"]),
    ("How cold is it in Helsinki?", "get_weather", ["helsinki"]),
    ("Tell me the weather in Tokyo.", "get_weather", ["tokyo"]),
    ("Do I need sunglasses in Sydney today?", "get_weather", ["sydney"]),
    ("What's the temperature in Chicago?", "get_weather", ["chicago"]),
    ("How many kilometers is twenty miles?", "convert_units", ["20", "mile", "kilomet"]),
    ("Convert five pounds to kilograms.", "convert_units", ["5", "pound", "kilogram"]),
    ("How many feet are in three meters?", "convert_units", ["3", "met", "f"]),
    ("What is seventy degrees Fahrenheit in Celsius?", "convert_units", ["70", "fahrenheit", "celsius"]),
    ("How many grams are in two ounces?", "convert_units", ["2", "ounce", "gram"]),
    ("Convert ten liters to gallons.", "convert_units", ["10", "liter", "gallon"]),
    ("What time is it in New York?", "get_time", ["new_york"]),
    ("What's the time in London?", "get_time", ["london"]),
    ("What time is it in Tokyo?", "get_time", ["tokyo"]),
    ("Tell me the current time in Berlin.", "get_time", ["berlin"]),
    ("What day is it today?", "get_time", []),
    ("Set a timer for ten minutes.", "set_timer", ["10"]),
    ("Start a five minute timer for the pasta.", "set_timer", ["5"]),
    ("Remind me in twenty minutes to call mom.", "set_timer", ["20"]),
    ("Set a timer for three minutes.", "set_timer", ["3"]),
    ("How warm is it in Lisbon this afternoon?", "get_weather", ["lisbon"]),
    ("How many miles is one hundred kilometers?", "convert_units", ["100", "kilomet", "mile"]),
    ("Put a timer on for fifteen minutes please.", "set_timer", ["15"]),
    # no tool needed: a call here is a false call
    ("Tell me a fun fact about octopuses.", None, []),
    ("Say hello to my friend Sam.", None, []),
    ("What is the capital of Portugal?", None, []),
    ("Thank you, that's all.", None, []),
]


def get_weather(city: str) -> dict[str, Any]:
    """The current weather in a city: sky and temperature in degrees Celsius."""
    return {"city": city, "sky": "partly cloudy", "temperature_celsius": 18}


def get_time(timezone: str = "UTC") -> dict[str, str]:
    """The current date and time in a time zone (an IANA name such as Europe/Paris; default UTC)."""
    return {"timezone": timezone, "time": "14:05", "date": "Tuesday 8 December 2026"}


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """Convert a quantity between units of length, mass, volume or temperature."""
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": 42.0}


def set_timer(minutes: float, label: str = "") -> dict[str, Any]:
    """Start a countdown timer of some minutes, with an optional label."""
    return {"timer": "started", "minutes": minutes, "label": label}


def right(name: str | None, needles: list[str], calls: list[dict[str, Any]]) -> bool:
    if name is None:
        return not calls
    if [c["name"] for c in calls][:1] != [name]:
        return False
    args = json.dumps(json.loads(calls[0]["arguments"] or "{}")).lower().replace(" ", "_")
    return all(n.replace(" ", "_") in args for n in needles)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from clients.tools import LocalTools, describe
    from clients.voice_client import UserTurn, VoiceClient
    from protos.voxserve.v1 import voice_pb2 as pb
    from scripts.bench_answers import voices
    from services.cpu import machine_record

    tools = LocalTools([describe(f) for f in (get_weather, get_time, convert_units, set_timer)])
    config = pb.SessionConfig(input_sample_rate=16000, language="en", playback=pb.PLAYBACK_NONE,
                              tools=tools.protos())
    speakers = voices()
    chosen = [v.replace("espeak:", "espeak ") for v in args.voices.split(",")]
    rows: list[dict[str, Any]] = []
    with local_app() as server:
        client = VoiceClient(server.grpc_address)
        try:
            for voice in chosen:
                say = speakers[voice]
                for request, name, needles in REQUESTS:
                    t0 = time.monotonic()
                    result = await client.converse([UserTurn(audio=say(request), label=request)], config,
                                                   realtime=True, tools=tools)
                    turn = result.turns[0]
                    row = {"voice": voice, "request": request, "tool": name, "heard": turn.transcript,
                           "calls": [{"name": c["name"], "arguments": c["arguments"]} for c in turn.tool_calls],
                           "answer": turn.response_text, "right": right(name, needles, turn.tool_calls),
                           "result_to_audio_ms": turn.result_to_audio_ms,
                           "server_first_audio_ms": turn.server_latency.get("first_audio_ms") if turn.tool_calls
                           else None, "status": result.status, "error": turn.error,
                           "wall_s": round(time.monotonic() - t0, 2)}
                    rows.append(row)
                    mark = "ok " if row["right"] else "BAD"
                    calls = "; ".join(f"{c['name']}({c['arguments']})" for c in row["calls"]) or "-"
                    r2a = f"{row['result_to_audio_ms']:.0f} ms" if row["result_to_audio_ms"] else "-"
                    print(f"{mark} [{voice}] {request!r} heard {turn.transcript!r} -> {calls} | result->audio {r2a}"
                          f" | {turn.response_text[:70]!r}", flush=True)
        finally:
            await client.close()
    summary: dict[str, Any] = {}
    for voice in [*chosen, "all"]:
        mine = [r for r in rows if voice in ("all", r["voice"])]
        need = [r for r in mine if r["tool"]]
        none = [r for r in mine if not r["tool"]]
        r2a = [r["result_to_audio_ms"] for r in mine if r["result_to_audio_ms"]]
        server = [r["server_first_audio_ms"] for r in mine if r["server_first_audio_ms"]]
        summary[voice] = {
            "tool_requests": len(need), "right_calls": sum(r["right"] for r in need),
            "right_tool_only": sum(bool(r["calls"]) and r["calls"][0]["name"] == r["tool"] for r in need),
            "no_tool_requests": len(none), "false_calls": sum(bool(r["calls"]) for r in none),
            "result_to_first_audio_ms": {"n": len(r2a), "p50": pct(r2a, 50), "p95": pct(r2a, 95)},
            "server_first_audio_after_result_ms": {"p50": pct(server, 50), "p95": pct(server, 95)},
        }
        s = summary[voice]
        print(f"{voice}: right calls {s['right_calls']}/{s['tool_requests']} (right tool "
              f"{s['right_tool_only']}), false calls {s['false_calls']}/{s['no_tool_requests']}, result -> first "
              f"audio p50 {s['result_to_first_audio_ms']['p50']} / p95 {s['result_to_first_audio_ms']['p95']} ms")
    return {"summary": summary, "rows": rows, "machine": machine_record(),
            "versions": versions("ctranslate2", "ray", "onnxruntime", "vllm")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voices", default="piper,espeak:en-us",
                        help="comma-separated: piper, espeak:en-us, espeak:en-gb, espeak:en-us+f3")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "issue17"), help="folder for tools.json")
    args = parser.parse_args()
    local_env()
    results = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tools.json").write_text(json.dumps(results, indent=1))
    print(f"written: {out / 'tools.json'}")


if __name__ == "__main__":
    main()

"""The ``voxserve`` command line: models, serve, talk, demo, proto."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_QUESTION = "What is the capital of France?"


# --- models -----------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from services import models
    from services.errors import VoxError
    from services.llm_engines import ct2_status, prepare_ct2

    if args.cache:
        os.environ[models.CACHE_ENV] = args.cache
    if args.action == "list":
        print(f"cache: {models.cache_dir()}")
        rows = models.status()
        rows += [ct2_status(str(models.cache_dir() / folder)) for folder, _ in models.EMBEDDED_LLMS.values()]
        if args.llm:
            try:
                rows.append(ct2_status(models.resolve_llm(args.llm)))
            except VoxError as exc:
                rows.append(("llm-ct2", "not prepared", str(exc)))
        for name, state, path in rows:
            print(f"  {name:4} {state:16} {path}")
        return 0
    only = args.only.split(",") if args.only else None
    try:
        results = models.prepare(only, progress=not args.quiet)
        # the CPU engine's copy of the embedded LLMs (and of the user's model with --llm): converted once
        for name, (_, step) in models.EMBEDDED_LLMS.items():
            if only is None or step in only:
                results.append(prepare_ct2(models.resolve_llm(name)))
        if args.llm:
            results.append(prepare_ct2(models.resolve_llm(args.llm)))
    except VoxError as exc:
        print(f"voxserve models prepare: {exc}", file=sys.stderr)
        return 2
    for r in results:
        took = f" in {r.seconds:.1f} s" if r.seconds else ""
        print(f"  {r.name:4} {r.action}{took}: {r.path}")
    if all(r.action != "prepared" for r in results):
        print("all default models already prepared; nothing to do")
    return 0


# --- serve ------------------------------------------------------------------------------------


def _serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """A profile name (cpu, gpu) or a Serve config YAML file, strictly checked either way."""
    import yaml

    from deployments.profiles import check_serve_config, load_serve_config

    if not Path(args.profile).is_file():
        return load_serve_config(args.profile)
    config: dict[str, Any] = yaml.safe_load(Path(args.profile).read_text())
    problems = check_serve_config(config)
    if problems:
        raise SystemExit(f"voxserve serve: {args.profile} is not a valid voxserve Serve config:\n  "
                         + "\n  ".join(problems))
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from deployments.server import start_local
    from services.errors import VoxError

    try:
        config = _serve_config(args)
    except VoxError as exc:
        raise SystemExit(f"voxserve serve: {exc}") from exc
    from deployments.auth import ApiKeyAuth, AuthConfig, open_server_warning

    app_args = next(a for a in config["applications"] if a["import_path"].startswith("deployments."))["args"]
    # Ray Serve's gRPC proxy listens on every interface whatever the HTTP host: warn if keyless.
    warning = open_server_warning(ApiKeyAuth.from_config(AuthConfig.model_validate(app_args.get("auth", {}))), "[::]")
    if warning:
        print(f"voxserve: warning: {warning}", file=sys.stderr, flush=True)
    print(f"voxserve: starting the {args.profile} profile (first start loads models: ~30-60 s) ...", flush=True)
    t0 = time.monotonic()
    server = start_local(config, grpc_port=args.grpc_port, http_port=args.http_port, num_cpus=args.num_cpus,
                         http_host=args.host, direct_ingress=args.direct_ingress)
    if server.direct_grpc_address:
        print(f"voxserve: direct ingress: the gateway replica serves gRPC itself at {server.direct_grpc_address} "
              "(no proxy hop: less CPU per session)", flush=True)
    import ray

    print(f"voxserve: ready in {time.monotonic() - t0:.0f} s; gRPC at {server.grpc_address} "
          f"(service voxserve.v1.VoiceAssistant); OpenAI Realtime API at ws://127.0.0.1:{server.http_port}"
          f"/v1/realtime, browser page at http://127.0.0.1:{server.http_port}/; "
          f"Ray at {ray.get_runtime_context().gcs_address} "
          "(for `voxserve loadtest --ray-address`). Ctrl-C or SIGTERM stops it.", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("voxserve: shutting down ...", flush=True)
    server.stop()
    return 0


# --- talk -------------------------------------------------------------------------------------


def _load_turns(args: argparse.Namespace, rate: int) -> list[Any]:
    from clients.audio import load_audio
    from clients.errors import ClientError
    from clients.voice_client import UserTurn

    wavs = [*(getattr(args, "files", None) or []), *(args.wav or [])]
    try:
        turns = [UserTurn(audio=load_audio(w, rate), label=Path(w).stem) for w in wavs]
    except ClientError as exc:
        raise SystemExit(f"voxserve talk: {exc}") from exc
    turns += [UserTurn(text=t, label="text") for t in args.text or []]
    if not turns:
        raise SystemExit("voxserve talk: give WAV files (voxserve talk question.wav, or --wav FILE) "
                         "and/or --text TEXT, or --mic")
    return turns


def _print_event(event: Any) -> None:
    kind = event.WhichOneof("event")
    t = f"[{event.server_time_ms / 1000:7.2f}s]"
    if kind == "speech_started":
        print(f"{t} speech started", flush=True)
    elif kind == "speech_stopped":
        print(f"{t} speech stopped ({event.speech_stopped.utterance_ms} ms)", flush=True)
    elif kind == "input_committed" and event.input_committed.utterance_ms:
        print(f"{t} turn over ({event.input_committed.utterance_ms} ms of speech)", flush=True)
    elif kind == "response_paused":
        print(f" [paused at {event.response_paused.played_ms} ms]", end="", flush=True)
    elif kind == "response_resumed":
        print(f" [resumed: {event.response_resumed.reason or 'noise'}]", end="", flush=True)
    elif kind == "partial_transcript":
        print(f"{t} partial: {event.partial_transcript.text}", flush=True)
    elif kind == "final_transcript":
        print(f"{t} you said: {event.final_transcript.text!r}", flush=True)
    elif kind == "response_started":
        print(f"{t} assistant: ", end="", flush=True)
    elif kind == "text_delta":
        print(event.text_delta.text, end="", flush=True)
    elif kind == "response_done":
        print(flush=True)
    elif kind == "response_interrupted":
        e = event.response_interrupted
        print(f"\n{t} interrupted ({e.reason or 'barge_in'}); heard: {e.heard_text!r}", flush=True)
    elif kind == "tool_call" and event.tool_call.done:
        c = event.tool_call
        note = f" -> not made: {c.error}" if c.error else ""
        print(f"\n{t} tool call {c.name}({c.arguments_json}){note}", flush=True)
    elif kind == "tool_call_cancelled":
        print(f"{t} tool call {event.tool_call_cancelled.call_id} cancelled ({event.tool_call_cancelled.reason})",
              flush=True)
    elif kind == "error":
        print(f"{t} error {event.error.code}: {event.error.message}", flush=True)


def print_turn_latency(results: Any) -> None:
    """One line per turn: the client's voice-to-voice (from the end of speech in the audio sent)
    and the server's breakdown (end-of-turn delay, ASR, LLM first token, TTS first audio)."""
    for turn in results.turns:
        v2v = f"{turn.voice_to_voice_ms:.0f}" if turn.voice_to_voice_ms is not None else "-"
        s = turn.server_latency
        extra = "".join([f", interrupted ({turn.interrupt_reason})" if turn.interrupted else "",
                         f", paused {turn.paused}x/resumed {turn.resumed}x" if turn.paused else "",
                         f", {turn.early_answers} early answer(s)" if turn.early_answers else ""])
        print(f"  {turn.label}: voice-to-voice {v2v} ms (client, from the end of speech)"
              f" | server: end-of-turn {s.get('vad_end_delay_ms', 0):.0f} + asr {s.get('asr_ms', 0):.0f}"
              f" + llm first token {s.get('llm_first_token_ms', 0):.0f}"
              f" + tts first audio {s.get('tts_first_audio_ms', 0):.0f}"
              f" -> first audio {s.get('first_audio_ms', 0):.0f} ms after the turn ended"
              f" | speculative {'yes' if turn.speculative else 'no'}"
              f" | {s.get('llm_tokens', 0):.0f} tokens @ {s.get('llm_tokens_per_s', 0):.1f}/s"
              f" | audio {turn.audio_ms / 1000:.1f} s, underruns {turn.underruns}{extra}")


def _load_tools(args: argparse.Namespace, config: Any) -> Any:
    """--tools MODULE: its functions go into the session config; the client runs the calls."""
    path = getattr(args, "tools", None)
    if not path:
        return None
    from clients.errors import ClientError
    from clients.tools import LocalTools

    try:
        tools = LocalTools.load(path)
    except ClientError as exc:
        raise SystemExit(f"voxserve talk: {exc}") from exc
    config.tools.extend(tools.protos())
    config.tool_choice = getattr(args, "tool_choice", "") or ""
    print(f"tools offered: {', '.join(tools.tools)}")
    return tools


async def _talk(args: argparse.Namespace) -> int:
    from clients.audio import write_wav
    from clients.resume import converse_resuming
    from clients.voice_client import VoiceClient
    from protos.voxserve.v1 import voice_pb2 as pb

    rate = args.rate
    config = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=rate, language=args.language,
                              system_prompt=args.system_prompt, partial_transcripts=args.partials,
                              response_mode=pb.SPEECH_NATIVE if args.speech_native else pb.CASCADE)
    tools = _load_tools(args, config)
    if getattr(args, "push_to_talk", False):
        if args.mic:
            raise SystemExit("voxserve talk: --push-to-talk works with WAV files, not --mic")
        config.turn_detection.mode = pb.MANUAL  # each WAV is one turn, ended by CommitInput
    if args.mic:
        from clients.mic import talk_live

        if tools is not None:
            raise SystemExit("voxserve talk: --tools works with WAV files and --text, not --mic")
        client = VoiceClient(args.address, getattr(args, "api_key", None))
        try:
            await talk_live(client.stub, config, _print_event, client.metadata)
        finally:
            await client.close()
        return 0
    turns = _load_turns(args, rate)
    client = VoiceClient(args.address, getattr(args, "api_key", None))
    try:
        # a stream that breaks or is moved (SessionMoved) is resumed with the session's token
        result, resumed = await converse_resuming(client, turns, config, realtime=not args.fast,
                                                  on_event=None if args.quiet else _print_event, tools=tools)
    finally:
        await client.close()
    if resumed.resumes:
        print(f"session resumed {resumed.resumes} time(s) (" +
              ", ".join(f"{ms:.0f} ms" for ms in resumed.resume_ms) + " from the break to the resumed session)")
    if result.status != "OK":
        print(f"voxserve talk: stream ended with {result.status}: {result.details}", file=sys.stderr)
        return 1
    if args.out and result.audio:
        path = write_wav(args.out, result.answer_audio(), result.output_sample_rate)
        print(f"answer audio: {path} ({sum(t.audio_ms for t in result.turns) / 1000:.1f} s)")
    print("latency per turn:")
    print_turn_latency(result)
    for turn in result.turns:
        for c in turn.tool_calls:
            print(f"  {turn.label}: {c['name']}({c['arguments']}) -> {c.get('output', '(no result)')}")
        if turn.result_to_audio_ms is not None:
            print(f"  {turn.label}: tool result -> first audio {turn.result_to_audio_ms:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230 - one small file at the end
            json.dump(result.to_dict(), f, indent=1)
    return 0 if all(t.response_text and not t.error for t in result.turns) else 1


def cmd_talk(args: argparse.Namespace) -> int:
    return asyncio.run(_talk(args))


# --- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the app, speak a question to it over gRPC, save the spoken answer."""
    from clients.audio import write_wav
    from deployments.profiles import load_serve_config
    from deployments.server import free_port, start_local
    from services.tts import PiperTTS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tts = PiperTTS.load()
    question = np.concatenate(list(tts.synthesize_blocking(args.question)))
    question_wav = write_wav(out / "question.wav", question, tts.sample_rate)
    print(f"demo: question {args.question!r} spoken by Piper -> {question_wav}", flush=True)
    print("demo: starting the Ray Serve app (VAD, ASR, LLM, TTS, Gateway) ...", flush=True)
    t0 = time.monotonic()
    server = start_local(load_serve_config("cpu"), grpc_port=args.grpc_port or free_port())
    print(f"demo: app ready in {time.monotonic() - t0:.0f} s at {server.grpc_address}", flush=True)
    try:
        talk = argparse.Namespace(address=server.grpc_address, wav=[str(question_wav)], text=None, rate=16000,
                                  mic=False, language="en", system_prompt="", partials=True, speech_native=False,
                                  fast=False, quiet=False, out=str(out / "answer.wav"),
                                  json=str(out / "demo.json"))
        return cmd_talk(talk)
    finally:
        server.stop()


def cmd_proto(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    script = str(root / "scripts" / "gen_proto.sh")
    return subprocess.call(["bash", script], env={**os.environ, "PYTHON": sys.executable})


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxserve", description="Real-time voice assistant serving on Ray Serve.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="prepare or list the embedded default models")
    m.add_argument("action", choices=["prepare", "list"])
    m.add_argument("--cache", help="cache folder (default: $VOXSERVE_CACHE or ~/.cache/voxserve)")
    m.add_argument("--only", help="comma-separated subset of vad,asr,moonshine,turn,llm,qwen,tts")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--llm", metavar="MODEL",
                   help="also convert this LLM (HF folder or hub id, as for llm.model) for the CTranslate2 engine")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("serve", help="run the voice pipeline on a local Ray cluster until Ctrl-C/SIGTERM")
    s.add_argument("--profile", default="cpu", help="cpu, gpu, or a Serve config YAML path (default: cpu)")
    s.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default: 9000)")
    s.add_argument("--http-port", type=int, default=8000,
                   help="HTTP port: the OpenAI Realtime WebSocket /v1/realtime and the page at / (default: 8000)")
    s.add_argument("--num-cpus", type=int, default=None, help="Ray logical CPUs (default: max(8, cores))")
    s.add_argument("--direct-ingress", action="store_true",
                   help="Ray Serve's experimental direct ingress: the gateway replica serves gRPC on a port of "
                        "its own (printed) instead of through the proxy actor; measured to save ~25%% of a core "
                        "per streaming session on 2 cores (BENCHMARKS.md)")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface of the HTTP proxy (WebSocket API, page); 0.0.0.0 in a container "
                        "(default: 127.0.0.1; gRPC always listens on every interface)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("talk", help="reference client: speak WAV files (or text) to a server, print events",
                       description="Stream WAV files as spoken turns at real-time pace (silence between turns, "
                                   "like a live microphone), print the events, write the answer audio and the "
                                   "latency of each turn. Example: voxserve talk question.wav")
    t.add_argument("files", nargs="*", metavar="WAV", help="spoken turns, one per file (WAV; FLAC needs soundfile)")
    t.add_argument("--address", default="127.0.0.1:9000", help="server gRPC address (default: 127.0.0.1:9000)")
    t.add_argument("--api-key", default=None,
                   help="API key sent as 'authorization: Bearer <key>' (default: $VOXSERVE_API_KEY)")
    t.add_argument("--wav", action="append", help="a spoken turn (WAV/FLAC, any rate); repeat for more turns")
    t.add_argument("--text", action="append", help="a typed turn; repeat for more")
    t.add_argument("--mic", action="store_true",
                   help="talk live through the microphone until Ctrl-C (needs `pip install sounddevice`)")
    t.add_argument("--push-to-talk", action="store_true",
                   help="each WAV is one whole turn, ended by CommitInput (turn detection MANUAL), no silence sent")
    t.add_argument("--rate", type=int, default=16000, help="sample rate to stream at (default: 16000)")
    t.add_argument("--language", default="",
                   help="ISO 639-1 language hint, or auto to detect (default: the server's, en)")
    t.add_argument("--system-prompt", default="", help="system prompt (default: the server's)")
    t.add_argument("--partials", action="store_true", help="ask for partial transcripts")
    t.add_argument("--speech-native", action="store_true", help="ask for speech-native mode")
    t.add_argument("--fast", action="store_true", help="send audio as fast as possible, not at real-time pace")
    t.add_argument("--quiet", action="store_true", help="print only the latency summary")
    t.add_argument("--out", default="answer.wav", help="write the answer audio here (default: answer.wav)")
    t.add_argument("--json", help="write per-turn results as JSON here")
    t.add_argument("--tools", metavar="MODULE.py",
                   help="offer the public functions of this Python file as tools: the model may call them, this "
                        "client runs them and sends the results (example: examples/tools.py)")
    t.add_argument("--tool-choice", default="",
                   help="auto (default), none, required, or a function name (with --tools)")
    t.set_defaults(func=cmd_talk)

    d = sub.add_parser("demo", help="start the app, ask it a spoken question over gRPC, save the answer")
    d.add_argument("--question", default=DEFAULT_QUESTION, help=f"question to speak (default: {DEFAULT_QUESTION!r})")
    d.add_argument("--out", default="out", help="folder for question.wav, answer.wav, demo.json (default: out)")
    d.add_argument("--grpc-port", type=int, default=0, help="gRPC port (default: a free one)")
    d.set_defaults(func=cmd_demo)

    # the options only: clients.loadtest (gRPC, the load tester) is imported when the command runs
    from clients.loadtest_cli import add_parser as add_loadtest_parser

    add_loadtest_parser(sub)

    g = sub.add_parser("proto", help="regenerate the gRPC Python code from protos/voxserve/v1/voice.proto")
    g.set_defaults(func=cmd_proto)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

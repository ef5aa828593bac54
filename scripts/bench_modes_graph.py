"""Cascade vs speech-native through the whole Ray Serve graph, on the same spoken questions.

Starts the CPU profile with a tiny Qwen2-Audio (random audio encoder, SmolLM2 text model) as the
speech LLM beside the text LLM, then asks each question once per mode over gRPC at real-time
pace, alternating modes. Reports, per mode, the client's voice-to-voice latency and the server's
breakdown (ASR on the path or not, LLM time to first token, first audio). The tiny model's
answers are nonsense; its latency path (audio processor, encoder, prefill) is real.

    .venv/bin/python scripts/bench_modes_graph.py [--questions 4] [--out out/bench/modes_graph.json]
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


async def _ask(address: str, audio: Any, native: bool) -> dict[str, Any]:
    from clients.voice_client import UserTurn, VoiceClient
    from protos.voxserve.v1 import voice_pb2 as pb

    config = pb.SessionConfig(input_sample_rate=16000, language="en", max_response_tokens=40,
                              response_mode=pb.SPEECH_NATIVE if native else pb.CASCADE)
    client = VoiceClient(address)
    try:
        result = await client.converse([UserTurn(audio=audio)], config, wait_playback=False)
    finally:
        await client.close()
    turn = result.turns[0]
    return {"mode": "speech_native" if native else "cascade", "status": result.status,
            "voice_to_voice_ms": turn.voice_to_voice_ms, "transcript": turn.transcript,
            "first_transcript_ms": turn.first_transcript_ms,
            **{f"server_{k}": v for k, v in turn.server_latency.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=4, help="spoken questions per mode (default: 4)")
    parser.add_argument("--out", default="out/bench/modes_graph.json", help="JSON results file")
    args = parser.parse_args()
    local_env()

    from clients.speech_cache import QUESTIONS, load_questions
    from services.cpu import machine_record
    from services.models import cache_dir
    from tests.tiny_models import build_tiny_qwen2_audio

    questions = load_questions(QUESTIONS[: args.questions])
    model = build_tiny_qwen2_audio(cache_dir() / "tiny" / "qwen2_audio")
    rows: list[dict[str, Any]] = []
    with local_app(app_overrides={
            "speech_llm": {"model": str(model), "max_model_len": 2048, "kv_cache_gib": 0.25}}) as server:
        for q in questions:
            for native in (False, True):
                row = asyncio.run(_ask(server.grpc_address, q.audio, native))
                row["question"] = q.text
                rows.append(row)
                print(f"  {row['mode']:13} v2v {row['voice_to_voice_ms'] or float('nan'):7.0f} ms  "
                      f"llm-ttft {row.get('server_llm_first_token_ms', 0):5.0f} ms  {q.text}", flush=True)
    table = ["| mode | voice-to-voice p50 (ms) | turn end -> first audio p50 | ASR on path p50 | "
             "LLM TTFT p50 | first transcript p50 | n |", "|---|---|---|---|---|---|---|"]
    for mode in ("cascade", "speech_native"):
        sel = [r for r in rows if r["mode"] == mode and r["status"] == "OK" and r["voice_to_voice_ms"]]
        table.append(
            f"| {mode} | {pct([r['voice_to_voice_ms'] for r in sel], 50)} | "
            f"{pct([r.get('server_first_audio_ms', 0) for r in sel], 50)} | "
            f"{pct([r.get('server_asr_ms', 0) for r in sel], 50)} | "
            f"{pct([r.get('server_llm_first_token_ms', 0) for r in sel], 50)} | "
            f"{pct([r['first_transcript_ms'] for r in sel if r['first_transcript_ms']], 50)} | {len(sel)} |")
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_record(),
                               "rows": rows, "table": table}, indent=1))
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

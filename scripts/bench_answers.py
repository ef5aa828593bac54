"""Which small LLM answers voice questions best, and how fast, on the CPU engine (CTranslate2).

A held-out set of 44 short factual questions (no test uses them), each with the words a right
answer contains. For each model:
  typed    the question as text: share answered right, mean answer length in words, TTFT with
           the system prompt's KV cache warm, and tokens/s of one stream on ``--threads`` cores;
  spoken   the question spoken by Piper (the embedded voice) and by espeak-ng in three voices
           no test uses (en-us, en-gb, en-us+f3; `apt-get install espeak-ng`), heard by the
           default ASR (Moonshine), then answered: share heard (word error rate <= 25%) and
           answered right;
  tools    10 requests that need one of two function tools, with the model's own tool-call
           format (Hermes <tool_call> JSON for Qwen): calls with the right name and arguments.

    .venv/bin/python scripts/bench_answers.py [--models smollm2,qwen] [--threads 1] [--out answers.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_common import versions

#: (question, words of which one must appear in a right answer)
QUESTIONS: list[tuple[str, list[str]]] = [
    ("What is the capital of Japan?", ["tokyo"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What color is a ripe banana?", ["yellow"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("How many minutes are in an hour?", ["sixty", "60"]),
    ("At what temperature in Celsius does water boil?", ["100", "hundred"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the capital of Italy?", ["rome"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is three times four?", ["twelve", "12"]),
    ("What is the chemical symbol for gold?", ["au"]),
    ("Which ocean is the largest?", ["pacific"]),
    ("What is the capital of Canada?", ["ottawa"]),
    ("How many days are in a leap year?", ["366"]),
    ("Which animal is called the king of the jungle?", ["lion"]),
    ("At how many degrees Fahrenheit does water freeze?", ["32", "thirty-two", "thirty two"]),
    ("What is the square root of eighty one?", ["nine", "9"]),
    ("Which planet is known as the red planet?", ["mars"]),
    ("What language is mainly spoken in Brazil?", ["portuguese"]),
    ("What is the tallest animal in the world?", ["giraffe"]),
    ("How many sides does a hexagon have?", ["six", "6"]),
    ("What do bees make?", ["honey"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("Who painted the Mona Lisa?", ["vinci", "leonardo"]),
    ("What is ten minus three?", ["seven", "7"]),
    ("In which country are the pyramids of Giza?", ["egypt"]),
    ("What fruit is guacamole made from?", ["avocado"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("What is the largest animal on Earth?", ["whale"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What color is grass?", ["green"]),
    ("What is the currency of the United Kingdom?", ["pound"]),
    ("What is the closest star to the Earth?", ["sun"]),
    ("How many strings does a standard guitar have?", ["six", "6"]),
    ("What is the capital of Australia?", ["canberra"]),
    ("What do we call frozen water?", ["ice"]),
    ("What is five plus six?", ["eleven", "11"]),
    ("Which month comes after June?", ["july"]),
    ("How many wheels does a bicycle have?", ["two", "2"]),
    ("What is the capital of Russia?", ["moscow"]),
    ("Which instrument has black and white keys?", ["piano"]),
    ("What is the fastest land animal?", ["cheetah"]),
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value from one unit to another.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"]}}},
]
#: (request, tool name, argument values that must appear)
TOOL_REQUESTS: list[tuple[str, str, list[str]]] = [
    ("What is the weather like in Paris?", "get_weather", ["paris"]),
    ("Is it raining in London right now?", "get_weather", ["london"]),
    ("How warm is it in Madrid today?", "get_weather", ["madrid"]),
    ("Tell me the weather in Tokyo.", "get_weather", ["tokyo"]),
    ("Do I need a coat in Berlin?", "get_weather", ["berlin"]),
    ("How many kilometers is ten miles?", "convert_units", ["10", "mile", "k"]),
    ("Convert five kilograms to pounds.", "convert_units", ["5", "kilogram", "pound"]),
    ("What is thirty degrees Celsius in Fahrenheit?", "convert_units", ["30", "celsius", "fahrenheit"]),
    ("How many feet are in three meters?", "convert_units", ["3", "meter", "feet"]),
    ("Convert two liters to gallons.", "convert_units", ["2", "liter", "gallon"]),
]

ESPEAK_VOICES = ["en-us", "en-gb", "en-us+f3"]
_WORD = re.compile(r"[a-z0-9']+")


def right(answer: str, accepted: list[str]) -> bool:
    text = " ".join(_WORD.findall(answer.lower()))
    return any(re.search(rf"\b{re.escape(a)}\b", text) for a in accepted)


def wer(ref: str, hyp: str) -> float:
    r, h = _WORD.findall(ref.lower()), _WORD.findall(hyp.lower())
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / max(1, len(r))


def prepare_model(name: str) -> str:
    """The HF folder of a candidate model (assembled into the cache once)."""
    from services import models

    if name == "smollm2":
        return models.default_llm_model()
    if name == "qwen":
        return models.prepare_qwen(models.cache_dir(), progress=False).path
    return name  # a folder or hub id of the user's


async def answer(engine: Any, question: str, max_tokens: int) -> tuple[str, Any]:
    async with engine.stream_chat([{"role": "user", "content": question}], max_tokens=max_tokens,
                                  temperature=0) as stream:
        text = "".join([d async for d in stream])
    return text, stream.stats


async def tool_calls(engine: Any, max_tokens: int) -> dict[str, Any]:
    """The model's own tool-call format (Hermes-style <tool_call>{json}</tool_call>)."""
    ok, rows = 0, []
    for request, name, needles in TOOL_REQUESTS:
        messages = [{"role": "system", "content": engine.cfg.system_prompt}, {"role": "user", "content": request}]
        text = engine.tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        stream = engine._stream(f"tool-{len(rows)}", ids, len(ids), max_tokens, 0.0)
        async with stream:
            out = "".join([d async for d in stream])
        match = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", out, re.S) or re.search(r"(\{.*\})", out, re.S)
        good = False
        if match:
            try:
                call = json.loads(match.group(1))
                args = json.dumps(call.get("arguments", {})).lower()
                good = call.get("name") == name and all(n in args for n in needles)
            except ValueError:
                pass
        ok += good
        rows.append({"request": request, "output": out, "right": good})
    return {"right": ok, "of": len(TOOL_REQUESTS), "calls": rows}


def voices() -> dict[str, Any]:
    from services.audio import MODEL_RATE, resample
    from services.tts import PiperTTS

    piper = PiperTTS.load()
    out: dict[str, Any] = {"piper": lambda t: resample(np.concatenate(list(piper.synthesize_blocking(t))),
                                                      piper.sample_rate, MODEL_RATE)}
    exe = shutil.which("espeak-ng")
    if exe is None:
        print("espeak-ng is not installed: spoken questions in Piper's voice only", file=sys.stderr)
        return out
    for v in ESPEAK_VOICES:
        def speak(text: str, v: str = v) -> np.ndarray:
            wav = subprocess.run([exe, "-v", v, "-s", "165", "--stdout", text], capture_output=True,
                                 check=True).stdout
            with wave.open(io.BytesIO(wav)) as w:
                rate, frames = w.getframerate(), w.readframes(w.getnframes())
            return resample(np.frombuffer(frames, np.int16).astype(np.float32) / 32768, rate, MODEL_RATE)
        out[f"espeak {v}"] = speak
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from services.asr import ASRConfig, ASRRouter
    from services.cpu import machine_record
    from services.llm import LLMConfig
    from services.llm_engines import create_llm_engine

    heard: dict[str, list[str]] = {}
    if not args.typed_only:
        asr = ASRRouter.load(ASRConfig())
        for voice, speak in voices().items():
            heard[voice] = [(await asr.transcribe(speak(q), "en")).text.strip() for q, _ in QUESTIONS]
            ok = sum(wer(q, h) <= 0.25 for (q, _), h in zip(QUESTIONS, heard[voice], strict=True))
            print(f"heard ({voice}): {ok}/{len(QUESTIONS)}")
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        folder = prepare_model(name)
        engine = await create_llm_engine(LLMConfig(model=folder, engine="ctranslate2", cpu_threads=args.threads))
        try:
            await answer(engine, "Hello!", 8)  # warm: the system prompt's KV cache is then kept
            rows, ttft, tps = [], [], []
            for q, accepted in QUESTIONS:
                text, stats = await answer(engine, q, args.max_tokens)
                rows.append({"question": q, "answer": text, "right": right(text, accepted)})
                ttft.append(stats.ttft_s or 0.0)
                if stats.tokens > 2:
                    tps.append(stats.decode_tokens_per_s)
            typed = {"right": sum(r["right"] for r in rows), "of": len(rows),
                     "mean_words": round(statistics.mean(len(r["answer"].split()) for r in rows), 1),
                     "ttft_ms_p50": round(1000 * statistics.median(ttft), 1),
                     "decode_tokens_per_s": round(statistics.mean(tps), 1), "answers": rows}
            print(f"{name}: typed {typed['right']}/{typed['of']} right, {typed['mean_words']} words, "
                  f"TTFT p50 {typed['ttft_ms_p50']} ms, {typed['decode_tokens_per_s']} tok/s")
            spoken = {}
            for voice, texts in heard.items():
                got_heard = got_right = 0
                for (q, accepted), h in zip(QUESTIONS, texts, strict=True):
                    got_heard += wer(q, h) <= 0.25
                    got_right += right((await answer(engine, h or "?", args.max_tokens))[0], accepted)
                spoken[voice] = {"heard": got_heard, "answered_right": got_right, "of": len(QUESTIONS)}
                print(f"{name}: spoken ({voice}) heard {got_heard}, answered {got_right} of {len(QUESTIONS)}")
            tools = await tool_calls(engine, 96)
            print(f"{name}: tool calls {tools['right']}/{tools['of']} right")
            results[name] = {"model": folder, "typed": typed, "spoken": spoken, "tools": tools}
        finally:
            engine.shutdown()
    return {"machine": machine_record(), "versions": versions(), "threads": args.threads,
            "max_tokens": args.max_tokens, "models": results, "when": time.strftime("%Y-%m-%d %H:%M")}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,qwen", help="comma-separated: smollm2, qwen, or HF folders")
    p.add_argument("--threads", type=int, default=1, help="cores per answer (llm.cpu_threads)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--typed-only", action="store_true", help="skip the spoken part")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    ns = p.parse_args()
    result = asyncio.run(main(ns))
    if ns.out:
        ns.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {ns.out}")

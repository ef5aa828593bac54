"""The client package: importable without the server's stack, audio helpers, and the reference
client's logic (end of speech, event routing, paused playback, push-to-talk) against a scripted
fake Converse server. The fake stands in for the server only to test the client's own logic; the
real server is exercised by tests/test_graph.py and tests/test_loadtest.py.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clients.audio import (
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    read_wav,
    resample,
    resample_fft,
    speech_end,
    write_wav,
)
from clients.errors import InvalidInput
from clients.voice_client import UserTurn, VoiceClient, _Player
from protos.voxserve.v1 import voice_pb2 as pb
from protos.voxserve.v1 import voice_pb2_grpc as pb_grpc
from tests.conftest import ROOT, say

RATE = 16000
#: What the client package must not need at import time (the server's stack and heavy extras).
BLOCKED = ("services", "deployments", "pydantic", "scipy", "ray", "torch", "vllm", "soundfile", "matplotlib")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# --- layout: what importing needs ---------------------------------------------------------------


def test_client_package_imports_and_works_without_the_server_stack(tmp_path: Path) -> None:
    """Import every client module with the server's packages and heavy extras unavailable, and use
    the parts that must work there: PCM WAV io, numpy resampling, end of speech, the config."""
    code = f"""
        import importlib.abc, sys
        BLOCKED = {BLOCKED!r}
        tried = []

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    tried.append(name)
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        for name in BLOCKED:
            sys.modules.pop(name, None)
        import numpy as np
        import clients.audio, clients.voice_client, clients.loadtest, clients.mic, clients.speech_cache
        import clients.loadtest_cli, clients.loadtest_config, clients.loadtest_report, clients.stats
        assert not tried, f"imported at import time: {{tried}}"
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
        assert not loaded, loaded

        from clients.audio import load_audio, speech_end, write_wav
        t = np.arange(22050) / 22050
        tone = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
        path = write_wav({str(tmp_path / "q.wav")!r}, np.concatenate([tone, np.zeros(22050, np.float32)]), 22050)
        x = load_audio(path, 16000)  # stdlib wave + the numpy resampler
        assert x.size == 32000, x.size
        assert abs(speech_end(x, 16000) - 16000) <= 160, speech_end(x, 16000)
        from clients.loadtest_config import LoadTestConfig
        from clients.stats import percentile
        try:
            LoadTestConfig(callers=0)
        except ValueError as exc:
            assert "callers must be >= 1" in str(exc)
        else:
            raise AssertionError("callers=0 accepted")
        assert percentile([1.0, 3.0], 50) == 2.0
        assert set(tried) <= {{"scipy", "scipy.signal"}}, tried  # resample tried scipy, then used numpy
        print("ok")
    """
    out = _run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_cli_does_not_import_the_clients_until_a_client_command_runs() -> None:
    code = """
        import sys
        import deployments.cli as cli
        assert not [m for m in sys.modules if m.startswith("clients")], "import deployments.cli imported clients"
        parser = cli.build_parser()
        assert "clients.loadtest" not in sys.modules and "grpc" not in sys.modules, sorted(sys.modules)
        args = parser.parse_args(["loadtest", "--callers", "3", "--hold", "5", "--no-replicas"])
        assert (args.callers, args.hold, args.func.__module__) == (3, 5.0, "clients.loadtest_cli")
        talk = parser.parse_args(["talk", "question.wav", "--wav", "b.wav", "--push-to-talk"])
        assert (talk.files, talk.wav, talk.push_to_talk, talk.language) == (["question.wav"], ["b.wav"], True, "")
        print(parser._subparsers._group_actions[0].choices["loadtest"].format_help())
    """
    out = _run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    help_text = out.stdout
    for option in ("--address", "--allow-remote", "--callers", "--ramp-up", "--hold", "--ramp-down", "--turns",
                   "--calls", "--pause", "--barge-in-rate", "--max-duration", "--cooldown", "--turn-timeout",
                   "--language", "--question", "--seed", "--out", "--no-plot", "--ray-address", "--no-replicas",
                   "--app-name", "--quiet"):
        assert option in help_text, option


# --- audio helpers ------------------------------------------------------------------------------


def _tone(seconds: float, rate: int = RATE, freq: float = 220.0, amp: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_speech_end_ignores_trailing_silence_low_noise_and_clicks() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([np.zeros(4000, np.float32), _tone(0.8), np.zeros(RATE, np.float32)])
    end = 4000 + int(0.8 * RATE)
    assert abs(speech_end(x, RATE) - end) <= 160
    noisy = x + (0.001 * rng.standard_normal(x.size)).astype(np.float32)  # -60 dBFS: 49 dB below the tone
    assert abs(speech_end(noisy, RATE) - end) <= 160
    clicked = noisy.copy()
    clicked[end + 8000:end + 8040] = 0.95  # a 2.5 ms click 0.5 s into the silence
    assert abs(speech_end(clicked, RATE) - end) <= 160
    assert speech_end(np.zeros(RATE, np.float32), RATE) == 0
    assert speech_end(np.zeros(0, np.float32), RATE) == 0
    assert speech_end(_tone(0.3), RATE) == int(0.3 * RATE)
    with pytest.raises(InvalidInput):
        speech_end(np.zeros((2, 10), np.float32), RATE)


def test_speech_end_of_piper_speech_with_a_second_of_silence() -> None:
    speech = say("What is the capital of France?")
    end = speech_end(speech, RATE)
    assert speech.size - int(0.4 * RATE) < end <= speech.size  # Piper ends on its own short tail
    padded = np.concatenate([speech, np.zeros(RATE, np.float32)])
    padded += (0.001 * np.random.default_rng(2).standard_normal(padded.size)).astype(np.float32)
    assert abs(speech_end(padded, RATE) - end) <= 480


def test_pcm16_wav_round_trip_and_resamplers(tmp_path: Path) -> None:
    x = _tone(0.5, 22050)
    assert np.array_equal(pcm16_to_float(float_to_pcm16(x)), np.frombuffer(float_to_pcm16(x), "<i2") / 32768.0)
    path = write_wav(tmp_path / "a.wav", x, 22050)
    y, rate = read_wav(path)
    assert rate == 22050 and np.max(np.abs(y - x)) < 1e-4
    a, b = resample(x, 22050, 16000), resample_fft(x, 22050, 16000)
    assert a.size == b.size == 8000
    core = slice(400, -400)  # the filters differ only at the edges
    assert np.max(np.abs(a[core] - b[core])) < 0.01
    assert load_audio(path, 16000).size == 8000
    with pytest.raises(InvalidInput, match="no such audio file"):
        read_wav(tmp_path / "missing.wav")


def test_player_pauses_resumes_and_stops() -> None:
    p = _Player()
    p.add(100.0, 2000)  # 2 s of answer audio at t=100
    assert p.played_ms(100.5) == pytest.approx(500)
    p.pause(100.5)
    assert p.played_ms(101.5) == pytest.approx(500) and p.done_at() == float("inf")
    p.add(101.6, 500)  # audio that arrives while paused is queued, not an underrun
    p.resume(101.5)
    assert p.underruns == 0
    assert p.played_ms(102.0) == pytest.approx(1000)
    assert p.done_at() == pytest.approx(100.0 + 2.5 + 1.0)
    p.stop(102.0)
    assert p.played_ms(110.0) == pytest.approx(1000) and p.done_at() == 102.0
    p.add(110.0, 1000)
    assert p.queued_ms == 2500


# --- the reference client against a scripted server -----------------------------------------------


@dataclass
class Inbox:
    """What the fake server received, with arrival times."""

    messages: list[tuple[float, pb.ClientMessage]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False

    def kinds(self) -> list[str]:
        return [m.WhichOneof("message") or "" for _, m in self.messages]

    def samples(self) -> int:
        return sum(len(m.audio.data) // 2 for _, m in self.messages if m.HasField("audio"))

    def first(self, kind: str) -> float:
        return next(t for t, m in self.messages if m.WhichOneof("message") == kind)

    def playback(self) -> list[tuple[float, int, int]]:
        return [(t, m.playback.response_id, m.playback.played_ms) for t, m in self.messages if m.HasField("playback")]

    async def until(self, cond: Callable[[], bool], within_s: float = 30) -> None:
        async def wait() -> None:
            while not cond():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), within_s)


Script = Callable[[Inbox], AsyncIterator[pb.ServerEvent]]


class FakeVoice(pb_grpc.VoiceAssistantServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.inbox = Inbox()

    async def _read(self, requests: Any) -> None:
        async for msg in requests:
            self.inbox.messages.append((time.monotonic(), msg))
            self.inbox.changed.set()
        self.inbox.ended = True
        self.inbox.changed.set()

    async def Converse(self, request_iterator: Any, context: Any) -> AsyncIterator[pb.ServerEvent]:
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            yield pb.ServerEvent(session_started=pb.SessionStarted(session_id="fake", output_sample_rate=RATE))
            async for event in self.script(self.inbox):
                yield event
            await self.inbox.until(lambda: self.inbox.ended)
        finally:
            reader.cancel()


async def _converse(script: Script, turns: list[UserTurn], config: pb.SessionConfig | None = None,
                    **kwargs: Any) -> tuple[Any, Inbox]:
    server = grpc.aio.server()
    fake = FakeVoice(script)
    pb_grpc.add_VoiceAssistantServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = VoiceClient(f"127.0.0.1:{port}")
    try:
        cfg = config or pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=RATE)
        result = await client.converse(turns, cfg, **kwargs)
    finally:
        await client.close()
        await server.stop(0)
    return result, fake.inbox


def _audio(response_id: int, ms: int) -> pb.ServerEvent:
    return pb.ServerEvent(audio=pb.AudioChunk(data=b"\0\0" * (RATE * ms // 1000), sample_rate=RATE,
                                              response_id=response_id))


def _answer(input_id: int, response_id: int, audio_ms: int = 400, *, speculative: bool = False,
            transcript: str = "hello there") -> list[pb.ServerEvent]:
    return [pb.ServerEvent(input_committed=pb.InputCommitted(input_id=input_id, utterance_ms=600)),
            pb.ServerEvent(final_transcript=pb.FinalTranscript(text=transcript, input_id=input_id)),
            pb.ServerEvent(response_started=pb.ResponseStarted(response_id=response_id, input_id=input_id)),
            pb.ServerEvent(text_delta=pb.ResponseTextDelta(response_id=response_id, text="Hi!")),
            _audio(response_id, audio_ms),
            pb.ServerEvent(response_done=pb.ResponseDone(response_id=response_id, text="Hi!", audio_ms=audio_ms,
                                                         latency=pb.TurnLatency(speculative=speculative)))]


async def test_voice_to_voice_runs_from_the_end_of_speech_not_of_the_file() -> None:
    tone_s, file_s = 0.6, 1.6  # a spoken turn followed by 1 s of silence in the same file
    turn_audio = np.concatenate([_tone(tone_s), np.zeros(RATE, np.float32)])
    t_answer: list[float] = []

    async def script(inbox: Inbox) -> AsyncIterator[pb.ServerEvent]:
        await inbox.until(lambda: inbox.samples() >= turn_audio.size + RATE // 5)  # file + 200 ms silence
        t_answer.append(time.monotonic())
        for event in _answer(1, 5, speculative=True):
            yield event

    result, inbox = await _converse(script, [UserTurn(audio=turn_audio, label="q")], trailing_silence_ms=100)
    assert result.status == "OK", result.details
    turn = result.turns[0]
    assert turn.speech_end_ms == pytest.approx(1000 * tone_s, abs=10)
    t_first = inbox.first("audio")  # the first chunk is sent at the start of its 20 ms slot
    # the end of speech was sent when the tone ended, not when the file ended
    assert abs((turn.t_speech_end - t_first) - tone_s) < 0.1, turn.t_speech_end - t_first
    assert turn.t_speech_end - t_first < file_s - 0.5
    # so the caller waited the file's second of silence, and the figure says so
    assert turn.voice_to_voice_ms is not None and turn.voice_to_voice_ms >= 1000 * (file_s - tone_s) - 100
    assert turn.voice_to_voice_ms == pytest.approx(1000 * (t_answer[0] - turn.t_speech_end), abs=100)
    assert (turn.transcript, turn.response_text, turn.response_id, turn.input_id) == ("hello there", "Hi!", 5, 1)
    assert turn.speculative and turn.server_latency["speculative"]
    assert turn.first_transcript_ms is not None and turn.first_text_ms is not None
    # silence went on after the file, like a live microphone, until the answer came
    assert inbox.samples() >= turn_audio.size + RATE // 5


async def test_paused_answer_stops_what_is_heard_and_resumes() -> None:
    pause_s = 0.6

    async def script(inbox: Inbox) -> AsyncIterator[pb.ServerEvent]:
        await inbox.until(lambda: inbox.samples() >= RATE // 2)
        for event in _answer(1, 3, audio_ms=1500)[:-1]:
            yield event
        await asyncio.sleep(0.3)
        yield pb.ServerEvent(response_paused=pb.ResponsePaused(response_id=3, played_ms=300))
        await asyncio.sleep(pause_s)
        yield pb.ServerEvent(response_resumed=pb.ResponseResumed(response_id=3, reason="backchannel"))
        yield _answer(1, 3)[-1]
        # the second (typed) turn comes only after the answer was played, pause included
        await inbox.until(lambda: "text" in inbox.kinds())
        yield pb.ServerEvent(input_committed=pb.InputCommitted(input_id=2, text="And then?"))
        yield pb.ServerEvent(response_started=pb.ResponseStarted(response_id=4, input_id=2))
        yield _audio(4, 2000)
        await asyncio.sleep(0.3)
        yield pb.ServerEvent(response_interrupted=pb.ResponseInterrupted(
            response_id=4, heard_text="And", heard_ms=300, generated_text="And then it ended.", reason="cancelled"))

    turns = [UserTurn(audio=_tone(0.4), label="q1"), UserTurn(text="And then?", label="q2")]
    result, inbox = await _converse(script, turns, pause_ms=100, trailing_silence_ms=300)
    assert result.status == "OK", result.details
    first, second = result.turns
    assert (first.paused, first.resumed, first.interrupted) == (1, 1, False)
    reports = inbox.playback()
    t_first_audio_reports = [r for r in reports if r[1] == 3]
    assert t_first_audio_reports, "no playback positions reported"
    # while paused (the 0.6 s between the events) the reported position does not move
    positions = [ms for _, rid, ms in t_first_audio_reports]
    mid = [ms for ms in positions if 0 < ms < 1500]
    longest_flat = max(sum(1 for _ in g) for _, g in itertools.groupby(mid))
    assert longest_flat * 0.02 >= pause_s - 0.2, positions
    assert max(positions) == 1500  # it then played to the end
    assert inbox.first("text") - inbox.first("playback") >= 1.5 + pause_s - 0.3
    assert (second.response_id, second.input_id, second.interrupted, second.interrupt_reason) == (
        4, 2, True, "cancelled")
    assert second.heard_text == "And" and second.response_text == "And then it ended."
    after_stop = [ms for _, rid, ms in reports if rid == 4]
    assert after_stop and after_stop[-1] <= 600  # stopped at the interruption, not 2 s


async def test_early_answer_cut_by_the_rest_of_the_turn_is_not_the_turns_answer() -> None:
    """The server's end of turn fired inside the turn: the answer it started is interrupted by the
    rest of the turn, and the turn waits for (and measures) the answer to the whole of it."""
    turn_audio = np.concatenate([_tone(0.5), np.zeros(RATE // 2, np.float32), _tone(0.5, freq=330)])

    async def script(inbox: Inbox) -> AsyncIterator[pb.ServerEvent]:
        await inbox.until(lambda: inbox.samples() >= int(0.8 * RATE))
        for event in _answer(1, 2, transcript="I would like")[:-1]:
            yield event
        await inbox.until(lambda: inbox.samples() >= int(1.2 * RATE))
        yield pb.ServerEvent(response_interrupted=pb.ResponseInterrupted(
            response_id=2, heard_text="", generated_text="Hi!", reason="barge_in"))
        await inbox.until(lambda: inbox.samples() >= turn_audio.size + RATE // 4)
        for event in _answer(2, 6, transcript="a pizza"):
            yield event

    result, _ = await _converse(script, [UserTurn(audio=turn_audio)], trailing_silence_ms=100)
    turn = result.turns[0]
    assert (turn.early_answers, turn.interrupted, turn.response_id, turn.input_id) == (1, False, 6, 2)
    assert turn.transcript == "I would like a pizza"
    assert turn.voice_to_voice_ms is not None and 150 < turn.voice_to_voice_ms < 1000


async def test_turn_with_nothing_said_ends_without_waiting_for_the_timeout() -> None:
    async def script(inbox: Inbox) -> AsyncIterator[pb.ServerEvent]:
        await inbox.until(lambda: inbox.samples() >= RATE // 2)
        yield pb.ServerEvent(input_committed=pb.InputCommitted(input_id=1, utterance_ms=400))
        yield pb.ServerEvent(final_transcript=pb.FinalTranscript(text="", input_id=1))
        # the answer never started: it ends under a response id the client has not seen
        yield pb.ServerEvent(response_interrupted=pb.ResponseInterrupted(response_id=9, reason="no_speech"))

    t0 = time.monotonic()
    result, _ = await _converse(script, [UserTurn(audio=_tone(0.3))], turn_timeout_s=60, trailing_silence_ms=100)
    assert time.monotonic() - t0 < 20
    turn = result.turns[0]
    assert turn.interrupted and turn.interrupt_reason == "no_speech" and turn.voice_to_voice_ms is None


async def test_push_to_talk_commits_each_turn_and_sends_no_silence() -> None:
    turns = [UserTurn(audio=_tone(0.3)), UserTurn(audio=_tone(0.5))]

    async def script(inbox: Inbox) -> AsyncIterator[pb.ServerEvent]:
        for n in (1, 2):
            def committed(n: int = n) -> bool:
                return inbox.kinds().count("commit") >= n

            await inbox.until(committed)
            for event in _answer(n, n, audio_ms=200):
                yield event

    cfg = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=RATE,
                           turn_detection=pb.TurnDetectionSettings(mode=pb.MANUAL))
    result, inbox = await _converse(script, turns, cfg, pause_ms=100)
    assert [t.response_id for t in result.turns] == [1, 2]
    kinds = [k for k in inbox.kinds() if k != "playback"]
    per_turn = [int(0.3 * RATE) // 320, int(0.5 * RATE) // 320]
    assert kinds == ["config", *["audio"] * per_turn[0], "commit", *["audio"] * per_turn[1], "commit",
                     "end_of_input"]


def test_local_tools_describe_plain_functions_and_run_them() -> None:
    import json

    from clients.tools import LocalTools

    tools = LocalTools.load(str(Path(__file__).resolve().parent.parent / "examples" / "tools.py"))
    defs = {d["name"]: d for d in tools.definitions()}
    assert set(defs) == {"get_time", "convert_units"}  # _unit is private
    conv = defs["convert_units"]["parameters"]
    assert conv["properties"] == {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                  "to_unit": {"type": "string"}}
    assert conv["required"] == ["value", "from_unit", "to_unit"] and defs["get_time"]["parameters"]["required"] == []
    assert "Convert a quantity" in defs["convert_units"]["description"]
    out = json.loads(asyncio.run(tools.run("convert_units", '{"value": 10, "from_unit": "miles", "to_unit": "km"}')))
    assert out["result"] == 16.0934
    assert json.loads(asyncio.run(tools.run("convert_units", '{"value": 100, "from_unit": "F", "to_unit": "C"}'))
                      )["result"] == 37.7778
    assert "error" in json.loads(asyncio.run(tools.run("convert_units", '{"value": "x"}')))
    assert "error" in json.loads(asyncio.run(tools.run("nope", "{}")))
    assert json.loads(asyncio.run(tools.run("get_time", '{"timezone": "Europe/Paris"}')))["timezone"] == "Europe/Paris"


async def test_a_stream_that_goes_silent_is_given_up_not_waited_on_forever() -> None:
    """A proxy that lost the replica behind it can keep a stream open with no event and no end:
    the client gives it up once it has waited ``idle_timeout_s`` with nothing of its own to do,
    with DEADLINE_EXCEEDED, a status ``converse_resuming`` resumes from."""
    from clients.resume import RESUMABLE

    async def script(inbox: Inbox) -> AsyncIterator[pb.ServerEvent]:
        await asyncio.Event().wait()  # says nothing more, ever
        yield pb.ServerEvent()

    t0 = time.monotonic()
    # the turn goes unanswered for turn_timeout_s (2 s), the client ends its input, and then
    # nothing comes: neither an event nor the end of the stream
    result, _ = await _converse(script, [UserTurn(text="hello", label="q")], turn_timeout_s=2,
                                trailing_silence_ms=100, idle_timeout_s=1.0)
    assert result.status == "DEADLINE_EXCEEDED" and "no progress on the stream for 1 s" in result.details
    assert time.monotonic() - t0 < 10
    assert result.status in RESUMABLE

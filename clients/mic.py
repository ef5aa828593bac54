"""Live microphone conversation for ``voxserve talk --mic`` (needs the optional ``sounddevice``).

The microphone is streamed as it is captured and the answer is played as it arrives; the
playback position is reported to the server so barge-in keeps history true. When the server
pauses the answer (``ResponsePaused``: the user started speaking over it) playback stops where it
is, ``ResponseResumed`` continues it from there, and ``ResponseInterrupted`` drops what is left.
A stream that breaks or is moved (``SessionMoved``) is resumed with the session's token, with
backoff; the words said since the last transcript are sent again.
Use headphones: no echo cancellation is done here, so a loudspeaker's answer would interrupt itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from clients.audio import float_to_pcm16
from clients.resume import RESUMABLE
from protos.voxserve.v1 import voice_pb2 as pb

CHUNK_MS = 20
#: Longest unfinished utterance kept to send again after a break (chunks of CHUNK_MS: 30 s).
UTTERANCE_CHUNKS = 1500


def _sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: PortAudio library missing
        raise SystemExit(f"voxserve talk --mic needs the sounddevice package and a microphone ({exc}); "
                         "pip install sounddevice, or stream a file with --wav") from exc
    try:
        sounddevice.query_devices(kind="input")
    except Exception as exc:
        raise SystemExit(f"no microphone found: {exc}") from exc
    return sounddevice


async def talk_live(stub: Any, config: pb.SessionConfig, on_event: Callable[[pb.ServerEvent], None],
                    metadata: tuple[tuple[str, str], ...] = ()) -> None:
    """Converse with the microphone until Ctrl-C."""
    sd = _sounddevice()
    rate = config.input_sample_rate or 16000
    loop = asyncio.get_running_loop()
    mic: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=100)
    speaker: queue.Queue[np.ndarray] = queue.Queue(maxsize=1000)
    played = {"response": 0, "ms": 0.0}
    paused = {"response": 0}  # the response the server paused (0: none); read by the audio thread

    def captured(data: np.ndarray, frames: int, t: Any, status: Any) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            loop.call_soon_threadsafe(mic.put_nowait, data[:, 0].copy())

    out_rate = {"rate": 0}

    def play(out: np.ndarray, frames: int, t: Any, status: Any) -> None:
        out.fill(0)
        if paused["response"] and paused["response"] == played["response"]:
            return  # paused: silence, and the position does not advance
        filled = 0
        while filled < frames and not speaker.empty():
            chunk = speaker.queue[0]
            n = min(frames - filled, chunk.size)
            out[filled:filled + n, 0] = chunk[:n]
            filled += n
            if n == chunk.size:
                speaker.get_nowait()
            else:
                speaker.queue[0] = chunk[n:]
        if out_rate["rate"]:
            played["ms"] += 1000.0 * filled / out_rate["rate"]

    # The utterance not yet taken in by the server (no final transcript yet): sent again first
    # when the call resumes after a break, so the user need not repeat it.
    utterance: list[np.ndarray] = []
    session = {"token": ""}

    async def requests(cfg: pb.SessionConfig) -> AsyncIterator[pb.ClientMessage]:
        yield pb.ClientMessage(config=cfg)
        for samples in list(utterance):
            yield pb.ClientMessage(audio=pb.AudioInput(data=float_to_pcm16(samples)))
        while True:
            samples = await mic.get()
            utterance.append(samples)
            del utterance[:-UTTERANCE_CHUNKS]
            yield pb.ClientMessage(audio=pb.AudioInput(data=float_to_pcm16(samples)))
            if played["response"]:
                yield pb.ClientMessage(playback=pb.PlaybackPosition(
                    response_id=int(played["response"]), played_ms=int(played["ms"])))

    blocksize = rate * CHUNK_MS // 1000
    with sd.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=blocksize, callback=captured):
        output: Any = None
        delay = 0.2
        try:
            while True:
                cfg = pb.SessionConfig()
                cfg.CopyFrom(config)
                cfg.resume_token = session["token"]
                try:
                    async for event in stub.Converse(requests(cfg), metadata=metadata):
                        on_event(event)
                        kind = event.WhichOneof("event")
                        if kind == "session_started":
                            session["token"], delay = event.session_started.resume_token, 0.2
                        elif kind == "session_moved":
                            session["token"] = event.session_moved.resume_token
                        elif kind in ("final_transcript", "input_committed"):
                            utterance.clear()
                        elif kind == "audio":
                            chunk = event.audio
                            if output is None:
                                out_rate["rate"] = chunk.sample_rate
                                output = sd.OutputStream(samplerate=chunk.sample_rate, channels=1,
                                                         dtype="float32", callback=play)
                                output.start()
                            if chunk.response_id != played["response"]:
                                played.update(response=chunk.response_id, ms=0.0)
                            speaker.put(np.frombuffer(chunk.data, "<i2").astype(np.float32) / 32768)
                        elif kind == "response_paused":
                            paused["response"] = event.response_paused.response_id
                        elif kind == "response_resumed":
                            if paused["response"] == event.response_resumed.response_id:
                                paused["response"] = 0
                        elif kind == "response_interrupted":
                            with speaker.mutex:  # stop playing the interrupted answer at once
                                speaker.queue.clear()
                            paused["response"] = 0
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code().name not in RESUMABLE or not session["token"]:
                        raise
                    print(f"[connection lost ({exc.code().name}); resuming in {delay:.1f} s]", flush=True)
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
        finally:
            if output is not None:
                output.close()

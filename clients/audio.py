"""Audio helpers of the client tools, with numpy as their only hard dependency.

The clients run on machines without the server's stack: PCM WAV files are read with the standard
library's ``wave``; ``soundfile`` is used only for other formats (FLAC, float WAV) and only if it
is installed; resampling uses scipy's polyphase filter when scipy is installed, else an FFT
resampler in numpy. ``speech_end`` finds where speech ends in a recording, so latency can be
measured from the end of the speech instead of the end of the file.
"""

from __future__ import annotations

import io
import wave
from math import gcd
from pathlib import Path

import numpy as np

from clients.errors import InvalidInput, MissingPackage

#: The rate the server's listening side runs at; the clients stream at it by default.
MODEL_RATE = 16000


# --- PCM16 ------------------------------------------------------------------------------------


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] -> int16 (clipped, not wrapped; truncated toward zero, the same
    rule as the server's ``services.audio``)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidInput(f"expected mono audio (1-D array); got shape {x.shape}")
    return (np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> little-endian PCM16 bytes."""
    return float_to_int16(samples).astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian PCM16 bytes -> float32 in [-1, 1)."""
    if len(data) % 2:
        raise InvalidInput(f"PCM16 audio must have an even number of bytes (2 per sample); got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


# --- resampling -------------------------------------------------------------------------------


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono float audio: scipy's polyphase filter if scipy is installed, else an FFT
    resampler. Both return ``ceil(n * dst_rate / src_rate)`` samples."""
    if src_rate <= 0 or dst_rate <= 0:
        raise InvalidInput(f"sample rates must be positive; got {src_rate} -> {dst_rate}")
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidInput(f"expected mono audio (1-D array); got shape {x.shape}")
    if src_rate == dst_rate or x.size == 0:
        return x
    g = gcd(src_rate, dst_rate)
    try:
        from scipy.signal import resample_poly
    except ImportError:
        return resample_fft(x, src_rate, dst_rate)
    return np.asarray(resample_poly(x, dst_rate // g, src_rate // g), dtype=np.float32)


def resample_fft(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain (numpy only).

    The input is zero-padded (at least 50 ms) to a length whose resampled length is a whole
    number of samples, so the time scale is exact and the circular FFT does not wrap the end of
    the signal onto its start.
    """
    x = np.asarray(samples, dtype=np.float64)
    n = x.size
    g = gcd(src_rate, dst_rate)
    q, p = src_rate // g, dst_rate // g
    out_n = -(-n * p // q)
    padded = -(-(n + max(64, src_rate // 20)) // q) * q
    padded_out = padded // q * p
    spectrum = np.fft.rfft(x, padded)
    out = np.zeros(padded_out // 2 + 1, dtype=np.complex128)
    k = min(spectrum.size, out.size)
    out[:k] = spectrum[:k]
    y = np.fft.irfft(out, padded_out) * (padded_out / padded)
    return y[:out_n].astype(np.float32)


# --- files ------------------------------------------------------------------------------------


def _pcm_frames_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    if width == 4:
        return (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    raise InvalidInput(f"unsupported WAV sample width of {width} bytes")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 and its rate (channels averaged).

    PCM WAV (8/16/24/32-bit) is read with the standard library; anything else (FLAC, float WAV,
    ...) needs the optional ``soundfile`` package.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"no such audio file: {p}")
    try:
        with wave.open(str(p), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        return _read_with_soundfile(p, exc)
    x = _pcm_frames_to_float(raw, width)
    if channels > 1:
        x = x[: x.size // channels * channels].reshape(-1, channels).mean(axis=1)
    return x.astype(np.float32), int(rate)


def _read_with_soundfile(p: Path, why: Exception) -> tuple[np.ndarray, int]:
    try:
        import soundfile as sf
    except (ImportError, OSError) as exc:  # OSError: the libsndfile library is missing
        raise MissingPackage(
            f"{p} is not a PCM WAV file ({why}); reading other formats needs the soundfile package "
            f"(pip install soundfile), or convert it: ffmpeg -i {p.name} -ac 1 -c:a pcm_s16le out.wav") from exc
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except RuntimeError as exc:  # soundfile raises LibsndfileError (a RuntimeError)
        raise InvalidInput(f"cannot read {p} as audio: {exc}") from exc
    return data.mean(axis=1).astype(np.float32), int(rate)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio -> a complete PCM16 WAV file in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(float_to_pcm16(samples))
    return buf.getvalue()


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Write mono float audio as a PCM16 WAV file (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(wav_bytes(samples, sample_rate))
    return p


def load_audio(path: str | Path, sample_rate: int = MODEL_RATE) -> np.ndarray:
    """Read an audio file and resample it to ``sample_rate`` (mono float32)."""
    x, rate = read_wav(path)
    return resample(x, rate, sample_rate)


# --- where the speech ends --------------------------------------------------------------------


def speech_end(samples: np.ndarray, rate: int, *, frame_ms: float = 10.0, threshold_db: float = -40.0,
               min_run_ms: float = 30.0, floor_dbfs: float = -70.0) -> int:
    """Sample index just after the last speech in ``samples`` (0 if there is none).

    Energy-based, for recordings of one utterance: a ``frame_ms`` frame is loud when its power is
    within ``threshold_db`` of the loudest ``min_run_ms`` stretch, so low background noise (below
    that) is not speech. Only runs of at least ``min_run_ms`` of loud frames count: an isolated
    click in the trailing silence is ignored, and the reference level is a sustained one, so a
    loud click does not raise it either. Audio whose loudest stretch is under ``floor_dbfs`` is
    silence.
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidInput(f"expected mono audio (1-D array); got shape {x.shape}")
    if rate <= 0:
        raise InvalidInput(f"sample rate must be positive; got {rate}")
    n = max(1, round(rate * frame_ms / 1000))
    frames = -(-x.size // n)
    if frames == 0:
        return 0
    padded = np.zeros(frames * n, dtype=np.float64)
    padded[: x.size] = x
    power = np.mean(padded.reshape(frames, n) ** 2, axis=1)
    k = max(1, round(min_run_ms / frame_ms))
    sustained = np.convolve(power, np.ones(k) / k, mode="valid") if frames >= k else power
    ref = float(sustained.max())
    if ref <= 10 ** (floor_dbfs / 10):
        return 0
    loud = np.concatenate([[0], (power >= ref * 10 ** (threshold_db / 10)).astype(np.int8), [0]])
    edges = np.diff(loud)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    runs = ends[(ends - starts) >= min(k, frames)]
    if runs.size == 0:
        return 0
    return int(min(x.size, runs[-1] * n))

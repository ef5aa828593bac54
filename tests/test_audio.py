"""services.audio: PCM conversion, validation, resampling, WAV io."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.audio import (
    SUPPORTED_RATES,
    StreamResampler,
    check_rate,
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    read_wav,
    resample,
    wav_bytes,
    write_wav,
)
from services.errors import InvalidArgument, OutOfRange


def tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_pcm16_round_trip() -> None:
    x = np.array([0.0, 0.5, -0.5, 0.999, -1.0, 0.25], np.float32)
    data = float_to_pcm16(x)
    assert len(data) == 2 * x.size
    np.testing.assert_allclose(pcm16_to_float(data), x, atol=1 / 32768)
    ints = np.array([0, 1, -1, 32767, -32768, 1234], "<i2")
    assert float_to_pcm16(pcm16_to_float(ints.tobytes())) == ints.tobytes()


def test_pcm16_clips_instead_of_wrapping() -> None:
    out = np.frombuffer(float_to_pcm16(np.array([2.0, -2.0], np.float32)), "<i2")
    assert out.tolist() == [32767, -32768]


def test_pcm16_errors() -> None:
    with pytest.raises(InvalidArgument, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(InvalidArgument):
        float_to_pcm16(np.zeros((2, 3), np.float32))


def test_check_rate() -> None:
    for rate in SUPPORTED_RATES:
        assert check_rate(rate) == rate
    with pytest.raises(OutOfRange, match="supported"):
        check_rate(11025)


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (22050, 16000), (8000, 16000),
                                          (16000, 22050), (44100, 16000), (16000, 16000)])
def test_resample_length_and_content(src: int, dst: int) -> None:
    x = tone(src, 1.0)
    y = resample(x, src, dst)
    assert y.dtype == np.float32
    assert abs(y.size - dst) <= 1
    # the 440 Hz tone survives: same RMS, same dominant frequency
    assert np.sqrt(np.mean(y[100:-100] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * dst / y.size
    assert abs(peak_hz - 440) < 2
    with pytest.raises(OutOfRange):
        resample(x, 0, dst)


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (22050, 16000), (44100, 16000),
                                          (8000, 16000), (16000, 22050), (24000, 16000)])
def test_stream_resampler_matches_one_shot(src: int, dst: int) -> None:
    rng = np.random.default_rng(1)
    x = (tone(src, 1.5) + 0.1 * rng.standard_normal(int(src * 1.5))).astype(np.float32)
    one_shot = resample(x, src, dst)
    rs = StreamResampler(src, dst)
    parts, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 1500))
        parts.append(rs.push(x[i : i + n]))
        i += n
    parts.append(rs.flush())
    streamed = np.concatenate(parts)
    assert streamed.size == one_shot.size
    np.testing.assert_allclose(streamed, one_shot, atol=1e-4)


def test_stream_resampler_latency_is_small() -> None:
    rs = StreamResampler(48000, 16000)
    out = rs.push(np.zeros(960, np.float32))  # 20 ms in
    assert 300 <= out.size <= 320  # almost all of the 20 ms comes out at once
    assert StreamResampler(16000, 16000).push(np.ones(5, np.float32)).size == 5


def test_wav_round_trip(tmp_path: Path) -> None:
    x = tone(22050, 0.5)
    path = write_wav(tmp_path / "sub" / "a.wav", x, 22050)
    y, rate = read_wav(path)
    assert rate == 22050
    np.testing.assert_allclose(y, x, atol=1 / 32768)
    assert wav_bytes(x, 22050)[:4] == b"RIFF"
    z = load_audio(path, 16000)
    assert abs(z.size - 8000) <= 1


def test_read_wav_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        read_wav(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav file at all")
    with pytest.raises(InvalidArgument):
        read_wav(bad)


def test_read_wav_stereo_is_averaged(tmp_path: Path) -> None:
    import soundfile as sf

    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.1)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    y, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and y.shape == (100,)
    np.testing.assert_allclose(y, 0.2, atol=1e-6)

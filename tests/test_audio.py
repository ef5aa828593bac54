"""services.audio and services.codecs: PCM and G.711 conversion, validation, resampling; clients.audio: WAV io."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.audio import load_audio, read_wav, wav_bytes, write_wav
from clients.errors import InvalidInput
from services import codecs
from services.audio import (
    SUPPORTED_RATES,
    StreamResampler,
    check_rate,
    float_to_pcm16,
    pcm16_to_float,
    resample,
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
    with pytest.raises(InvalidInput, match="no such audio file"):
        read_wav(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav file at all")
    with pytest.raises(InvalidInput, match="cannot read"):
        read_wav(bad)


def test_read_wav_stereo_is_averaged(tmp_path: Path) -> None:
    import soundfile as sf

    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.1)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    y, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and y.shape == (100,)
    np.testing.assert_allclose(y, 0.2, atol=1e-6)


# --- telephony codecs: G.711 mu-law and A-law (services.codecs) ----------------------------------

def _audioop() -> Any:
    """CPython's audioop (3.11/3.12; deprecated): the reference G.711 implementation we compare to."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")


G711_CASES = [
    ("mulaw", codecs.mulaw_decode_int16, codecs.mulaw_encode_int16, "ulaw2lin", "lin2ulaw"),
    ("alaw", codecs.alaw_decode_int16, codecs.alaw_encode_int16, "alaw2lin", "lin2alaw"),
]


@pytest.mark.parametrize(("name", "dec", "enc", "ref_dec", "ref_enc"), G711_CASES)
def test_g711_matches_reference_bit_exact(name: str, dec: Any, enc: Any, ref_dec: str,
                                          ref_enc: str) -> None:
    audioop = _audioop()
    every_code = bytes(range(256))
    expected = np.frombuffer(getattr(audioop, ref_dec)(every_code, 2), "<i2")
    np.testing.assert_array_equal(dec(every_code), expected)
    # every 16-bit sample value, in one sweep
    every_sample = np.arange(-32768, 32768, dtype=np.int16)
    assert enc(every_sample) == getattr(audioop, ref_enc)(every_sample.astype("<i2").tobytes(), 2)
    # the float API is the int API plus the PCM16 scaling
    np.testing.assert_array_equal(codecs.decoder(name)(every_code), expected.astype(np.float32) / 32768)
    x = np.random.default_rng(0).uniform(-1.1, 1.1, 5000).astype(np.float32)
    assert codecs.encoder(name)(x) == getattr(audioop, ref_enc)(float_to_pcm16(x), 2)


@pytest.mark.parametrize(("name", "dec", "enc", "ref_dec", "ref_enc"), G711_CASES)
def test_g711_round_trip(name: str, dec: Any, enc: Any, ref_dec: str, ref_enc: str) -> None:
    every_code = bytes(range(256))
    again = enc(dec(every_code))
    # each code decodes to its reconstruction level, which encodes back to the same code; mu-law's
    # two zeros (0x7F = -0, 0xFF = +0) decode to 0, which encodes as +0
    differ = [c for c, d in zip(every_code, again, strict=True) if c != d]
    assert differ == ([0x7F] if name == "mulaw" else [])
    # levels are odd-symmetric and strictly ordered within each sign
    levels = dec(every_code).astype(np.int32)
    assert sorted(set(levels.tolist())) == sorted(set((-levels).tolist()))
    assert len(set(levels.tolist())) == (255 if name == "mulaw" else 256)
    # telephony quality: a -6 dBFS tone keeps a signal-to-noise ratio well above 30 dB
    x = tone(8000, 1.0, 1000.0)
    y = codecs.decoder(name)(codecs.encoder(name)(x))
    assert y.dtype == np.float32 and y.size == x.size
    snr = 10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2))
    assert snr > 33, snr


@pytest.mark.parametrize("name", ["pcm16", "mulaw", "alaw"])
def test_codecs_are_chunk_invariant(name: str) -> None:
    """Streams may be cut anywhere between samples: chunk by chunk equals all at once."""
    x = (tone(8000, 0.5) + 0.05 * np.random.default_rng(2).standard_normal(4000)).astype(np.float32)
    enc, dec = codecs.encoder(name), codecs.decoder(name)
    whole = enc(x)
    assert len(whole) == x.size * codecs.bytes_per_sample(name)
    cuts = [0, 1, 7, 160, 161, 999, 4000]
    assert b"".join(enc(x[a:b]) for a, b in itertools.pairwise(cuts)) == whole
    width = codecs.bytes_per_sample(name)
    parts = [dec(whole[a * width : b * width]) for a, b in itertools.pairwise(cuts)]
    np.testing.assert_array_equal(np.concatenate(parts), dec(whole))
    assert dec(b"").size == 0 and enc(np.zeros(0, np.float32)) == b""


def test_g711_clips_and_silence() -> None:
    loud = np.array([4.0, -4.0, 1.0, -1.0], np.float32)
    assert codecs.float_to_mulaw(loud) == bytes([0x80, 0x00, 0x80, 0x00])  # full scale, not wrapped
    assert codecs.float_to_alaw(loud) == bytes([0xAA, 0x2A, 0xAA, 0x2A])
    assert codecs.float_to_mulaw(np.zeros(3, np.float32)) == b"\xff\xff\xff"
    assert codecs.float_to_alaw(np.zeros(3, np.float32)) == b"\xd5\xd5\xd5"
    np.testing.assert_allclose(codecs.mulaw_to_float(b"\xff\x7f"), 0.0)
    with pytest.raises(InvalidArgument, match="mono"):
        codecs.float_to_mulaw(np.zeros((2, 2), np.float32))


def test_encoding_registry() -> None:
    E = codecs.AudioEncoding
    for alias, enc in [("pcm16", E.PCM16), ("audio/pcm", E.PCM16), ("PCM16", E.PCM16),
                       ("mulaw", E.MULAW), ("audio/pcmu", E.MULAW), ("g711_ulaw", E.MULAW),
                       ("audio/x-mulaw", E.MULAW), ("alaw", E.ALAW), ("audio/pcma", E.ALAW),
                       ("g711_alaw", E.ALAW), (" A-law ", E.ALAW), (E.ALAW, E.ALAW)]:
        assert codecs.parse_encoding(alias) is enc
    assert E("mulaw") is E.MULAW and str(E.MULAW) == "mulaw"
    with pytest.raises(InvalidArgument, match="pcm16"):
        codecs.parse_encoding("opus")
    with pytest.raises(InvalidArgument):
        codecs.decoder("float32")
    assert codecs.decoder("audio/pcm") is pcm16_to_float
    assert codecs.encoder(E.PCM16) is float_to_pcm16
    with pytest.raises(InvalidArgument, match="even number of bytes"):
        codecs.decoder("pcm16")(b"\x00\x01\x02")
    assert [codecs.bytes_per_sample(e) for e in E] == [2, 1, 1]
    assert codecs.bytes_for_duration("mulaw", 8000, 20) == 160
    assert codecs.bytes_for_duration("pcm16", 24000, 100) == 4800


def test_g711_rates() -> None:
    for name in ("mulaw", "alaw", "audio/pcmu"):
        assert codecs.check_encoding_rate(name, 8000) == 8000
        assert codecs.resolve_rate(name, 0, 24000) == 8000
        assert codecs.resolve_rate(name, None, 16000) == 8000
        with pytest.raises(OutOfRange, match="8000 Hz telephony"):
            codecs.check_encoding_rate(name, 16000)
        with pytest.raises(OutOfRange, match="8000 Hz"):
            codecs.resolve_rate(name, 24000, 24000)
    assert codecs.resolve_rate("pcm16", 0, 24000) == 24000
    assert codecs.resolve_rate("pcm16", 8000, 24000) == 8000
    with pytest.raises(OutOfRange, match="supported"):
        codecs.check_encoding_rate("pcm16", 11025)


@pytest.mark.parametrize("name", ["mulaw", "alaw"])
def test_phone_quality_speech_is_understood(name: str) -> None:
    """A Piper sentence at 8 kHz through G.711 and back is still understood by Whisper."""
    from services.asr import ASRConfig, WhisperASR
    from tests.conftest import say, wer

    text = "Could you book a table for two people at seven o'clock tomorrow evening?"
    wire = codecs.encoder(name)(say(text, 8000))
    assert len(wire) == pytest.approx(8000 * 4, rel=0.5)  # one byte per sample, a few seconds
    heard = resample(codecs.decoder(name)(wire), 8000, 16000)
    asr = WhisperASR.load(ASRConfig())
    try:
        result = asr.transcribe_sync(heard)
    finally:
        asr.close()
    assert wer(text, result.text) < 0.2, result.text

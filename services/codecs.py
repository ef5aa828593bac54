"""Wire encodings of client audio: PCM16 and G.711 telephony audio (mu-law, A-law) at 8 kHz.

Every encoding converts between bytes on the wire and mono float32 samples in [-1, 1), the
format the engines use. The protocol adapters look codecs up by name::

    enc = parse_encoding("audio/pcmu")            # -> AudioEncoding.MULAW
    rate = resolve_rate(enc, requested, default)  # G.711 is always 8000 Hz
    samples = decoder(enc)(payload)               # bytes -> float32
    payload = encoder(enc)(samples)               # float32 -> bytes

G.711 follows ITU-T G.711 (the same bit-exact tables as the reference implementation in
CPython's former ``audioop`` module, which the tests compare against code by code). G.711 is
sample-wise and stateless: one byte is one sample, so a stream may be cut into chunks anywhere
and each chunk decoded or encoded on its own. PCM16 is 2 bytes per sample: a chunk with an odd
byte count is rejected (INVALID_ARGUMENT), as ``pcm16_to_float`` always did.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import cache

import numpy as np

from services.audio import check_rate, float_to_int16, float_to_pcm16, pcm16_to_float
from services.errors import InvalidArgument, OutOfRange

#: Sample rate of G.711 audio (telephony narrowband); no other rate is accepted for it.
G711_RATE = 8000


class AudioEncoding(StrEnum):
    """Audio encodings a client may send and receive (mono in all cases)."""

    PCM16 = "pcm16"
    """Little-endian signed 16-bit linear PCM, any supported rate."""
    MULAW = "mulaw"
    """G.711 mu-law (North America, Japan; OpenAI's ``audio/pcmu``), 8 bits per sample, 8 kHz."""
    ALAW = "alaw"
    """G.711 A-law (Europe and most other countries; OpenAI's ``audio/pcma``), 8 bits, 8 kHz."""


G711: frozenset[AudioEncoding] = frozenset({AudioEncoding.MULAW, AudioEncoding.ALAW})

# Names clients use for the same encodings: OpenAI Realtime GA (`audio/pcm`, `audio/pcmu`,
# `audio/pcma`) and beta (`pcm16`, `g711_ulaw`, `g711_alaw`), and common telephony spellings
# (Twilio sends `audio/x-mulaw`).
_ALIASES: dict[str, AudioEncoding] = {
    **{n: AudioEncoding.PCM16 for n in ("pcm16", "pcm", "audio/pcm", "linear16", "s16le", "pcm_s16le")},
    **{n: AudioEncoding.MULAW for n in ("mulaw", "ulaw", "mu-law", "u-law", "pcmu", "audio/pcmu",
                                        "g711_ulaw", "audio/x-mulaw", "audio/basic")},
    **{n: AudioEncoding.ALAW for n in ("alaw", "a-law", "pcma", "audio/pcma", "g711_alaw",
                                       "audio/x-alaw")},
}


def parse_encoding(name: str | AudioEncoding) -> AudioEncoding:
    """The encoding for a name or alias (case-insensitive); InvalidArgument lists the names."""
    if isinstance(name, AudioEncoding):
        return name
    enc = _ALIASES.get(str(name).strip().lower())
    if enc is None:
        raise InvalidArgument(
            f"unknown audio encoding {name!r}; use one of: pcm16 (audio/pcm), mulaw (audio/pcmu, "
            "g711_ulaw), alaw (audio/pcma, g711_alaw)")
    return enc


def bytes_per_sample(encoding: str | AudioEncoding) -> int:
    """2 for PCM16, 1 for G.711."""
    return 2 if parse_encoding(encoding) is AudioEncoding.PCM16 else 1


def check_encoding_rate(encoding: str | AudioEncoding, sample_rate: int) -> int:
    """``sample_rate`` if the encoding can carry it; OutOfRange otherwise (G.711 is 8000 Hz only)."""
    enc = parse_encoding(encoding)
    if enc in G711:
        if sample_rate != G711_RATE:
            raise OutOfRange(
                f"G.711 {enc.value} audio is {G711_RATE} Hz telephony audio; got a sample rate of "
                f"{sample_rate} Hz. Send {G711_RATE} Hz, or use pcm16 for other rates")
        return sample_rate
    return check_rate(sample_rate)


def resolve_rate(encoding: str | AudioEncoding, sample_rate: int | None, default: int) -> int:
    """The rate to use for a stream: the client's (0/None = unset), else 8000 for G.711, else
    ``default``; checked with ``check_encoding_rate``."""
    enc = parse_encoding(encoding)
    if not sample_rate:
        sample_rate = G711_RATE if enc in G711 else default
    return check_encoding_rate(enc, sample_rate)


def bytes_for_duration(encoding: str | AudioEncoding, sample_rate: int, ms: float) -> int:
    """Bytes that carry ``ms`` milliseconds of audio (whole samples), e.g. for chunking output."""
    return int(sample_rate * ms / 1000) * bytes_per_sample(encoding)


# --- G.711 tables ----------------------------------------------------------------------------------
# Encoding works on the 16-bit sample value (the float is first rounded exactly as for PCM16),
# through a 65536-entry table; decoding through a 256-entry table. Both are built once, vectorized,
# from the G.711 segment rules below.

_MULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_MULAW_BIAS = 0x84  # 132: mu-law adds it so that every segment boundary is a power of two
_MULAW_CLIP = 8159  # largest 14-bit magnitude mu-law represents


def _all_int16() -> np.ndarray:
    """Every 16-bit sample value, in the order of their unsigned bit patterns (table index)."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)


@cache
def _mulaw_encode_table() -> np.ndarray:
    pcm = _all_int16() >> 2  # 14-bit two's complement
    mask = np.where(pcm < 0, 0x7F, 0xFF)  # mu-law inverts all bits; the sign bit is 1 for >= 0
    mag = np.minimum(np.abs(pcm), _MULAW_CLIP) + (_MULAW_BIAS >> 2)
    seg = np.searchsorted(_MULAW_SEG_END, mag, side="left")
    code = (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


@cache
def _alaw_encode_table() -> np.ndarray:
    pcm = _all_int16() >> 3  # 13-bit two's complement
    mask = np.where(pcm >= 0, 0xD5, 0x55)  # A-law inverts the even bits; sign bit 1 for >= 0
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    s = np.minimum(seg, 7)
    code = (s << 4) | (np.where(s < 2, mag >> 1, mag >> s) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


@cache
def _mulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _MULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _MULAW_BIAS - t, t - _MULAW_BIAS).astype(np.int16)


@cache
def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


@cache
def _float_table(name: str) -> np.ndarray:
    table = _mulaw_decode_table() if name == "mulaw" else _alaw_decode_table()
    return (table.astype(np.float32) / 32768.0).astype(np.float32)


def mulaw_encode_int16(samples: np.ndarray) -> bytes:
    """16-bit linear samples -> G.711 mu-law bytes."""
    x = np.ascontiguousarray(samples, dtype=np.int16)
    return _mulaw_encode_table()[x.view(np.uint16)].tobytes()


def alaw_encode_int16(samples: np.ndarray) -> bytes:
    """16-bit linear samples -> G.711 A-law bytes."""
    x = np.ascontiguousarray(samples, dtype=np.int16)
    return _alaw_encode_table()[x.view(np.uint16)].tobytes()


def mulaw_decode_int16(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> 16-bit linear samples."""
    return _mulaw_decode_table()[np.frombuffer(data, dtype=np.uint8)]


def alaw_decode_int16(data: bytes) -> np.ndarray:
    """G.711 A-law bytes -> 16-bit linear samples."""
    return _alaw_decode_table()[np.frombuffer(data, dtype=np.uint8)]


def mulaw_to_float(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> float32 in [-1, 1)."""
    return _float_table("mulaw")[np.frombuffer(data, dtype=np.uint8)]


def alaw_to_float(data: bytes) -> np.ndarray:
    """G.711 A-law bytes -> float32 in [-1, 1)."""
    return _float_table("alaw")[np.frombuffer(data, dtype=np.uint8)]


def float_to_mulaw(samples: np.ndarray) -> bytes:
    """Mono float audio (clipped to [-1, 1]) -> G.711 mu-law bytes."""
    return mulaw_encode_int16(float_to_int16(samples))


def float_to_alaw(samples: np.ndarray) -> bytes:
    """Mono float audio (clipped to [-1, 1]) -> G.711 A-law bytes."""
    return alaw_encode_int16(float_to_int16(samples))


# --- registry --------------------------------------------------------------------------------------

Decoder = Callable[[bytes], np.ndarray]
Encoder = Callable[[np.ndarray], bytes]

_DECODERS: dict[AudioEncoding, Decoder] = {
    AudioEncoding.PCM16: pcm16_to_float,
    AudioEncoding.MULAW: mulaw_to_float,
    AudioEncoding.ALAW: alaw_to_float,
}
_ENCODERS: dict[AudioEncoding, Encoder] = {
    AudioEncoding.PCM16: float_to_pcm16,
    AudioEncoding.MULAW: float_to_mulaw,
    AudioEncoding.ALAW: float_to_alaw,
}


def decoder(encoding: str | AudioEncoding) -> Decoder:
    """bytes -> mono float32 in [-1, 1) for ``encoding``; stateless, so any chunking works
    (PCM16 chunks must hold whole samples)."""
    return _DECODERS[parse_encoding(encoding)]


def encoder(encoding: str | AudioEncoding) -> Encoder:
    """Mono float audio -> bytes in ``encoding``; stateless (one call per chunk)."""
    return _ENCODERS[parse_encoding(encoding)]

"""How one gRPC stream's audio travels: the client's encoding and rate, negotiated once from its
config, then every audio message decoded (and every answer chunk encoded) by its ``AudioWire``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protos.voxserve.v1 import voice_pb2 as pb
from services.audio import MODEL_RATE, pcm16_to_float
from services.codecs import AudioEncoding, decoder, encoder, resolve_rate
from services.errors import InvalidArgument, ResourceExhausted

_ENCODINGS: dict[int, AudioEncoding] = {
    pb.AUDIO_ENCODING_UNSPECIFIED: AudioEncoding.PCM16, pb.PCM16: AudioEncoding.PCM16,
    pb.MULAW: AudioEncoding.MULAW, pb.ALAW: AudioEncoding.ALAW}


def encoding_of(value: int) -> AudioEncoding:
    """The encoding of a protobuf ``AudioEncoding`` value (unspecified = PCM16)."""
    if value == pb.FLOAT32:
        raise InvalidArgument("FLOAT32 audio is not supported; send PCM16 (little-endian, mono) or G.711")
    if value not in _ENCODINGS:
        raise InvalidArgument(f"unknown audio encoding {value}; send PCM16, MULAW or ALAW")
    return _ENCODINGS[value]


@dataclass(frozen=True)
class AudioWire:
    """One stream's audio: client bytes (``input`` at ``input_rate``, at most ``max_bytes`` a
    message) -> float32; the engine's PCM16 answer -> the client's ``output`` encoding."""

    input: AudioEncoding
    input_rate: int
    max_bytes: int
    output: AudioEncoding = AudioEncoding.PCM16
    output_rate: int = 0
    _decode: Callable[[bytes], np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_decode", decoder(self.input))

    @classmethod
    def for_session(cls, cfg: pb.SessionConfig, *, voice_rate: int, max_bytes: int) -> AudioWire:
        """A Converse stream's audio both ways (rates: the client's, else 16 kHz in and the
        voice's own rate out; G.711 is 8 kHz); INVALID_ARGUMENT/OUT_OF_RANGE for what cannot be."""
        in_enc, out_enc = encoding_of(cfg.input_encoding), encoding_of(cfg.output_encoding)
        return cls(in_enc, resolve_rate(in_enc, cfg.input_sample_rate, MODEL_RATE), max_bytes,
                   out_enc, resolve_rate(out_enc, cfg.output_sample_rate, voice_rate))

    @classmethod
    def for_input(cls, encoding: int, sample_rate: int, *, max_bytes: int) -> AudioWire:
        """Audio in only (Transcribe)."""
        enc = encoding_of(encoding)
        return cls(enc, resolve_rate(enc, sample_rate, MODEL_RATE), max_bytes)

    def decode(self, data: bytes) -> np.ndarray:
        """One audio message as float32 (RESOURCE_EXHAUSTED over ``max_bytes``)."""
        if len(data) > self.max_bytes:
            raise ResourceExhausted(f"audio message of {len(data)} bytes exceeds the {self.max_bytes}-byte limit; "
                                    "send smaller chunks (20-100 ms each)")
        return self._decode(data)

    def encode(self, pcm16: bytes) -> bytes:
        """Answer audio (PCM16 from the engine) in the client's output encoding."""
        if self.output is AudioEncoding.PCM16:
            return pcm16
        return encoder(self.output)(pcm16_to_float(pcm16))

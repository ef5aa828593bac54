"""Moonshine ASR engine: fast English speech recognition on CPU, batched across sessions.

Moonshine's encoder takes the audio as it is (no fixed 30 s window as in Whisper), so a 2 s
question decodes in ~100 ms where Whisper base takes ~1 s. The weights come from the
``moonshine-voice`` wheel (0.1.0, the last version that ships them: ``encoder_model.ort``,
``decoder_model_merged.ort``, ``tokenizer.bin``); we run them with onnxruntime ourselves, because
the package's C library decodes one utterance per call.

A batch of utterances is decoded as the C library decodes one (greedy, at most 6.5 tokens per
second of audio, 15 s segments), and every transcript equals the one decoded alone:

- The shipped model is int8 with activations quantized per tensor, so batch rows would change
  each other's rounding (one transcript in ten changed in batches of eight). The decoder used for
  batches is rewritten to quantize each row on its own (services/row_quantization.py); a load-time
  check compares a batched row with the same row decoded alone, bit for bit.
- The encoder runs once per utterance: padding would change its normalisation statistics, and
  most of the per-step overhead that batching saves is in the decoder anyway.
- The decoder runs the whole batch each step: encoder outputs are zero-padded and masked so that
  each row attends to its own frames only, and rows that reach their end token leave the batch
  (their transcript is handed back at once, before the longer ones finish).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.asr_base import ASRConfig, DecodeRequest, PooledASR, Transcript
from services.audio import MODEL_RATE
from services.batching import Deliver
from services.errors import InvalidArgument, NotFound
from services.models import MOONSHINE_PIP, default_moonshine_model

#: Quiet a decode gets before and after the speech (zeros are added where the audio has less).
#: Speech starting at the first sample often got an invented prefix ("10. The quick brown
#: fox..."): 0.1-0.3 s of quiet before it removed that on Piper speech (WER 2.8% -> 0.5%).
#: With under ~0.5 s of quiet after it, 13-26% of finished sentences ended with a comma
#: instead of a full stop, which reads as "more to come" to the end-of-turn check; with 0.5 s,
#: none did. Our VAD's pre-roll usually provides the lead-in; a speculative decode started
#: 200 ms into the silence gets ~0.3 s added (~15 ms more decode).
LEAD_IN_S = 0.2
LEAD_OUT_S = 0.5
_QUIET = 0.01  # ~-40 dBFS
#: Moonshine Tiny sometimes wraps a whole line in quotes ('"\'Please turn off the lights.\'').
_QUOTES = "\"'“”‘’"

#: As Moonshine's own transcriber: a decode stops after ceil(seconds * 6.5) tokens (a looping
#: decode cannot run away), and audio longer than 15 s is decoded in pieces.
MAX_TOKENS_PER_SECOND = 6.5
MAX_SEGMENT_S = 15.0
#: Where a long utterance is cut: at the quietest 32 ms within this much before the limit.
_CUT_SEARCH_S = 2.0
_FRAME = 512

#: Audio samples per encoder frame (the encoder's convolution strides: 64 * 3 * 2).
SAMPLES_PER_FRAME = 384

START_TOKEN = 1
END_TOKEN = 2
#: The tokenizer's word separator (SentencePiece's '▁'), a space in text.
_SPACE = "\u2581"

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_model.ort"
DECODER_FILE = "decoder_model_merged.ort"
TOKENIZER_FILE = "tokenizer.bin"

#: Architectures in a Moonshine model folder name (e.g. 'base-en'), most specific first.
_ARCHS = ("medium-streaming", "small-streaming", "base-streaming", "tiny-streaming", "base", "tiny")
_MODEL_FILES_HINT = f"{ENCODER_FILE}, {DECODER_FILE} and {TOKENIZER_FILE}"


def model_arch_name(folder: Path) -> str:
    """Architecture named by a model folder ('tiny-en' -> 'tiny'); 'tiny' when none is named."""
    name = folder.name.lower()
    return next((arch for arch in _ARCHS if arch in name), "tiny")


def model_language(folder: Path) -> str:
    """Language suffix of a model folder ('base-es' -> 'es'); English when there is none."""
    m = re.search(r"-([a-z]{2})$", folder.name.lower())
    return m.group(1) if m else "en"


def model_folder(value: str) -> Path:
    """The Moonshine model folder a config names: '' = embedded Tiny English, else a folder."""
    if not value:
        return Path(default_moonshine_model())
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise NotFound(
            f"Moonshine model folder not found: {value}. Give a local folder with "
            f"{_MODEL_FILES_HINT} (hub ids are not supported: downloads are off), or '' for the "
            "embedded Tiny English model"
        )
    if not (folder / TOKENIZER_FILE).is_file() or not any(folder.glob("*.ort")):
        raise NotFound(f"no Moonshine model in {folder}: expected {_MODEL_FILES_HINT}")
    return folder


def with_quiet_edges(x: np.ndarray) -> np.ndarray:
    """``x`` with zeros added so that speech starts at least ``LEAD_IN_S`` in and is followed by at
    least ``LEAD_OUT_S`` of quiet."""
    loud = np.flatnonzero(np.abs(x) > _QUIET)
    lead = int(loud[0]) if loud.size else x.size
    tail = x.size - 1 - int(loud[-1]) if loud.size else x.size
    before = max(0, int(LEAD_IN_S * MODEL_RATE) - lead)
    after = max(0, int(LEAD_OUT_S * MODEL_RATE) - tail)
    if not before and not after:
        return x
    return np.concatenate([np.zeros(before, np.float32), x, np.zeros(after, np.float32)])


def split_for_model(x: np.ndarray, max_s: float = MAX_SEGMENT_S) -> list[np.ndarray]:
    """``x`` cut into pieces of at most ``max_s``, each cut at the quietest 32 ms frame in the
    last ``_CUT_SEARCH_S`` before the limit (a pause between words, where there is one)."""
    limit = int(max_s * MODEL_RATE)
    search = min(int(_CUT_SEARCH_S * MODEL_RATE), limit // 2)
    pieces = []
    start = 0
    while x.size - start > limit:
        lo = start + limit - search
        frames = x[lo : start + limit][: search // _FRAME * _FRAME].reshape(-1, _FRAME)
        quietest = int(np.argmin(np.square(frames).mean(axis=1)))
        cut = lo + quietest * _FRAME + _FRAME // 2
        pieces.append(x[start:cut])
        start = cut
    pieces.append(x[start:])
    return pieces


#: Moonshine Tiny learned some old spellings ("to-night"); the LLM and our WER want today's.
_OLD_SPELLINGS = re.compile(r"\b([Tt])o-(day|night|morrow)\b")


def clean_line(text: str) -> str:
    """A decoded line without surrounding whitespace, without quotes wrapped around it all, and
    with 'to-night', 'to-morrow', 'to-day' spelled as one word."""
    text = text.strip()
    if text[:1] in _QUOTES:
        text = text.lstrip(_QUOTES).rstrip(_QUOTES).strip()
    return _OLD_SPELLINGS.sub(r"\1o\2", text)


class MoonshineTokenizer:
    """Moonshine's ``tokenizer.bin``: the bytes of each token, in id order, each preceded by its
    length (one byte below 128, else two: ``second * 128 + first - 128``)."""

    def __init__(self, pieces: list[bytes]) -> None:
        if not pieces:
            raise InvalidArgument("a Moonshine tokenizer needs at least one token")
        self.pieces = pieces
        # '<s>', '</s>', '<unk>'...: not text
        self.special = frozenset(i for i, b in enumerate(pieces)
                                 if len(b) > 2 and b[:1] == b"<" and b[-1:] == b">")

    @classmethod
    def load(cls, path: Path) -> MoonshineTokenizer:
        data = path.read_bytes()
        pieces: list[bytes] = []
        i = 0
        while i < len(data):
            n = data[i]
            i += 1
            if n >= 128:
                if i >= len(data):
                    raise InvalidArgument(f"{path} is not a Moonshine tokenizer (truncated)")
                n = data[i] * 128 + n - 128
                i += 1
            if i + n > len(data):
                raise InvalidArgument(f"{path} is not a Moonshine tokenizer (truncated)")
            pieces.append(data[i : i + n])
            i += n
        return cls(pieces)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids: special tokens skipped, '▁' as spaces, surrounding space trimmed."""
        raw = b"".join(self.pieces[t] for t in ids if t not in self.special and 0 <= t < len(self.pieces))
        return raw.decode("utf-8", errors="replace").replace(_SPACE, " ").strip()


class MoonshineModel:
    """Moonshine's ONNX encoder and merged decoder (with its key/value cache) on onnxruntime."""

    def __init__(self, folder: Path, num_threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # the level the C library uses (the .ort files are already optimised)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(folder / ENCODER_FILE), opts, providers=providers)
        self.decoder = ort.InferenceSession(str(folder / DECODER_FILE), opts, providers=providers)
        self.tokenizer = MoonshineTokenizer.load(folder / TOKENIZER_FILE)
        inputs = {i.name: i.shape for i in self.decoder.get_inputs()}
        self.cache_names = sorted(n[len("past_key_values."):] for n in inputs if n.startswith("past_key_values."))
        needed = {"input_ids", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch"}
        if not self.cache_names or not needed <= set(inputs):
            raise InvalidArgument(f"{folder / DECODER_FILE} is not a Moonshine merged decoder "
                                  f"(inputs: {sorted(inputs)})")
        heads, head_dim = inputs["past_key_values." + self.cache_names[0]][1::2]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise InvalidArgument(f"{folder / DECODER_FILE}: cache shape {heads}x{head_dim} is not fixed")
        self.heads, self.head_dim = heads, head_dim
        self.self_cache = [n for n in self.cache_names if ".decoder." in n]
        self._first_outputs = ["logits"] + [f"present.{n}" for n in self.cache_names]
        self._next_outputs = ["logits"] + [f"present.{n}" for n in self.self_cache]
        self._opts = opts
        self._decoder_path = folder / DECODER_FILE
        self.batch_decoder: Any = None
        """The decoder with activations quantized per row (services/row_quantization.py), for
        batches of two or more; None until ``enable_batching`` succeeds."""

    def enable_batching(self) -> bool:
        """Build the batch-safe decoder and check that a batched row equals the same row decoded
        alone (bit for bit); False (and no batching) if the model cannot be made batch-safe."""
        import onnxruntime as ort

        from services.row_quantization import load_as_onnx, per_row_quantization

        try:
            graph = load_as_onnx(self._decoder_path)
            if per_row_quantization(graph):
                session = ort.InferenceSession(graph.SerializeToString(), self._opts,
                                               providers=["CPUExecutionProvider"])
            else:  # not quantized: rows never mixed
                session = self.decoder
        except (InvalidArgument, NotFound) as exc:
            log.warning("Moonshine decodes one utterance at a time: %s", exc.message)
            return False
        t = np.arange(int(1.3 * MODEL_RATE)) / MODEL_RATE
        probes = [self.encode((0.3 * np.sin(2 * np.pi * f * t[:n])).astype(np.float32))
                  for f, n in ((220, t.size), (330, t.size * 2 // 3))]
        alone = [self._first_logits(self.decoder, [h])[0] for h in probes]
        together = self._first_logits(session, probes)
        if not all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True)):
            log.warning("Moonshine decodes one utterance at a time: a batched row differed from "
                        "the same row decoded alone")
            return False
        self.batch_decoder = session
        return True

    def _first_logits(self, decoder: Any, hidden: list[np.ndarray]) -> np.ndarray:
        feeds = self._feeds(hidden)
        logits: np.ndarray = decoder.run(["logits"], feeds)[0][:, -1]
        return logits

    def _feeds(self, hidden: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs of the first decoder step for encoded utterances (zero-padded to the longest)."""
        batch = len(hidden)
        frames = max(h.shape[0] for h in hidden)
        enc = np.zeros((batch, frames, hidden[0].shape[1]), np.float32)
        valid = np.zeros((batch, frames), np.int64)
        for i, h in enumerate(hidden):
            enc[i, : h.shape[0]] = h
            valid[i, : h.shape[0]] = 1
        # The decoder takes a mask over audio samples and keeps every SAMPLES_PER_FRAME-th one
        # (then the first `frames`); this one keeps exactly each row's own frames.
        return {"input_ids": np.full((batch, 1), START_TOKEN, np.int64),
                "encoder_hidden_states": enc,
                "encoder_attention_mask": np.repeat(valid, SAMPLES_PER_FRAME, axis=1),
                "use_cache_branch": np.array([False]),
                **{f"past_key_values.{n}": np.zeros((batch, self.heads, 1, self.head_dim), np.float32)
                   for n in self.cache_names}}

    def encode(self, x: np.ndarray) -> np.ndarray:
        """[frames, dim] encoder output of one utterance (never batched: see the module doc)."""
        x = np.ascontiguousarray(x, dtype=np.float32)[None]
        out = self.encoder.run(None, {"input_values": x, "attention_mask": np.ones(x.shape, np.int64)})
        hidden: np.ndarray = out[0][0]
        return hidden

    def generate(self, hidden: Sequence[np.ndarray], max_tokens: Sequence[int],
                 done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """Greedy token ids (end token included, if reached) for each encoded utterance, decoded
        together. ``done(i, ids)`` is called as soon as row ``i`` ends."""
        if len(hidden) > 1 and self.batch_decoder is None:
            raise InvalidArgument("this Moonshine model decodes one utterance at a time")
        feeds = self._feeds(hidden)
        tokens: list[list[int]] = [[] for _ in hidden]
        live = list(range(len(hidden)))  # original index of each row still decoding
        step = 0
        while live:
            # the per-row decoder only while rows share the run: alone, the original is faster
            # and gives the same numbers
            decoder = self.batch_decoder if len(live) > 1 else self.decoder
            names = self._next_outputs if step else self._first_outputs
            outs = decoder.run(names, feeds)
            for name, value in zip(names[1:], outs[1:], strict=True):
                feeds["past_key_values." + name[len("present."):]] = value
            picked = outs[0][:, -1, :].argmax(axis=-1)
            keep = []
            for row, i in enumerate(live):
                token = int(picked[row])
                tokens[i].append(token)
                if token == END_TOKEN or len(tokens[i]) >= max_tokens[i]:
                    if done is not None:
                        done(i, tokens[i])
                else:
                    keep.append(row)
            step += 1
            feeds["use_cache_branch"] = np.array([True])
            if len(keep) < len(live):
                rows = np.array(keep, np.int64)
                feeds = {k: (v if k == "use_cache_branch" else v[rows]) for k, v in feeds.items()}
                picked = picked[rows]
                live = [live[r] for r in keep]
            feeds["input_ids"] = np.ascontiguousarray(picked, dtype=np.int64).reshape(-1, 1)
        return tokens


class MoonshineASR(PooledASR):
    """One Moonshine model shared by every session of a process: utterances that arrive together
    are decoded in one batch (``ASRConfig.max_batch``, 8 by default)."""

    def __init__(self, model: MoonshineModel, cfg: ASRConfig, name: str,
                 languages: frozenset[str]) -> None:
        wanted = cfg.max_batch or 8
        batch = wanted if wanted > 1 and (model.batch_decoder is not None or model.enable_batching()) else 1
        super().__init__(cfg, cfg.max_concurrent or 1, batch)
        self.model = model
        self.name = name
        self.languages = languages

    @classmethod
    def load(cls, cfg: ASRConfig | None = None) -> MoonshineASR:
        """Load ``cfg.moonshine_model`` ('' = embedded Tiny English)."""
        cfg = cfg or ASRConfig()
        folder = model_folder(cfg.moonshine_model)
        arch = model_arch_name(folder)
        if "streaming" in arch:
            raise InvalidArgument(f"{folder} holds a streaming Moonshine model ({arch}); give a "
                                  f"non-streaming one ({_MODEL_FILES_HINT})")
        missing = [f for f in (ENCODER_FILE, DECODER_FILE) if not (folder / f).is_file()]
        if missing:
            raise NotFound(f"no Moonshine model in {folder}: {', '.join(missing)} missing "
                           f"(expected {_MODEL_FILES_HINT}; the embedded one comes with "
                           f"pip install {MOONSHINE_PIP})")
        try:
            model = MoonshineModel(folder)
        except InvalidArgument:
            raise
        except Exception as exc:  # onnxruntime raises its own types for bad files
            raise InvalidArgument(f"cannot load the Moonshine model in {folder}: {exc}") from exc
        embedded = not cfg.moonshine_model
        name = "moonshine-tiny-en" if embedded else f"moonshine:{folder.name}"
        return cls(model, cfg, name, frozenset({model_language(folder)}))

    def _language(self, language: str | None) -> str | None:
        lang = super()._language(language)
        if lang is None:
            raise InvalidArgument(
                f"{self.name} cannot detect the language (it transcribes "
                f"{', '.join(sorted(self.languages))}); give a language, or use Whisper "
                "(asr.engine 'auto' or 'whisper') for detection"
            )
        return lang

    def decode_batch(self, requests: Sequence[DecodeRequest],
                     deliver: Deliver | None = None) -> list[Transcript]:
        t0 = time.perf_counter()
        owner: list[int] = []  # request of each piece
        hidden: list[np.ndarray] = []
        max_tokens: list[int] = []
        for k, r in enumerate(requests):
            for piece in split_for_model(r.audio):
                audio = with_quiet_edges(piece)
                owner.append(k)
                hidden.append(self.model.encode(audio))
                max_tokens.append(int(np.ceil(audio.size / MODEL_RATE * MAX_TOKENS_PER_SECOND)))
        left = [owner.count(k) for k in range(len(requests))]
        texts: list[list[str]] = [[""] * left[k] for k in range(len(requests))]
        first_piece = [owner.index(k) for k in range(len(requests))]
        results: list[Transcript | None] = [None] * len(requests)

        def piece_done(p: int, ids: list[int]) -> None:
            k = owner[p]
            texts[k][p - first_piece[k]] = clean_line(self.model.tokenizer.decode(ids))
            left[k] -= 1
            if left[k] == 0:
                r = requests[k]
                assert r.language is not None
                results[k] = Transcript(" ".join(filter(None, texts[k])), r.language,
                                        r.audio.size / MODEL_RATE, time.perf_counter() - t0, 1.0,
                                        self.name, len(requests))
                if deliver is not None:
                    deliver(k, results[k])

        if self.model.batch_decoder is not None:
            self.model.generate(hidden, max_tokens, piece_done)
        else:  # one row at a time (a long utterance's pieces too)
            for p, (h, limit) in enumerate(zip(hidden, max_tokens, strict=True)):
                piece_done(p, self.model.generate([h], [limit])[0])
        return [r for r in results if r is not None]

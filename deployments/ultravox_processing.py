"""Audio processor for Ultravox checkpoints, loaded by vLLM as remote code.

vLLM ships a model class for Ultravox but no processor: it loads the checkpoint's own
``ultravox_processing.UltravoxProcessor`` through ``trust_remote_code``. Checkpoints saved
locally lack that file, and the one published with older checkpoints predates transformers 5.
``deployments.checkpoints.fix_checkpoint`` copies THIS file into a checkpoint (as
``ultravox_processing.py``) and points ``processor_config.json``'s ``auto_map`` at it.

The file must stay self-contained (numpy, torch, transformers only): transformers imports it
from a copy in its dynamic-module cache, not from the voxserve package.

What vLLM expects from it (``vllm/model_executor/models/ultravox.py``):
- attributes ``audio_processor`` (a ``WhisperFeatureExtractor``), ``audio_token_replacement``
  and ``audio_replacement_token_id`` (vLLM overwrites the last two);
- ``__call__(text=..., audios=[...], sampling_rate=..., include_audio_num_chunks=True)``
  returning ``audio_values`` (chunks, mel bins, frames), ``audio_lens`` (valid frames per chunk),
  ``audio_token_len`` (language-model tokens per chunk) and ``audio_num_chunks`` (per audio).

Token count per chunk: the Whisper encoder halves the frame count (stride-2 conv), the projector
stacks ``stack_factor`` frames into one token: ``ceil(ceil(frames / 2) / stack_factor)``, i.e.
6.25 tokens per second of audio with the usual factors (2, 8). Audio longer than the encoder's
context (3000 frames = 30 s) is split into several chunks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from transformers import BatchFeature, ProcessorMixin


class UltravoxProcessor(ProcessorMixin):
    """Whisper log-mel features + placeholder expansion for Ultravox (Whisper encoder + LLM)."""

    audio_processor: Any  # set by ProcessorMixin.__init__ from the argument of that name

    def __init__(
        self,
        audio_processor: Any = None,
        tokenizer: Any = None,
        audio_placeholder: str = "<|audio|>",
        audio_token_replacement: str = "<|audio|>",
        encoder_ds_factor: int = 2,
        stack_factor: int = 8,
        audio_context_size: int = 3000,
        chat_template: str | None = None,
    ) -> None:
        self.audio_placeholder = audio_placeholder
        self.audio_token_replacement = audio_token_replacement
        self.encoder_ds_factor = int(encoder_ds_factor)
        self.stack_factor = int(stack_factor)
        self.audio_context_size = int(audio_context_size)
        super().__init__(audio_processor, tokenizer, chat_template=chat_template)
        self.audio_replacement_token_id = (
            tokenizer.convert_tokens_to_ids(audio_token_replacement) if tokenizer is not None else None
        )

    @property
    def feature_extractor(self) -> Any:
        return self.audio_processor

    def tokens_for_frames(self, frames: int) -> int:
        """Language-model tokens that ``frames`` valid mel frames of one chunk turn into."""
        return math.ceil(math.ceil(frames / self.encoder_ds_factor) / self.stack_factor)

    def _chunks(self, audio: np.ndarray) -> list[np.ndarray]:
        hop = int(self.audio_processor.hop_length)
        size = self.audio_context_size * hop
        # Pad to whole hops (at least two): every chunk then has ceil(samples / hop) valid
        # frames whether or not it is padded further in the batch, so token counts are
        # predictable from the audio length alone.
        padded = max(2 * hop, -(-audio.size // hop) * hop)
        audio = np.pad(audio, (0, padded - audio.size))
        return [audio[i : i + size] for i in range(0, audio.size, size)]

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio: Any = None,
        audios: Any = None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        include_audio_num_chunks: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        fe = self.audio_processor
        items = audios if audios is not None else audio
        if items is None:
            items = []
        elif isinstance(items, np.ndarray) and items.ndim == 2:
            items = list(items)  # a batch of equal-length audios
        elif not isinstance(items, list | tuple):
            items = [items]
        if sampling_rate is not None and int(sampling_rate) != int(fe.sampling_rate):
            raise ValueError(
                f"audio must be sampled at {fe.sampling_rate} Hz; got {sampling_rate} Hz"
            )

        data: dict[str, Any] = {}
        tokens_per_audio: list[int] = []
        if items:
            chunks: list[np.ndarray] = []
            num_chunks: list[int] = []
            for item in items:
                arr = np.asarray(item.cpu().numpy() if hasattr(item, "cpu") else item,
                                 dtype=np.float32).reshape(-1)
                parts = self._chunks(arr)
                chunks.extend(parts)
                num_chunks.append(len(parts))
            feats = fe(
                chunks,
                sampling_rate=fe.sampling_rate,
                padding="longest",
                return_attention_mask=True,
                return_tensors="np",
            )
            lens = feats["attention_mask"].sum(-1).astype(np.int64)
            token_len = np.array([self.tokens_for_frames(int(n)) for n in lens], dtype=np.int64)
            data["audio_values"] = feats["input_features"].astype(np.float32)
            data["audio_lens"] = lens
            data["audio_token_len"] = token_len
            if include_audio_num_chunks:
                data["audio_num_chunks"] = np.array(num_chunks, dtype=np.int64)
            start = 0
            for n in num_chunks:
                tokens_per_audio.append(int(token_len[start : start + n].sum()))
                start += n

        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            expanded = []
            audio_idx = 0
            for t in texts:
                pieces = t.split(self.audio_placeholder)
                out = pieces[0]
                for piece in pieces[1:]:
                    if audio_idx >= len(tokens_per_audio):
                        raise ValueError(
                            f"more {self.audio_placeholder} placeholders than audios "
                            f"({len(tokens_per_audio)})"
                        )
                    out += self.audio_token_replacement * tokens_per_audio[audio_idx] + piece
                    audio_idx += 1
                expanded.append(out)
            if audio_idx != len(tokens_per_audio):
                raise ValueError(
                    f"{len(tokens_per_audio)} audios but {audio_idx} "
                    f"{self.audio_placeholder} placeholders in the text"
                )
            enc = self.tokenizer(expanded, add_special_tokens=False)
            data["input_ids"] = enc["input_ids"]
            data["attention_mask"] = enc["attention_mask"]
            if return_tensors is not None and len({len(x) for x in enc["input_ids"]}) > 1:
                return_tensors = None  # ragged batches stay lists

        return BatchFeature(data, tensor_type=return_tensors)

"""Speech-native mode: helpers for audio-input LLMs (Ultravox, Qwen2-Audio) served by vLLM.

Framework-free (no Ray, no vLLM import): ``services.llm`` and the deployments call these to
recognise an audio LLM, build its prompt and pick its engine arguments. Repairing a checkpoint
(weight names, a missing processor) is provisioning, not serving: ``deployments.checkpoints``.

Supported architectures (``config.json``):

- ``ultravox``: Whisper encoder + stacking projector + a Llama-family LLM (``UltravoxModel``).
  One ``<|audio|>`` placeholder per audio in the user turn; vLLM expands it to about 6.25
  tokens per second of audio. Needs ``trust_remote_code`` (vLLM ships no Ultravox processor).
- ``qwen2_audio``: Whisper-style encoder + linear projector + Qwen2
  (``Qwen2AudioForConditionalGeneration``). One ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>``
  line per audio; vLLM expands ``<|AUDIO|>`` to 25 tokens per second of audio (at most 30 s).

Usage by the engine::

    path = resolve_llm(cfg.model)  # deployments.checkpoints.fix_checkpoint first
    arch = detect_audio_arch(path)                                  # None: cascade-only model
    engine_args = AsyncEngineArgs(model=path, **engine_kwargs(arch), ...)
    prompt = build_audio_prompt(arch, tokenizer, history, audio_count=1)
    engine.generate({"prompt": prompt,
                     "multi_modal_data": {"audio": (samples_16k, 16000)}}, params, request_id)

How conversation history is kept in speech-native mode
-------------------------------------------------------
Earlier turns are kept as TEXT: the user's earlier utterances as their ASR transcripts, the
assistant's turns as the text that was actually spoken (truncated at a barge-in). Only the
CURRENT utterance goes in as audio, as the last user turn. Reasons:

- bounded context and compute: audio costs 6-25 prompt tokens per second (a 10 s utterance is
  250 Qwen2-Audio tokens, the size of a whole text exchange) plus an encoder pass; re-sending
  every earlier utterance as audio would grow prefill cost with the conversation length and
  run out of ``max_model_len`` after a few turns;
- no audio cache across requests: vLLM re-encodes every audio item of every request, so audio
  history is paid again on each turn;
- the transcripts exist anyway: the ASR stage runs in parallel (captions for the client,
  fallback to cascade), so the text of each earlier turn is free;
- what is lost: the tone of *earlier* turns. The tone of the current turn, which is what the
  answer reacts to, is kept.

``build_audio_prompt`` takes the text history plus the number of audios of the current turn
and inserts the architecture's placeholders into the last user turn.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from services.errors import InvalidArgument, NotFound, OutOfRange

AudioArch = Literal["ultravox", "qwen2_audio"]
ULTRAVOX: AudioArch = "ultravox"
QWEN2_AUDIO: AudioArch = "qwen2_audio"

#: Sample rate every supported audio LLM takes (Whisper features).
AUDIO_RATE = 16000
#: The Whisper encoders see at most 30 s at once; Qwen2-Audio truncates longer audio.
MAX_AUDIO_S = 30.0

_BY_MODEL_TYPE: dict[str, AudioArch] = {"ultravox": ULTRAVOX, "qwen2_audio": QWEN2_AUDIO}
_BY_ARCHITECTURE: dict[str, AudioArch] = {
    "UltravoxModel": ULTRAVOX,
    "Qwen2AudioForConditionalGeneration": QWEN2_AUDIO,
}
#: Strings that must only appear where build_audio_prompt puts them.
_SPECIAL: dict[AudioArch, tuple[str, ...]] = {
    ULTRAVOX: ("<|audio|>",),
    QWEN2_AUDIO: ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"),
}



# --- locating and recognising -------------------------------------------------------------------


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_local_model(model: str | Path) -> bool:
    s = str(model)
    return isinstance(model, Path) or s.startswith(("/", ".", "~")) or Path(s).expanduser().exists()


def local_model_dir(model_path_or_id: str | Path, download: bool = False) -> Path:
    """The local folder of a model: the path itself, or a hub id's snapshot in the HF cache.

    With ``download=True`` (and not offline) a hub id missing from the cache is downloaded,
    which is what vLLM would do with it anyway. Raises NotFound otherwise.
    """
    if is_local_model(model_path_or_id):
        path = Path(model_path_or_id).expanduser()
        if not path.is_dir():
            raise NotFound(f"model folder not found: {path}")
        return path
    repo = str(model_path_or_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:
        if not download or _offline():
            raise NotFound(
                f"model '{repo}' is not in the local Hugging Face cache; download it first "
                "(e.g. `huggingface-cli download " + repo + "`) or pass a local folder"
            ) from exc
    try:
        return Path(snapshot_download(repo))
    except Exception as exc:
        raise NotFound(f"cannot download model '{repo}': {exc}") from exc


def read_model_config(model_path_or_id: str | Path) -> dict[str, Any] | None:
    """config.json of a local folder or of a hub id (cache first, then the hub unless offline)."""
    if is_local_model(model_path_or_id):
        cfg = Path(model_path_or_id).expanduser() / "config.json"
        if not cfg.is_file():
            return None
        try:
            data = json.loads(cfg.read_text())
        except ValueError as exc:
            raise InvalidArgument(f"{cfg} is not valid JSON: {exc}") from exc
        return data if isinstance(data, dict) else None
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):
        if not local_only and _offline():
            break
        try:
            path = hf_hub_download(str(model_path_or_id), "config.json",
                                   local_files_only=local_only)
            return json.loads(Path(path).read_text())
        except Exception:
            continue
    return None


def detect_audio_arch(model_path_or_id: str | Path) -> AudioArch | None:
    """"ultravox", "qwen2_audio" or None (a text-only or unknown model) from config.json."""
    cfg = read_model_config(model_path_or_id)
    if not cfg:
        return None
    if cfg.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[cfg["model_type"]]
    for name in cfg.get("architectures") or []:
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    return None


# --- prompts ------------------------------------------------------------------------------------


def audio_placeholder(arch: AudioArch, index: int = 1) -> str:
    """The text that stands for the ``index``-th (1-based) audio of a prompt."""
    if arch == ULTRAVOX:
        return "<|audio|>"
    if arch == QWEN2_AUDIO:
        return f"Audio {index}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    raise InvalidArgument(f"unknown audio LLM architecture {arch!r}")


def strip_audio_tokens(arch: AudioArch, text: str) -> str:
    """Remove the architecture's audio tokens from user-supplied text (they would desync the
    placeholder count from the audio count, which vLLM rejects)."""
    for tok in _SPECIAL[arch]:
        text = text.replace(tok, "")
    return text


def build_audio_messages(arch: AudioArch, history_messages: list[dict[str, str]],
                         audio_count: int = 1) -> list[dict[str, str]]:
    """Copy of the text history with ``audio_count`` placeholders put in the last user turn.

    ``history_messages`` are ``{"role": "system"|"user"|"assistant", "content": str}``; if the
    last one is not a user turn, an empty user turn (audio only) is appended.
    """
    if arch not in _SPECIAL:
        raise InvalidArgument(f"unknown audio LLM architecture {arch!r}")
    if audio_count < 0:
        raise OutOfRange(f"audio_count must be >= 0; got {audio_count}")
    messages = []
    for m in history_messages:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise InvalidArgument("history messages must be {'role': str, 'content': str} dicts")
        messages.append({"role": m["role"], "content": strip_audio_tokens(arch, m["content"])})
    if not messages or messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": ""})
    marks = "".join(audio_placeholder(arch, i + 1) for i in range(audio_count))
    text = messages[-1]["content"].strip()
    if arch == ULTRAVOX and marks and text:
        marks += "\n"
    messages[-1]["content"] = marks + text
    return messages


def build_audio_prompt(arch: AudioArch, tokenizer: Any, history_messages: list[dict[str, str]],
                       audio_count: int = 1) -> str:
    """The prompt string for vLLM: chat template applied, generation prompt added.

    ``tokenizer`` is any object with Hugging Face's ``apply_chat_template`` (the model's own
    tokenizer, e.g. ``await engine.get_tokenizer()``). The placeholders are plain text in the
    message content, so any chat template that prints string content works.
    """
    messages = build_audio_messages(arch, history_messages, audio_count)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise InvalidArgument("the tokenizer's chat template did not return text")
    return prompt


def audio_token_count(arch: AudioArch, seconds: float, stack_factor: int = 8) -> int:
    """Prompt tokens that ``seconds`` of audio expand to (for context budgeting)."""
    frames = max(2, math.ceil(round(seconds * AUDIO_RATE) / 160))
    if arch == QWEN2_AUDIO:
        frames = min(frames, int(MAX_AUDIO_S * 100))  # the processor truncates at 30 s
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1
    if arch == ULTRAVOX:
        total, chunk = 0, int(MAX_AUDIO_S * 100)
        while frames > 0:
            n = min(frames, chunk)
            total += math.ceil(math.ceil(n / 2) / stack_factor)
            frames -= n
        return total
    raise InvalidArgument(f"unknown audio LLM architecture {arch!r}")


def engine_kwargs(arch: AudioArch, *, max_audio_s: float = MAX_AUDIO_S,
                  audios_per_prompt: int = 1, max_model_len: int = 2048) -> dict[str, Any]:
    """vLLM engine arguments an audio LLM needs (merge into ``AsyncEngineArgs``).

    - ``limit_mm_per_prompt``: audios per prompt, and the audio length vLLM profiles memory and
      sizes its encoder cache with (Ultravox would otherwise profile 16 x 30 s of audio);
    - ``trust_remote_code``: Ultravox's processor is code shipped with the checkpoint;
    - ``mm_processor_cache_gb=0``: each utterance is new audio, so caching processed inputs only
      costs memory;
    - ``max_model_len``: checked to leave room for text beside the audio tokens.
    """
    if arch not in _SPECIAL:
        raise InvalidArgument(f"unknown audio LLM architecture {arch!r}")
    if not 0 < max_audio_s <= (MAX_AUDIO_S if arch == QWEN2_AUDIO else 8 * MAX_AUDIO_S):
        raise OutOfRange(f"max_audio_s must be in (0, {MAX_AUDIO_S:g}] for {arch}; got {max_audio_s}")
    if audios_per_prompt < 1:
        raise OutOfRange(f"audios_per_prompt must be >= 1; got {audios_per_prompt}")
    audio_tokens = audios_per_prompt * audio_token_count(arch, max_audio_s)
    if max_model_len < audio_tokens + 256:
        raise OutOfRange(
            f"max_model_len {max_model_len} leaves too little room for text beside "
            f"{audio_tokens} audio tokens ({audios_per_prompt} x {max_audio_s:g} s); "
            f"use at least {audio_tokens + 256} or shorter audio"
        )
    return {
        "limit_mm_per_prompt": {
            "audio": {"count": audios_per_prompt, "length": int(max_audio_s * AUDIO_RATE)}
        },
        "trust_remote_code": arch == ULTRAVOX,
        "mm_processor_cache_gb": 0,
        "max_model_len": max_model_len,
    }

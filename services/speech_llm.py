"""Speech-native mode: helpers for audio-input LLMs (Ultravox, Qwen2-Audio) served by vLLM.

Framework-free (no Ray, no vLLM import): ``services.llm`` and the deployments call these to
recognise an audio LLM, repair its checkpoint, build its prompt and pick its engine arguments.

Supported architectures (``config.json``):

- ``ultravox``: Whisper encoder + stacking projector + a Llama-family LLM (``UltravoxModel``).
  One ``<|audio|>`` placeholder per audio in the user turn; vLLM expands it to about 6.25
  tokens per second of audio. Needs ``trust_remote_code`` (vLLM ships no Ultravox processor).
- ``qwen2_audio``: Whisper-style encoder + linear projector + Qwen2
  (``Qwen2AudioForConditionalGeneration``). One ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>``
  line per audio; vLLM expands ``<|AUDIO|>`` to 25 tokens per second of audio (at most 30 s).

Usage by the engine::

    path = fix_checkpoint(resolve(cfg.model, default_llm_model))   # no-op for text LLMs
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

import hashlib
import json
import math
import os
import shutil
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

#: Bump when a fix changes: cached fixed copies with another version are rebuilt.
FIX_VERSION = 1
_FIX_STAMP = ".voxserve-fixed.json"
_PROCESSOR_FILE = "ultravox_processing.py"
_PROCESSOR_REF = "ultravox_processing.UltravoxProcessor"


# --- locating and recognising -------------------------------------------------------------------


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_local(model: str | Path) -> bool:
    s = str(model)
    return isinstance(model, Path) or s.startswith(("/", ".", "~")) or Path(s).expanduser().exists()


def local_model_dir(model_path_or_id: str | Path, download: bool = False) -> Path:
    """The local folder of a model: the path itself, or a hub id's snapshot in the HF cache.

    With ``download=True`` (and not offline) a hub id missing from the cache is downloaded,
    which is what vLLM would do with it anyway. Raises NotFound otherwise.
    """
    if _is_local(model_path_or_id):
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
    if _is_local(model_path_or_id):
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


# --- checkpoint fixes ---------------------------------------------------------------------------

#: Weight-name prefixes vLLM's Qwen2-Audio loader rejects, and what it expects instead.
#: transformers 5 ``save_pretrained`` nests the decoder one level deeper
#: (``language_model.model.model.*``); a raw ``state_dict()`` dump of the transformers 5 class
#: uses ``model.*`` and a top-level ``lm_head``.
QWEN2_AUDIO_RENAMES: tuple[tuple[str, str], ...] = (
    ("language_model.model.model.", "language_model.model."),
    ("model.language_model.", "language_model.model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def qwen2_audio_weight_name(name: str) -> str:
    """The name vLLM expects for one Qwen2-Audio weight (unchanged when already right)."""
    for old, new in QWEN2_AUDIO_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _weight_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _qwen2_audio_bad_files(folder: Path) -> list[Path]:
    return [p for p in _weight_files(folder)
            if any(qwen2_audio_weight_name(n) != n for n in _weight_names(p))]


def _processor_source() -> bytes:
    return (Path(__file__).with_name(_PROCESSOR_FILE)).read_bytes()


def _has_voxserve_processor(folder: Path) -> bool:
    code, cfg = folder / _PROCESSOR_FILE, folder / "processor_config.json"
    if not (code.is_file() and cfg.is_file()) or code.read_bytes() != _processor_source():
        return False
    try:
        return json.loads(cfg.read_text()).get("auto_map", {}).get("AutoProcessor") == _PROCESSOR_REF
    except ValueError:
        return False


def install_ultravox_processor(folder: str | Path, stack_factor: int = 8,
                              encoder_ds_factor: int = 2, num_mel_bins: int = 80) -> None:
    """Put voxserve's Ultravox processor (remote code) into a checkpoint folder.

    Writes ``ultravox_processing.py``, points ``processor_config.json``'s ``auto_map`` at it
    (keeping other keys), and writes a Whisper ``preprocessor_config.json`` if there is none.
    Every ``auto_map.AutoProcessor`` entry elsewhere is redirected too, since transformers may
    read any of them first.
    """
    folder = Path(folder)
    _replace_file(folder / _PROCESSOR_FILE, _processor_source())
    proc_path = folder / "processor_config.json"
    proc = _read_json(proc_path)
    proc.update({
        "processor_class": "UltravoxProcessor",
        "auto_map": {**proc.get("auto_map", {}), "AutoProcessor": _PROCESSOR_REF},
        "stack_factor": stack_factor,
        "encoder_ds_factor": encoder_ds_factor,
        "audio_placeholder": "<|audio|>",
        "audio_context_size": 3000,
    })
    proc.pop("audio_padding", None)
    _replace_file(proc_path, json.dumps(proc, indent=2).encode())
    pre_path = folder / "preprocessor_config.json"
    if not pre_path.exists():
        pre = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": num_mel_bins,
               "sampling_rate": AUDIO_RATE, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
               "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False}
        _replace_file(pre_path, json.dumps(pre, indent=2).encode())
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        path = folder / name
        data = _read_json(path)
        if "AutoProcessor" in data.get("auto_map", {}) or data.get("processor_class"):
            data.setdefault("auto_map", {})["AutoProcessor"] = _PROCESSOR_REF
            data["processor_class"] = "UltravoxProcessor"
            _replace_file(path, json.dumps(data, indent=2).encode())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path``; a symlink there is replaced, never written through."""
    if path.is_symlink():
        path.unlink()
    path.write_bytes(data)


def _source_fingerprint(src: Path) -> dict[str, Any]:
    files = {}
    for p in sorted(src.rglob("*")):
        if p.is_file():
            st = p.stat()
            files[str(p.relative_to(src))] = [st.st_size, st.st_mtime_ns]
    return {"version": FIX_VERSION, "source": str(src.resolve()), "files": files}


def _needed_fixes(src: Path, arch: AudioArch) -> list[str]:
    fixes = []
    if arch == QWEN2_AUDIO and _qwen2_audio_bad_files(src):
        fixes.append("qwen2_audio_weight_names")
    if arch == ULTRAVOX and not _has_voxserve_processor(src):
        fixes.append("ultravox_processor")
    return fixes


def fix_checkpoint(path: str | Path, cache: str | Path | None = None) -> str:
    """Return a path vLLM can load for ``path`` (a local folder or a hub id).

    Text-only models and audio checkpoints that need nothing come back unchanged. Otherwise a
    fixed copy is made once under ``<cache>/fixed/`` (default: the voxserve cache folder): every
    file is a symlink to the original except those rewritten, so a multi-GB checkpoint costs
    only the rewritten files. The copy is reused while the source's files are unchanged.

    Fixes:
    - Qwen2-Audio weight names (``QWEN2_AUDIO_RENAMES``): checkpoints written by transformers 5
      ``save_pretrained`` have ``language_model.model.model.*``; vLLM 0.32 expects
      ``language_model.model.*`` and refuses to load. Affected shards are rewritten and
      ``model.safetensors.index.json`` updated.
    - Ultravox processor: vLLM ships none and loads the checkpoint's own
      ``ultravox_processing.py`` via ``trust_remote_code``; locally built checkpoints have none
      and the published one predates transformers 5. voxserve's
      (``services/ultravox_processing.py``) is installed; see ``install_ultravox_processor``.
    - Also needed for Ultravox, but not a file fix: ``trust_remote_code=True`` (see
      ``engine_kwargs``). Published Ultravox configs may name their Whisper and Llama weights by
      hub id (``audio_model_id``/``text_model_id``): those must be in the local HF cache when
      offline.
    """
    local = _is_local(path)
    if local and not Path(path).expanduser().is_dir():
        raise NotFound(f"model folder not found: {Path(path).expanduser()}")
    arch = detect_audio_arch(path)  # reads config.json only: text models are never downloaded
    if arch is None:
        return str(path)
    src = local_model_dir(path, download=True)
    fixes = _needed_fixes(src, arch)
    if not fixes:
        return str(src) if not local else str(path)

    from services.models import cache_dir

    root = Path(cache) if cache is not None else cache_dir()
    digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:10]
    dest = root / "fixed" / f"{src.resolve().name}-{digest}"
    fp = _source_fingerprint(src)
    stamp = dest / _FIX_STAMP
    try:
        if json.loads(stamp.read_text()).get("fingerprint") == fp:
            return str(dest)
    except (OSError, ValueError):
        pass

    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if p.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            elif not rel.name.startswith(".voxserve-"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).symlink_to(p.resolve())
        if "qwen2_audio_weight_names" in fixes:
            _rename_qwen2_audio_weights(src, tmp)
        if "ultravox_processor" in fixes:
            cfg = read_model_config(src) or {}
            audio_cfg = cfg.get("audio_config") or {}
            mel = audio_cfg.get("num_mel_bins") or (
                128 if "large-v3" in str(cfg.get("audio_model_id", "")) else 80)
            install_ultravox_processor(tmp, stack_factor=int(cfg.get("stack_factor", 8)),
                                       num_mel_bins=int(mel))
        (tmp / _FIX_STAMP).write_text(json.dumps({"fingerprint": fp, "fixes": fixes}, indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _rename_qwen2_audio_weights(src: Path, dest: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in _qwen2_audio_bad_files(src):
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                tensors[qwen2_audio_weight_name(name)] = f.get_tensor(name)
        out = dest / shard.name
        out.unlink()  # the symlink placed by the copy
        save_file(tensors, str(out), metadata=metadata)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {qwen2_audio_weight_name(k): v
                              for k, v in data.get("weight_map", {}).items()}
        _replace_file(dest / index.name, json.dumps(data, indent=2).encode())

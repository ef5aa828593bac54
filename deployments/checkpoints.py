"""Checkpoint surgery for audio LLMs: fixed copies that vLLM can load (provisioning, not serving).

Real checkpoints need repairs before vLLM serves them:

- Qwen2-Audio checkpoints saved by transformers 5 name their weights in ways vLLM's loader
  rejects (``language_model.model.model.*``...): the weights are renamed in a copy;
- Ultravox checkpoints need a processor vLLM does not ship: ``ultravox_processing.py`` (beside
  this module) is installed into a copy and ``processor_config.json`` points at it
  (``trust_remote_code``).

``fix_checkpoint(path)`` returns the path to serve: the original when nothing is needed, else a
fixed copy in the model cache (rebuilt when the source or the fixes change). The LLM deployment
calls it before starting vLLM; ``voxserve models fix PATH`` does it ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from services.errors import InvalidArgument, NotFound
from services.speech_llm import (
    AUDIO_RATE,
    QWEN2_AUDIO,
    ULTRAVOX,
    AudioArch,
    detect_audio_arch,
    is_local_model,
    local_model_dir,
    read_model_config,
)

#: Bump when a fix changes: cached fixed copies with another version are rebuilt.
FIX_VERSION = 1
_FIX_STAMP = ".voxserve-fixed.json"
_PROCESSOR_FILE = "ultravox_processing.py"
_PROCESSOR_REF = "ultravox_processing.UltravoxProcessor"

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
    local = is_local_model(path)
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

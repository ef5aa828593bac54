"""Speech-native groundwork: tiny Ultravox / Qwen2-Audio checkpoints run through vLLM on CPU.

The tiny models have random audio encoders and SmolLM2's real text weights (see
tests/tiny_models.py): tests check that audio reaches the model (expanded placeholder tokens
in the prompt), that generation finishes, and that cancellation aborts the request; not what the
model understands. One vLLM engine at a time: the engine fixture is module-scoped and
parametrized, so pytest finishes every test of one architecture and shuts its engine down
before starting the next.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from deployments.checkpoints import fix_checkpoint, qwen2_audio_weight_name
from services.audio import MODEL_RATE, resample
from services.errors import InvalidArgument, NotFound, OutOfRange
from services.models import cache_dir, default_llm_model, default_tts_voice, prepare
from services.speech_llm import (
    QWEN2_AUDIO,
    ULTRAVOX,
    audio_token_count,
    build_audio_messages,
    build_audio_prompt,
    detect_audio_arch,
    engine_kwargs,
)
from tests.tiny_models import build_tiny_qwen2_audio, build_tiny_ultravox

in_session_loop = pytest.mark.asyncio(loop_scope="session")  # the engine fixture's loop

ARCHS = (QWEN2_AUDIO, ULTRAVOX)
AUDIO_TOKEN = {QWEN2_AUDIO: "<|AUDIO|>", ULTRAVOX: "<|audio|>"}


@pytest.fixture(scope="module")
def text_model() -> str:
    try:
        return default_llm_model()
    except NotFound:
        prepare(["llm"], progress=False)
        return default_llm_model()


@pytest.fixture(scope="module")
def tiny_models(text_model: str) -> dict[str, Path]:
    """Both tiny checkpoints, cached in the project's cache folder across runs."""
    root = cache_dir() / "tiny-audio-llms"
    return {
        QWEN2_AUDIO: build_tiny_qwen2_audio(root / "qwen2-audio", text_model),
        ULTRAVOX: build_tiny_ultravox(root / "ultravox", text_model),
    }


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """About 1.8 s of Piper speech at 16 kHz."""
    from piper import PiperVoice

    voice = PiperVoice.load(default_tts_voice())
    chunks = list(voice.synthesize("What is the capital of France?"))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return resample(audio, chunks[0].sample_rate, MODEL_RATE)


@pytest.fixture(scope="module")
def vllm_env() -> Any:
    """Keep vLLM's and torch's caches and temp files inside the project's cache folder."""
    base = cache_dir() / "vllm-test"
    wanted = {
        "VLLM_CACHE_ROOT": str(base / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(base / "inductor"),
        "TMPDIR": str(base / "tmp"),
        "HF_HUB_OFFLINE": "1",
        # On CPU this runs the model inside the engine-core process instead of spawning one
        # more worker process: one fewer torch/vLLM import at start.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"):
        Path(wanted[key]).mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=ARCHS)
async def engine(request: pytest.FixtureRequest, tiny_models: dict[str, Path], vllm_env: Any):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    arch = request.param
    path = fix_checkpoint(tiny_models[arch])
    args = AsyncEngineArgs(
        model=path,
        enforce_eager=True,
        dtype="bfloat16",
        kv_cache_memory_bytes=256 << 20,
        max_num_seqs=4,
        **engine_kwargs(arch, max_audio_s=10.0),
    )
    eng = AsyncLLM.from_engine_args(args)
    held = [arch, eng]  # what the tests unpack; emptied at teardown so that the engine is freed then
    try:
        yield held
    finally:
        eng.shutdown()
        # AsyncLLM.__del__ shuts down once more: an engine left to the interpreter's exit runs it
        # after vLLM's module globals are gone ("Exception ignored in AsyncLLM.__del__ ...
        # TypeError: 'NoneType' object is not callable"). Free it now, while they are there.
        held.clear()
        del eng
        gc.collect()


def _params(max_tokens: int, ignore_eos: bool = False) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


# --- pure helpers -------------------------------------------------------------------------------


def test_detect_audio_arch(tiny_models: dict[str, Path], text_model: str, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_audio_arch(tiny_models[QWEN2_AUDIO]) == QWEN2_AUDIO
    assert detect_audio_arch(str(tiny_models[ULTRAVOX])) == ULTRAVOX
    assert detect_audio_arch(text_model) is None
    assert detect_audio_arch(tmp_path / "missing") is None
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["UltravoxModel"]}))
    assert detect_audio_arch(tmp_path) == ULTRAVOX
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert detect_audio_arch("no-such-org/no-such-model") is None


def test_prompt_placeholders_in_last_user_turn(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello <|AUDIO|><|audio|>"},  # injected tokens are removed
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Answer this:"},
    ]
    tok = AutoTokenizer.from_pretrained(str(tiny_models[QWEN2_AUDIO]))
    prompt = build_audio_prompt(QWEN2_AUDIO, tok, history, audio_count=2)
    assert prompt.count("<|AUDIO|>") == 2
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: " in prompt
    assert prompt.index("Answer this:") > prompt.index("Audio 2:") > prompt.index("Hi!")
    assert prompt.startswith("<|im_start|>system\nBe brief.")
    assert prompt.endswith("<|im_start|>assistant\n")

    tok = AutoTokenizer.from_pretrained(str(tiny_models[ULTRAVOX]))
    msgs = build_audio_messages(ULTRAVOX, history[:3], audio_count=1)
    assert msgs[-1] == {"role": "user", "content": "<|audio|>"}  # appended, audio only
    assert msgs[1]["content"] == "hello <|AUDIO|>"  # only Ultravox's own token matters here
    prompt = build_audio_prompt(ULTRAVOX, tok, history, audio_count=1)
    assert prompt.count("<|audio|>") == 1
    assert "<|audio|>\nAnswer this:" in prompt
    with pytest.raises(InvalidArgument):
        build_audio_messages(ULTRAVOX, [{"role": "user"}])
    with pytest.raises(InvalidArgument):
        build_audio_messages("whisper", history)  # type: ignore[arg-type]


def test_engine_kwargs() -> None:
    kw = engine_kwargs(ULTRAVOX)
    assert kw["trust_remote_code"] is True
    assert kw["limit_mm_per_prompt"] == {"audio": {"count": 1, "length": 30 * MODEL_RATE}}
    assert engine_kwargs(QWEN2_AUDIO)["trust_remote_code"] is False
    assert audio_token_count(QWEN2_AUDIO, 2.0) == 50
    assert audio_token_count(QWEN2_AUDIO, 60.0) == 750  # truncated at 30 s
    assert audio_token_count(ULTRAVOX, 2.0) == 13
    assert audio_token_count(ULTRAVOX, 45.0) == 188 + 94  # two encoder chunks
    with pytest.raises(OutOfRange):
        engine_kwargs(QWEN2_AUDIO, max_model_len=800)  # 750 audio tokens leave no room
    with pytest.raises(OutOfRange):
        engine_kwargs(QWEN2_AUDIO, max_audio_s=31)


def test_tiny_build_is_cached(tiny_models: dict[str, Path], text_model: str) -> None:
    stamp = tiny_models[ULTRAVOX] / ".voxserve-tiny.json"
    before = stamp.stat().st_mtime_ns
    assert build_tiny_ultravox(tiny_models[ULTRAVOX], text_model) == tiny_models[ULTRAVOX]
    assert stamp.stat().st_mtime_ns == before


def test_fix_checkpoint_leaves_good_models_alone(tiny_models: dict[str, Path],
                                                 text_model: str) -> None:
    for arch in ARCHS:
        assert fix_checkpoint(tiny_models[arch]) == str(tiny_models[arch])
    assert fix_checkpoint(text_model) == text_model
    with pytest.raises(NotFound):
        fix_checkpoint("/no/such/model")


def test_fix_checkpoint_renames_transformers5_qwen2_audio(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    cfg = Qwen2AudioConfig(
        audio_config={"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                      "encoder_ffn_dim": 64, "num_mel_bins": 80},
        text_config={"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "vocab_size": 300},
        audio_token_index=299,
    )
    torch.manual_seed(0)
    src = tmp_path / "t5-saved"
    Qwen2AudioForConditionalGeneration(cfg).save_pretrained(str(src))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        before = {k: f.get_tensor(k) for k in f.keys()}
    assert any(k.startswith("language_model.model.model.") for k in before)  # the pitfall

    fixed = Path(fix_checkpoint(src, cache=tmp_path / "cache"))
    assert fixed != src and (fixed / "config.json").is_symlink()
    with safe_open(str(fixed / "model.safetensors"), "pt") as f:
        after = {k: f.get_tensor(k) for k in f.keys()}
    assert set(after) == {qwen2_audio_weight_name(k) for k in before}
    assert not any(k.startswith("language_model.model.model.") for k in after)
    assert "language_model.model.embed_tokens.weight" in after
    assert "language_model.lm_head.weight" in after
    for k, v in before.items():
        assert torch.equal(after[qwen2_audio_weight_name(k)], v)
    # Cached: a second call reuses the copy; the source is untouched.
    mtime = (fixed / "model.safetensors").stat().st_mtime_ns
    assert fix_checkpoint(src, cache=tmp_path / "cache") == str(fixed)
    assert (fixed / "model.safetensors").stat().st_mtime_ns == mtime
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(before)


def test_fix_checkpoint_installs_ultravox_processor(tiny_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from transformers import AutoProcessor

    # A checkpoint as saved without voxserve: no processor code, no processor config.
    src = tmp_path / "bare-ultravox"
    src.mkdir()
    for p in tiny_models[ULTRAVOX].iterdir():
        if p.name not in ("ultravox_processing.py", "processor_config.json",
                          "preprocessor_config.json") and not p.name.startswith("."):
            (src / p.name).symlink_to(p)
    fixed = Path(fix_checkpoint(src, cache=tmp_path / "cache"))
    assert (fixed / "ultravox_processing.py").is_file()
    proc = AutoProcessor.from_pretrained(str(fixed), trust_remote_code=True)
    out = proc(text="<|audio|>", audios=[np.zeros(2 * MODEL_RATE, np.float32)],
               sampling_rate=MODEL_RATE, include_audio_num_chunks=True)
    assert int(out["audio_token_len"].sum()) == audio_token_count(ULTRAVOX, 2.0)
    assert out["audio_values"].shape[1] == 80
    assert int(out["audio_num_chunks"][0]) == 1
    # 45 s of audio: two encoder chunks (30 s + 15 s).
    out = proc(text="<|audio|>", audios=[np.zeros(45 * MODEL_RATE, np.float32)],
               sampling_rate=MODEL_RATE, include_audio_num_chunks=True)
    assert out["audio_lens"].tolist() == [3000, 1500]
    assert int(out["audio_token_len"].sum()) == audio_token_count(ULTRAVOX, 45.0)


def test_audio_token_count_matches_processors(tiny_models: dict[str, Path]) -> None:
    """audio_token_count (used for context budgeting) agrees with what each processor does."""
    from transformers import AutoProcessor

    lengths = [1, 159, 161, 2 * MODEL_RATE + 7, 31 * MODEL_RATE + 5]
    uv = AutoProcessor.from_pretrained(str(tiny_models[ULTRAVOX]), trust_remote_code=True)
    qw = AutoProcessor.from_pretrained(str(tiny_models[QWEN2_AUDIO]))
    for n in lengths:
        audio = np.zeros(n, np.float32)
        out = uv(text="<|audio|>", audios=[audio], sampling_rate=MODEL_RATE)
        assert int(out["audio_token_len"].sum()) == audio_token_count(ULTRAVOX, n / MODEL_RATE)
        out = qw(text="<|AUDIO|>", audio=[audio], sampling_rate=MODEL_RATE, truncation=True)
        frames = int(out["feature_attention_mask"].sum())
        tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1
        assert tokens == audio_token_count(QWEN2_AUDIO, n / MODEL_RATE), n


# --- through vLLM -------------------------------------------------------------------------------


@in_session_loop
async def test_generate_from_audio(engine: Any, speech: np.ndarray) -> None:
    arch, eng = engine
    tok = eng.get_tokenizer()
    prompt = build_audio_prompt(arch, tok, [{"role": "user", "content": ""}], audio_count=1)
    final = None
    async for out in eng.generate(
        {"prompt": prompt, "multi_modal_data": {"audio": (speech, MODEL_RATE)}},
        _params(8), request_id=f"gen-{uuid.uuid4().hex}",
    ):
        final = out
    assert final is not None and final.finished
    assert len(final.outputs[0].token_ids) > 0
    # The engine received the audio: its placeholder was expanded to one token per audio frame
    # group, exactly as many as the encoder produces for this length.
    audio_id = tok.convert_tokens_to_ids(AUDIO_TOKEN[arch])
    n_audio = list(final.prompt_token_ids).count(audio_id)
    assert n_audio == audio_token_count(arch, speech.size / MODEL_RATE) > 1


@in_session_loop
async def test_cancel_aborts_request(engine: Any) -> None:
    arch, eng = engine
    tok = eng.get_tokenizer()
    prompt = build_audio_prompt(arch, tok, [{"role": "user", "content": "Count to 100."}])
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(MODEL_RATE) / MODEL_RATE)).astype(np.float32)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in eng.generate(
            {"prompt": prompt, "multi_modal_data": {"audio": (tone, MODEL_RATE)}},
            _params(500, ignore_eos=True), request_id=f"cancel-{uuid.uuid4().hex}",
        ):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=300)
    assert eng.get_num_unfinished_requests() == 1
    task.cancel()  # what a barge-in does to the response task
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if eng.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert eng.get_num_unfinished_requests() == 0
    # The engine is still healthy after the abort.
    final = None
    async for out in eng.generate(
        {"prompt": prompt, "multi_modal_data": {"audio": (tone, MODEL_RATE)}},
        _params(2), request_id=f"after-{uuid.uuid4().hex}",
    ):
        final = out
    assert final is not None and final.finished

"""Tiny audio-input LLM checkpoints for plumbing tests and benchmarks (no hub access).

Real speech LLMs (Ultravox, Qwen2-Audio) cannot be downloaded here, and no Whisper in Hugging
Face format ships on PyPI. These builders assemble checkpoints with the same layout as the
published ones, so vLLM runs them through the exact code paths a real checkpoint takes:

- audio encoder: a small Whisper-style encoder (2 layers, d_model 128, 80 mel bins) with RANDOM
  weights, so what the model "hears" is noise: tests can check plumbing, not understanding;
- projector: random;
- text model: SmolLM2-135M-Instruct, the embedded default LLM (its real weights, tokenizer and
  ChatML chat template), so answers are fluent text and timings are those of the default LLM.

Qwen2-Audio's vLLM class always builds a ``Qwen2ForCausalLM`` decoder; SmolLM2 is a Llama, and a
Llama is a Qwen2 whose q/k/v biases are zero, so the weights are copied with zero biases added.
The tokenizer gains the architecture's audio tokens (Qwen2-Audio: ``<|audio_bos|>``,
``<|AUDIO|>``, ``<|audio_eos|>``; Ultravox: ``<|audio|>``) and the chat template also accepts
``{"type": "audio"}`` content parts. Weight names are written the way vLLM reads published
checkpoints (``language_model.model.*``), not the way transformers 5 ``save_pretrained`` writes
them (see ``services.speech_llm.fix_checkpoint``).

Builds are cached: a folder with a matching stamp is returned as is (about 3 s to build, 270 MB).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from services.errors import NotFound

#: The Ultravox processor these builds install (its code is part of a build's fingerprint).
PROCESSOR_SOURCE = Path(__file__).resolve().parent.parent / "deployments" / "ultravox_processing.py"
#: Bump when the recipe changes: cached builds with another version are rebuilt.
RECIPE_VERSION = 1
STAMP = ".voxserve-tiny.json"

#: The small Whisper-style encoder shared by both builds.
AUDIO_ENCODER: dict[str, Any] = {
    "d_model": 128,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 256,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
}

QWEN2_AUDIO_TOKENS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
ULTRAVOX_AUDIO_TOKEN = "<|audio|>"

# ChatML (SmolLM2's own format) that also renders list content with audio parts, the way the
# published templates of each architecture do.
_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{% set audio_count.value = audio_count.value + 1 %}__AUDIO__"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_AUDIO_PART = {  # Jinja expressions
    "qwen2_audio": "'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\\n'",
    "ultravox": "'<|audio|>'",
}


def chat_template(arch: str) -> str:
    """The tiny models' chat template for ``arch`` ("qwen2_audio" or "ultravox")."""
    return _CHAT_TEMPLATE.replace("__AUDIO__", "{{ " + _AUDIO_PART[arch] + " }}")


def build_tiny_qwen2_audio(out_dir: str | Path, text_model_dir: str | Path | None = None) -> Path:
    """Build (or reuse) a tiny Qwen2-Audio checkpoint in ``out_dir``; returns its path."""
    return _cached_build(Path(out_dir), "qwen2_audio", text_model_dir, _write_qwen2_audio)


def build_tiny_ultravox(out_dir: str | Path, text_model_dir: str | Path | None = None) -> Path:
    """Build (or reuse) a tiny Ultravox checkpoint in ``out_dir``; returns its path."""
    return _cached_build(Path(out_dir), "ultravox", text_model_dir, _write_ultravox)


# --- caching ------------------------------------------------------------------------------------


def _text_dir(text_model_dir: str | Path | None) -> Path:
    if text_model_dir is None:
        from services.models import default_llm_model

        text_model_dir = default_llm_model()
    path = Path(text_model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise NotFound(f"text model folder {path} has no config.json (a Hugging Face folder is needed)")
    return path


def _fingerprint(arch: str, text_dir: Path) -> dict[str, Any]:
    weights = sorted(text_dir.glob("*.safetensors"))
    fp: dict[str, Any] = {
        "recipe": RECIPE_VERSION,
        "arch": arch,
        "text_model": str(text_dir.resolve()),
        "text_weights": {p.name: p.stat().st_size for p in weights},
    }
    if arch == "ultravox":  # the processor code is part of the build
        source = PROCESSOR_SOURCE.read_bytes()
        fp["processor"] = hashlib.sha1(source).hexdigest()
    return fp


def _stamp_matches(folder: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / STAMP).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _cached_build(out: Path, arch: str, text_model_dir: str | Path | None, writer: Any) -> Path:
    text_dir = _text_dir(text_model_dir)
    fp = _fingerprint(arch, text_dir)
    if _stamp_matches(out, fp):
        return out
    t0 = time.monotonic()
    # Build beside the target, then rename: a half-written folder is never mistaken for a model.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer(tmp, text_dir)
        (tmp / STAMP).write_text(
            json.dumps({"fingerprint": fp, "seconds": round(time.monotonic() - t0, 2)}, indent=1)
        )
        if _stamp_matches(out, fp):  # another process finished first
            return out
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- shared pieces ------------------------------------------------------------------------------


def _load_text(text_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    config = json.loads((text_dir / "config.json").read_text())
    tensors: dict[str, Any] = {}
    for f in sorted(text_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise NotFound(f"no *.safetensors weights in {text_dir}")
    return config, tensors


def _tokenizer(text_dir: Path, new_tokens: list[str]) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text_dir))
    tok.add_special_tokens({"additional_special_tokens": new_tokens})
    return tok


def _grow_embeddings(tensors: dict[str, Any], vocab: int) -> None:
    """Give new token ids embedding rows (the mean row: harmless if ever sampled)."""
    import torch

    emb = tensors["model.embed_tokens.weight"]
    if emb.shape[0] < vocab:
        extra = emb.float().mean(0, keepdim=True).expand(vocab - emb.shape[0], -1).to(emb.dtype)
        tensors["model.embed_tokens.weight"] = torch.cat([emb, extra])
    if "lm_head.weight" in tensors and tensors["lm_head.weight"].shape[0] < vocab:
        head = tensors["lm_head.weight"]
        extra = head.float().mean(0, keepdim=True).expand(vocab - head.shape[0], -1).to(head.dtype)
        tensors["lm_head.weight"] = torch.cat([head, extra])


def _random_state(module: Any, prefix: str, dtype: Any) -> dict[str, Any]:
    return {prefix + k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def _copy_side_files(text_dir: Path, out: Path) -> None:
    if (text_dir / "generation_config.json").is_file():
        shutil.copy2(text_dir / "generation_config.json", out / "generation_config.json")


def _save(tensors: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


# --- Qwen2-Audio --------------------------------------------------------------------------------


def _write_qwen2_audio(out: Path, text_dir: Path) -> None:
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    tcfg, text = _load_text(text_dir)
    dtype = text["model.embed_tokens.weight"].dtype
    tok = _tokenizer(text_dir, list(QWEN2_AUDIO_TOKENS))
    vocab = len(tok)
    _grow_embeddings(text, vocab)

    rope = tcfg.get("rope_parameters") or {"rope_type": "default",
                                           "rope_theta": tcfg.get("rope_theta", 10000.0)}
    text_config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": tcfg["hidden_size"],
        "intermediate_size": tcfg["intermediate_size"],
        "num_hidden_layers": tcfg["num_hidden_layers"],
        "num_attention_heads": tcfg["num_attention_heads"],
        "num_key_value_heads": tcfg.get("num_key_value_heads", tcfg["num_attention_heads"]),
        "hidden_act": tcfg.get("hidden_act", "silu"),
        "max_position_embeddings": tcfg.get("max_position_embeddings", 8192),
        "rms_norm_eps": tcfg.get("rms_norm_eps", 1e-5),
        "rope_parameters": rope,
        "tie_word_embeddings": tcfg.get("tie_word_embeddings", False),
        "use_sliding_window": False,
        "bos_token_id": tcfg.get("bos_token_id"),
        "eos_token_id": tcfg.get("eos_token_id"),
        "pad_token_id": tcfg.get("pad_token_id"),
    }
    config = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", **AUDIO_ENCODER},
        text_config=text_config,
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    config.dtype = str(dtype).removeprefix("torch.")

    torch.manual_seed(0)
    encoder = Qwen2AudioEncoder(config.audio_config)  # type: ignore[arg-type]
    projector = torch.nn.Linear(AUDIO_ENCODER["d_model"], tcfg["hidden_size"])
    tensors = _random_state(encoder, "audio_tower.", dtype)
    tensors.update(_random_state(projector, "multi_modal_projector.linear.", dtype))
    heads, kv = text_config["num_attention_heads"], text_config["num_key_value_heads"]
    head_dim = tcfg.get("head_dim") or tcfg["hidden_size"] // heads
    for name, value in text.items():
        tensors["language_model." + name] = value
        if name.endswith("self_attn.q_proj.weight"):
            # Qwen2 attention has q/k/v biases; zeros make it compute exactly the Llama layer.
            base = "language_model." + name.removesuffix("q_proj.weight")
            tensors[base + "q_proj.bias"] = torch.zeros(heads * head_dim, dtype=dtype)
            tensors[base + "k_proj.bias"] = torch.zeros(kv * head_dim, dtype=dtype)
            tensors[base + "v_proj.bias"] = torch.zeros(kv * head_dim, dtype=dtype)
    _save(tensors, out)
    config.save_pretrained(str(out))

    fe = WhisperFeatureExtractor(feature_size=AUDIO_ENCODER["num_mel_bins"])
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok,
                                    chat_template=chat_template("qwen2_audio"))
    processor.save_pretrained(str(out))
    tok.chat_template = chat_template("qwen2_audio")
    tok.save_pretrained(str(out))
    _copy_side_files(text_dir, out)


# --- Ultravox -----------------------------------------------------------------------------------


def _write_ultravox(out: Path, text_dir: Path) -> None:
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from deployments.checkpoints import install_ultravox_processor

    tcfg, text = _load_text(text_dir)
    dtype = text["model.embed_tokens.weight"].dtype
    tok = _tokenizer(text_dir, [ULTRAVOX_AUDIO_TOKEN])
    # Like the published checkpoints, the audio token id lies outside the text model's vocabulary:
    # vLLM masks such ids before the embedding lookup, so no embedding row is needed.
    audio_token_index = tok.convert_tokens_to_ids(ULTRAVOX_AUDIO_TOKEN)

    audio_config = WhisperConfig(**AUDIO_ENCODER, encoder_layerdrop=0.0).to_dict()
    stack_factor, projector_hidden = 8, 512
    config = {
        "architectures": ["UltravoxModel"],
        "model_type": "ultravox",
        "audio_config": audio_config,
        "text_config": tcfg,
        "audio_token_index": audio_token_index,
        "hidden_size": projector_hidden,
        "stack_factor": stack_factor,
        "norm_init": 0.4,
        "projector_act": "swiglu",
        "projector_ln_mid": True,
        "vocab_size": tcfg["vocab_size"],
        "ignore_index": -100,
        "dtype": str(dtype).removeprefix("torch."),
    }

    torch.manual_seed(0)
    encoder = WhisperEncoder(WhisperConfig(**AUDIO_ENCODER))
    tensors = _random_state(encoder, "audio_tower.", dtype)
    dim_in = AUDIO_ENCODER["d_model"] * stack_factor
    std = 0.02
    tensors.update({
        "multi_modal_projector.ln_pre.weight": torch.ones(dim_in, dtype=dtype),
        "multi_modal_projector.linear_1.weight":
            (torch.randn(projector_hidden, dim_in) * std).to(dtype),
        "multi_modal_projector.ln_mid.weight": torch.ones(projector_hidden // 2, dtype=dtype),
        "multi_modal_projector.linear_2.weight":
            (torch.randn(tcfg["hidden_size"], projector_hidden // 2) * std).to(dtype),
    })
    for name, value in text.items():
        tensors["language_model." + name] = value
    _save(tensors, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))

    WhisperFeatureExtractor(feature_size=AUDIO_ENCODER["num_mel_bins"]).save_pretrained(str(out))
    tok.chat_template = chat_template("ultravox")
    tok.save_pretrained(str(out))
    install_ultravox_processor(out, stack_factor=stack_factor)
    _copy_side_files(text_dir, out)

"""The app builder: ``deployments.app:build_app`` is the Serve config's import_path."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import ASR, GATEWAY, LLM, TTS, VAD, AppArgs
from deployments.gateway import Gateway
from deployments.stage_deployments import ASRDeployment, LLMDeployment, TTSDeployment, VADDeployment


def build_app(args: dict[str, Any] | None = None,
              deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """Bind the graph: Gateway -> (VAD, ASR, LLM, TTS), each an independently scaled deployment.

    ``args`` is validated as ``AppArgs`` (unknown keys are errors). ``deployment_options`` maps a
    deployment name to ``.options(...)`` overrides; ``serve run config.yaml`` applies the config's
    ``deployments:`` entries itself, ``deployments.server`` passes them here.
    """
    app_args = AppArgs.model_validate(args or {})
    opts = deployment_options or {}
    unknown = set(opts) - {VAD, ASR, LLM, TTS, GATEWAY}
    if unknown:
        raise ValueError(f"unknown deployment name(s) in options: {sorted(unknown)}")

    def bind(deployment: Any, name: str, *init: Any) -> Any:
        return deployment.options(**opts.get(name, {})).bind(*init)

    d = app_args.model_dump()
    return bind(
        Gateway, GATEWAY,
        bind(VADDeployment, VAD, d["vad"]),
        bind(ASRDeployment, ASR, d["asr"]),
        bind(LLMDeployment, LLM, d["llm"], d["speech_llm"]),
        bind(TTSDeployment, TTS, d["tts"]),
        d,
    )

"""Typed arguments of the voxserve Serve application (no Ray imports: usable by validators).

A Serve config's ``applications[].args`` is validated into ``AppArgs``; unknown keys are errors.
``DEPLOYMENTS`` names every deployment the app builds, so config checks can reject typos that
Ray's own schema would silently ignore.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.auth import AuthConfig
from services.asr import ASRConfig
from services.conversation.settings import Interruptions, Playout, StageTimeouts, ToolCalling, TurnDetection
from services.llm import LLMConfig
from services.tts import TTSConfig
from services.turn_detection import TurnDetectorConfig
from services.vad import VADConfig

#: Deployment names, as they appear in a Serve config's ``deployments:`` list.
VAD, ASR, LLM, TTS, GATEWAY = "VAD", "ASR", "LLM", "TTS", "Gateway"
DEPLOYMENTS: tuple[str, ...] = (VAD, ASR, LLM, TTS, GATEWAY)
#: Import path of the app builder, for ``applications[].import_path``.
IMPORT_PATH = "deployments.app:build_app"
#: gRPC servicer registration function the Serve proxy must import.
GRPC_SERVICER = "protos.voxserve.v1.voice_pb2_grpc.add_VoiceAssistantServicer_to_server"


class GatewayConfig(BaseModel):
    """Session limits and conversation behaviour of the gateway."""

    model_config = ConfigDict(extra="forbid")

    max_sessions: int = Field(32, ge=1,
        description="Concurrent sessions (Converse, realtime) per gateway replica; more get RESOURCE_EXHAUSTED.")
    admission_first_audio_ms: float = Field(1500.0, gt=0,
        description="New sessions are refused while this replica's answers take longer than this to start "
                    "(p95 over admission_window_s): sessions already running keep their latency.")
    admission_window_s: float = Field(30.0, gt=0,
        description="Window of the answers (first-audio latencies, stalls) admission control looks at.")
    admission_stalled_share: float = Field(0.2, gt=0, le=1,
        description="New sessions are also refused while more than this share of the window's answers "
                    "stalled at the caller (1: stalls never refuse).")
    admission_input_lag_s: float = Field(1.0, gt=0,
        description="New sessions are refused while the sessions' audio reaches this replica more than this "
                    "many seconds behind real time (median): a backlog in Serve's proxy or the network.")
    admission_stall_ms: float = Field(200.0, ge=0,
        description="An answer counts as stalled (admission) when the caller heard more than this much silence "
                    "inside it: the server's estimate, or the client's PlaybackPosition reports where larger.")
    burst_sessions: int = Field(4, ge=0,
        description="Sessions a full replica still admits beyond max_sessions while the Gateway deployment is "
                    "adding a replica (the router then sends later calls to the new one).")
    retry_after_s: float = Field(2.0, gt=0,
        description="Retry hint sent with RESOURCE_EXHAUSTED (gRPC trailer retry-after-ms).")
    max_message_bytes: int = Field(256 * 1024, ge=1024,
        description="Largest single client message (audio chunk) accepted.")
    max_stream_s: float = Field(3600.0, gt=0, description="Longest input audio per stream, in seconds of audio.")
    max_text_chars: int = Field(2000, ge=1, description="Longest text turn accepted.")
    first_message_timeout_s: float = Field(10.0, gt=0, description="Time allowed for the SessionConfig to arrive.")
    vad_in_gateway: bool = Field(True,
        description="Run the (cheap) VAD inside the gateway instead of calling the VAD deployment.")
    speech_native: bool = Field(False,
        description="Default response mode is speech-native (audio LLM) instead of cascade.")
    output_chunk_ms: int = Field(100, ge=20, le=1000,
        description="Answer audio is sent in chunks of about this length.")
    history_turns: int = Field(8, ge=0, description="User+assistant turn pairs kept as LLM context.")
    turn: TurnDetection = Field(default_factory=TurnDetection,
        description="Default end-of-turn detection of a session (a client may change it).")
    interruptions: Interruptions = Field(default_factory=Interruptions,
        description="Default barge-in behaviour of a session (a client may change it).")
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts,
        description="Deadlines of stage calls; a missed one ends that turn with an Error event.")
    playout: Playout = Field(default_factory=Playout,
        description="How answers' speech synthesis is scheduled against callers' playout buffers.")
    tool_calling: ToolCalling = Field(default_factory=ToolCalling,
        description="Default filler, deadline and continuation of tool calls (gRPC clients may change them; "
        "the realtime API always waits for response.create).")
    turn_detector: TurnDetectorConfig = Field(default_factory=TurnDetectorConfig,
        description="End-of-turn model (Smart Turn), run in the gateway for semantic turn detection.")
    turn_detector_enabled: bool = Field(True,
        description="Load the end-of-turn model; off: semantic turns are judged on the transcript alone.")
    client_audio_timeout_s: float = Field(5.0, gt=0,
        description="A Converse stream that has sent audio and then sends nothing for this long is taken "
                    "as hung up (a live microphone never stops; send silence); its work is stopped.")
    client_idle_timeout_s: float = Field(900.0, gt=0,
        description="A Converse stream that has sent no audio and no message for this long is closed.")
    max_system_prompt_tokens: int = Field(1024, ge=16,
        description="Longest system prompt a session may set, in LLM tokens (bounds each session's "
                    "prefill, so one session cannot stall the others).")


class SessionsConfig(BaseModel):
    """Sessions that outlive their replica: the journal, resume tokens, and the drain."""

    model_config = ConfigDict(extra="forbid")

    journal: Literal["embedded", "redis", "memory", "off"] = Field("embedded",
        description="Where sessions are journaled: embedded (Ray's GCS; survives any Gateway replica), redis "
                    "(survives a Ray cluster restart), memory (this replica only: no resume elsewhere), off.")
    redis_url: str = Field("",
        description="Redis URL of the redis journal (redis://host:6379/0); empty: read redis_url_env.")
    redis_url_env: str = Field("VOXSERVE_REDIS_URL",
        description="Environment variable holding the Redis URL (e.g. from a Kubernetes Secret).")
    ttl_s: float = Field(3600.0, gt=0,
        description="A session's journal entry expires this long after its last activity (resume: NOT_FOUND).")
    resume_token_ttl_s: float = Field(86400.0, gt=0,
        description="A resume token is refused (NOT_FOUND) this long after it was issued.")
    resume_secret_env: str = Field("VOXSERVE_RESUME_SECRET",
        description="Environment variable holding the token-signing secret (32+ bytes, e.g. a Kubernetes "
                    "Secret); unset: a random secret kept in the journal's store, shared by every replica.")
    drain_timeout_s: float = Field(8.0, gt=0,
        description="A draining replica waits this long for each session's turn boundary before moving it.")


class AppArgs(BaseModel):
    """Arguments of ``deployments.app:build_app``: one engine config per stage plus the gateway."""

    model_config = ConfigDict(extra="forbid")

    vad: VADConfig = Field(default_factory=VADConfig, description="VAD engine settings.")
    asr: ASRConfig = Field(default_factory=ASRConfig, description="ASR engine settings.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="LLM engine settings.")
    speech_llm: LLMConfig | None = Field(
        default=None,
        description="Optional audio LLM (Ultravox / Qwen2-Audio) for speech-native turns, beside the text LLM; "
                    "None = speech-native only if `llm.model` is itself an audio LLM.")
    tts: TTSConfig = Field(default_factory=TTSConfig, description="TTS engine settings.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Gateway settings.")
    sessions: SessionsConfig = Field(default_factory=SessionsConfig,
        description="Session journal, resume tokens and the drain of a stopping Gateway replica.")
    auth: AuthConfig = Field(default_factory=AuthConfig,
        description="API keys for the gRPC and WebSocket endpoints (none configured = authentication off).")


def merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, nested mappings key by key; ``base`` is not touched."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out

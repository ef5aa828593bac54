"""Deployment profiles: the one source of the Serve config, local and on Kubernetes.

A profile holds the typed options of every Serve deployment (autoscaling, max_ongoing_requests,
ray_actor_options, graceful shutdown), the app's ``AppArgs`` (model locations and engine
settings) and the size of the Ray cluster that runs it on Kubernetes. From it come:

- ``serve_config(profile)``: a complete Serve config (``serve run``, ``voxserve serve``), written
  to ``deployments/profiles/serve-<profile>.yaml`` by ``scripts/render_k8s.py``;
- ``helm_values(profile)``: the Helm values of ``helm/voxserve/values-<profile>.yaml``, from
  which the chart rebuilds exactly the same Serve config as its ``serveConfigV2``.

``check_serve_config`` is the strict check shared by the chart tests and ``voxserve serve``:
Ray's own schema ignores unknown keys, so a typo'd deployment or option would pass it silently.
No Ray import at module level (Ray's schema is imported only when a check asks for it).
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.autoscaling import SIGNALS
from deployments.config import (
    ASR,
    DEPLOYMENTS,
    GATEWAY,
    GRPC_SERVICER,
    IMPORT_PATH,
    LLM,
    TTS,
    VAD,
    AppArgs,
)
from services.errors import InvalidArgument, NotFound

#: Name of the Serve application (gRPC clients may send it as ``application`` metadata).
APP_NAME = "voxserve"
GRPC_PORT = 9000
HTTP_PORT = 8000
#: Standard gRPC health service, so that kubelet gRPC probes and load balancers can ask the
#: Serve proxy; its ``Check`` is routed to the Gateway like any other method.
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
PROFILE_NAMES: tuple[str, ...] = ("cpu", "gpu")
#: Folder of the generated serve-<profile>.yaml files (shipped as package data).
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


#: Import path of the voice autoscaling policy (a class: Serve instantiates it with policy_kwargs).
VOICE_POLICY = "deployments.autoscaling:VoicePolicy"


PositiveTarget = Annotated[float, Field(gt=0)]


class SignalTargets(BaseModel):
    """policy_kwargs of ``VoicePolicy``: the signals a deployment's replicas report, and targets
    (signal names per deployment: ``deployments.autoscaling.SIGNALS``)."""

    model_config = ConfigDict(extra="forbid")

    counts: dict[str, PositiveTarget] = Field(default_factory=dict,
        description="Additive signal -> target per replica (replicas needed = sum / target).")
    ratios: dict[str, PositiveTarget] = Field(default_factory=dict,
        description="Latency-like signal -> target of its mean (over target: one replica more).")
    budget: dict[str, PositiveTarget] = Field(default_factory=dict,
        description="App-wide latency the Gateway reports (first_audio_ms) -> limit; over it, one replica more.")
    latency_scaling: Literal["auto", "always", "never"] = Field(default="auto",
        description="When ratios and budget add replicas: auto = only on a Ray cluster of more than one node.")


class Policy(BaseModel):
    """Serve's autoscaling_config.policy: which policy decides, with which targets."""

    model_config = ConfigDict(extra="forbid")

    policy_function: str = Field(default=VOICE_POLICY, description="Import path of the policy (module:name).")
    policy_kwargs: SignalTargets = Field(default_factory=SignalTargets, description="The policy's signal targets.")


class Autoscaling(BaseModel):
    """Serve autoscaling_config of one deployment (a subset of Ray's AutoscalingConfig)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound of replicas.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(
        default=300.0, ge=0, description="Load must stay low this long before scaling down.")
    metrics_interval_s: float = Field(default=10.0, gt=0, description="How often replicas report their metrics.")
    look_back_period_s: float = Field(default=30.0, gt=0, description="Window the reported metrics are averaged over.")
    policy: Policy | None = Field(default=None,
        description="Custom policy on the replicas' own signals; None: Serve's ongoing-requests policy.")


class ActorOptions(BaseModel):
    """ray_actor_options: logical resources one replica reserves (scheduling tokens, not limits)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs (fractions allowed).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPU share; a fraction lets stages share one GPU.")


class DeploymentOptions(BaseModel):
    """Serve options of one deployment, as written in a Serve config's ``deployments`` list."""

    model_config = ConfigDict(extra="forbid")

    max_ongoing_requests: int = Field(
        default=8, ge=1, description="Requests one replica handles at once; more queue in the caller.")
    max_queued_requests: int = Field(
        default=-1, ge=-1,
        description="Requests that may wait for a replica (-1: no limit); more get RESOURCE_EXHAUSTED.")
    autoscaling_config: Autoscaling = Field(default_factory=Autoscaling, description="Replica autoscaling.")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Resources per replica.")
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, gt=0, description="Poll period while draining a replica.")
    graceful_shutdown_timeout_s: float = Field(
        default=20.0, ge=0, description="Longest drain of a stopping replica before it is killed.")
    max_surge_percent: int = Field(
        default=0, ge=0, le=100,
        description="Extra replicas (percent of the target) a rolling update may start before stopping old "
                    "ones: old replicas keep serving until their replacements are ready.")
    health_check_period_s: float = Field(default=10.0, gt=0, description="Replica health check period.")
    health_check_timeout_s: float = Field(default=30.0, gt=0, description="Replica health check timeout.")


class WorkerGroup(BaseModel):
    """One KubeRay worker group: pod size and replica bounds (the Ray autoscaler moves between)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Render this group.")
    min_replicas: int = Field(default=1, ge=0, description="Pods kept even when idle.")
    max_replicas: int = Field(default=2, ge=1, description="Upper bound of pods.")
    cpu: str = Field(default="4", description="CPU request and limit of one pod.")
    memory: str = Field(default="16Gi", description="Memory request and limit of one pod.")
    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu per pod.")


class Profile(BaseModel):
    """Everything that differs between the CPU and GPU deployments."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["cpu", "gpu"] = Field(..., description="Profile name.")
    description: str = Field(..., description="One line for the generated files.")
    args: AppArgs = Field(default_factory=AppArgs, description="applications[].args of the app.")
    deployments: dict[str, DeploymentOptions] = Field(..., description="Options per deployment name.")
    cpu_workers: WorkerGroup = Field(default_factory=WorkerGroup, description="CPU worker group.")
    gpu_workers: WorkerGroup = Field(
        default_factory=lambda: WorkerGroup(enabled=False, gpus=1), description="GPU worker group."
    )
    model_cache_size: str = Field(default="20Gi", description="Size of the model cache volume per pod.")
    needs_downloads: bool = Field(default=False, description="Models are hub ids fetched inside the cluster.")


# How fast a profile's deployments scale (``Autoscaling`` fields, checked there): voice wants fast
# up (a caller waiting now) and patient down (a replica stopped too early is a cold start for the
# next burst).
#: CPU: replicas start in seconds; a short look-back so that a ramp is seen within seconds.
CPU_PACE: dict[str, float] = {"upscale_delay_s": 2.0, "downscale_delay_s": 45.0, "metrics_interval_s": 1.0,
                              "look_back_period_s": 5.0}
#: GPU: a replica takes a minute or more (weights, CUDA graphs): scale down only after 5 quiet minutes.
GPU_PACE: dict[str, float] = {"upscale_delay_s": 5.0, "downscale_delay_s": 300.0, "metrics_interval_s": 2.0,
                              "look_back_period_s": 10.0}


def _dep(max_ongoing: int, min_r: int, max_r: int, target: float, cpus: float, gpus: float = 0.0,
         shutdown_s: float = 20.0, max_queued: int = -1, surge: int = 0, pace: dict[str, float] = CPU_PACE,
         counts: dict[str, float] | None = None, ratios: dict[str, float] | None = None,
         budget: dict[str, float] | None = None) -> DeploymentOptions:
    policy = (Policy(policy_kwargs=SignalTargets(counts=counts or {}, ratios=ratios or {}, budget=budget or {}))
              if counts or ratios or budget else None)
    return DeploymentOptions(
        max_ongoing_requests=max_ongoing,
        max_queued_requests=max_queued,
        autoscaling_config=Autoscaling(min_replicas=min_r, max_replicas=max_r,
                                       target_ongoing_requests=target, policy=policy,
                                       **pace),
        ray_actor_options=ActorOptions(num_cpus=cpus, num_gpus=gpus),
        graceful_shutdown_timeout_s=shutdown_s,
        max_surge_percent=surge,
    )


# A voice conversation is one long gRPC stream. A stopping gateway replica moves its sessions at
# their next turn boundary (sessions.drain_timeout_s at most, 8 s by default: SessionMoved, then
# the clients resume elsewhere), so its streams end well within this; the rest is margin for a
# slow client and for Serve's 2 s wait loop.
GATEWAY_SHUTDOWN_S = 60.0
#: A rolling update of the gateway starts the new replicas first: the sessions the old ones move
#: (SessionMoved) then resume at once instead of waiting for a replica to start (~10 s measured).
GATEWAY_SURGE = 100
#: Margin the gateway's graceful_shutdown_timeout_s must leave above sessions.drain_timeout_s.
DRAIN_MARGIN_S = 10.0
# Serve lets a gateway replica take many more streams than the gateway admits, so a burst reaches
# the gateway's own admission check and gets RESOURCE_EXHAUSTED at once, with our message and a
# retry hint, instead of Ray's "Request dropped due to backpressure"; a refusal ends within
# milliseconds, so the headroom never holds real work. The queue is as deep as the headroom: a
# burst of streams opened together waits there for a moment while the proxy's router assigns
# them, and a shallow queue (8) turned 12 of 80 simultaneous opens into Ray's backpressure text.
GATEWAY_HEADROOM = 128
GATEWAY_QUEUE = 128
#: Sessions one CPU-profile gateway replica admits at most; admission control refuses earlier when
#: answers slow down, which on 2 cores happens from 2-4 callers (BENCHMARKS.md, concurrency sweep).
CPU_MAX_SESSIONS = 8


#: Share of max_sessions a gateway replica is kept at: the autoscaler adds one before any is full.
GATEWAY_FILL = 0.75
#: Share of the gateway's latency budget (admission_first_audio_ms) at which every model stage
#: below its max adds a replica: the stages grow before the gateway sheds callers for slow answers.
SCALE_AT_BUDGET = 0.8


def _budget(args: AppArgs) -> dict[str, float]:
    return {"first_audio_ms": SCALE_AT_BUDGET * args.gateway.admission_first_audio_ms}


def _gateway(args: AppArgs, max_r: int, pace: dict[str, float]) -> DeploymentOptions:
    sessions = max(1.0, GATEWAY_FILL * args.gateway.max_sessions)
    return _dep(args.gateway.max_sessions + args.gateway.burst_sessions + GATEWAY_HEADROOM, 1, max_r, sessions,
                cpus=0.25, shutdown_s=GATEWAY_SHUTDOWN_S, max_queued=GATEWAY_QUEUE, surge=GATEWAY_SURGE,
                pace=pace, counts={"sessions": sessions})


def cpu_profile() -> Profile:
    """Embedded default models on CPUs only. Fractions sum to < 2 CPUs at min replicas, so the
    same config also starts on a 2-core laptop; on Kubernetes the CPU group adds pods."""
    args = AppArgs.model_validate({"gateway": {"max_sessions": CPU_MAX_SESSIONS}})
    return Profile(
        name="cpu",
        description="embedded default models (Moonshine Tiny for English, Whisper base for other languages, "
                    "Smart Turn, SmolLM2-135M, Piper joe) on CPU only",
        args=args,
        deployments={
            # surge: a redeploy starts each stage's new replica before stopping the old one, so
            # no stage is ever without a replica (cheap on CPU: ~2 GB for the LLM, briefly)
            # Signal targets from the 2-core concurrency sweep (BENCHMARKS.md): one replica of
            # each keeps answers under the latency target up to ~2-3 callers. Logical CPUs are
            # scheduling tokens: max replicas of every stage fit the 8 `voxserve serve` declares.
            VAD: _dep(64, 1, 2, 16, cpus=0.1, surge=100),
            ASR: _dep(4, 1, 3, 2, cpus=0.5, surge=100, counts={"utterances": 1.5}, ratios={"wait_ms": 250},
                      budget=_budget(args)),
            LLM: _dep(8, 1, 2, 4, cpus=0.5, surge=100, counts={"requests": 3}, ratios={"ttft_ms": 700},
                      budget=_budget(args)),
            # TTS takes up to 16 syntheses in: its slots go to the caller whose audio runs out
            # first (deadline order) only among requests inside the replica, not those waiting
            # in Serve's router in arrival order; the autoscaler counts them (syntheses)
            TTS: _dep(16, 1, 3, 2, cpus=0.5, surge=100, counts={"syntheses": 2}, ratios={"rtf": 0.5},
                      budget=_budget(args)),
            GATEWAY: _gateway(args, 3, CPU_PACE),
        },
        cpu_workers=WorkerGroup(min_replicas=1, max_replicas=4, cpu="4", memory="12Gi"),
        gpu_workers=WorkerGroup(enabled=False, min_replicas=0, max_replicas=1, gpus=1),
        model_cache_size="4Gi",
    )


#: Hub ids of the GPU profile's models; they are downloaded inside the cluster (not embedded).
# Ultravox v0.5 is Llama 3.1 8B Instruct with a Whisper encoder in front: one engine answers both
# cascade (text) turns and speech-native (audio) turns.
GPU_LLM_MODEL = "fixie-ai/ultravox-v0_5-llama-3_1-8b"
GPU_ASR_MODEL = "deepdml/faster-whisper-large-v3-turbo-ct2"
#: Share of each GPU the vLLM replica reserves; vLLM's gpu_memory_utilization matches it.
GPU_LLM_SHARE = 0.6


def gpu_profile() -> Profile:
    """One GPU per worker pod: vLLM takes 0.6 of it, ASR 0.2 and TTS 0.1; VAD and gateway on CPU."""
    # Validated (not model_copy), so a renamed engine field fails here instead of being ignored.
    args = AppArgs.model_validate({
        "asr": {"model": GPU_ASR_MODEL, "device": "cuda", "compute_type": "float16",
                "allow_download": True},
        "llm": {"model": GPU_LLM_MODEL, "max_model_len": 8192, "trust_remote_code": True,
                "gpu_memory_utilization": GPU_LLM_SHARE, "enforce_eager": False,
                # the 8B model answers tool sessions itself (a second vLLM engine would need its own
                # share of the GPU), in Llama 3.1's call format
                "tool_model": "", "tool_parser": "llama3_json"},
        "tts": {"use_cuda": True},
    })
    return Profile(
        name="gpu",
        description=("one GPU per worker pod: vLLM (Ultravox v0.5 on Llama 3.1 8B: text and speech-native "
                     "turns) at 0.6 of the GPU, "
                     "whisper large-v3-turbo at 0.2 and Piper at 0.1"),
        args=args,
        deployments={
            # no surge for the GPU stages: a second replica during a redeploy would need GPU memory
            # that is not there; with one replica per stage a redeploy's retry then waits for the
            # new one (the turn in flight may end with an error event; the call goes on)
            # max replicas: per H100 (docs/gpu-plan.md) one LLM at 0.6, one ASR at 0.2 and TTS
            # in the 0.1 left (two at 0.05), times the GPU group's max pods (2)
            VAD: _dep(64, 1, 4, 16, cpus=0.1, surge=100, pace=GPU_PACE),
            ASR: _dep(32, 1, 2, 16, cpus=1, gpus=0.2, pace=GPU_PACE,
                      counts={"utterances": 12}, ratios={"wait_ms": 100, "batch_fill": 0.75}, budget=_budget(args)),
            LLM: _dep(128, 1, 2, 64, cpus=2, gpus=GPU_LLM_SHARE, pace=GPU_PACE,
                      counts={"requests": 64}, ratios={"ttft_ms": 250}, budget=_budget(args)),
            TTS: _dep(16, 1, 4, 8, cpus=1, gpus=0.05, pace=GPU_PACE, counts={"syntheses": 8}, ratios={"rtf": 0.2},
                      budget=_budget(args)),
            GATEWAY: _gateway(args, 4, GPU_PACE),
        },
        cpu_workers=WorkerGroup(min_replicas=1, max_replicas=2, cpu="4", memory="8Gi"),
        gpu_workers=WorkerGroup(min_replicas=1, max_replicas=2, cpu="8", memory="48Gi", gpus=1),
        model_cache_size="60Gi",
        needs_downloads=True,
    )


def get_profile(profile: str | Profile) -> Profile:
    """The named profile ('cpu' or 'gpu'), or the given one unchanged."""
    if isinstance(profile, Profile):
        return profile
    if profile == "cpu":
        return cpu_profile()
    if profile == "gpu":
        return gpu_profile()
    raise NotFound(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILE_NAMES)}")


def _drop_nulls(data: dict[str, Any], defaults: dict[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict):
            out[key] = _drop_nulls(value, default or {}, f"{path}.{key}")
        elif value is not None:
            out[key] = value
        elif default is not None:
            raise ValueError(f"{path}.{key}: null cannot override a non-null default in Helm "
                             f"values (Helm deletes null keys)")
    return out


def _args_dict(args: AppArgs) -> dict[str, Any]:
    """AppArgs as plain YAML types, every setting shown except nulls: Helm deletes null keys
    from values, so they are left to the (null) defaults for both config paths to agree."""
    return _drop_nulls(args.model_dump(mode="json"), AppArgs().model_dump(mode="json"), "args")


def serve_options(profile: str | Profile) -> dict[str, Any]:
    """The serve-related Helm values (``serve:`` section): ports, args, deployments by name."""
    p = get_profile(profile)
    return {
        "appName": APP_NAME,
        "importPath": IMPORT_PATH,
        "grpcServicerFunctions": [GRPC_SERVICER, HEALTH_SERVICER],
        "grpcPort": GRPC_PORT,
        "httpPort": HTTP_PORT,
        "args": _args_dict(p.args),
        "deployments": {name: p.deployments[name].model_dump(mode="json", exclude_none=True)
                        for name in DEPLOYMENTS if name in p.deployments},
    }


def serve_config_from_options(serve: dict[str, Any]) -> dict[str, Any]:
    """Build a Serve config from the ``serve:`` Helm values; the chart's template does the same."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": serve["httpPort"]},
        "grpc_options": {"port": serve["grpcPort"],
                         "grpc_servicer_functions": list(serve["grpcServicerFunctions"])},
        "applications": [{
            "name": serve["appName"],
            "import_path": serve["importPath"],
            "args": copy.deepcopy(serve["args"]),
            "deployments": [{"name": name, **copy.deepcopy(opts)}
                            for name, opts in sorted(serve["deployments"].items())],
        }],
    }


def serve_config(profile: str | Profile = "cpu") -> dict[str, Any]:
    """The complete Serve config of a profile (what ``serve run`` and KubeRay deploy)."""
    return serve_config_from_options(serve_options(profile))


def max_shutdown_s(serve: dict[str, Any]) -> float:
    """Longest graceful_shutdown_timeout_s of the deployments (the pods must wait longer)."""
    default = DeploymentOptions.model_fields["graceful_shutdown_timeout_s"].default
    return max(float(o.get("graceful_shutdown_timeout_s", default))
               for o in serve["deployments"].values())


#: Margin of the Ray autoscaler's idle timeout over the slowest deployment downscale delay.
IDLE_MARGIN_S = 60


def _idle_timeout_s(p: Profile) -> int:
    slowest = max(d.autoscaling_config.downscale_delay_s for d in p.deployments.values())
    return int(max(120, slowest + IDLE_MARGIN_S))


def helm_values(profile: str | Profile) -> dict[str, Any]:
    """Helm values of a profile (``values-<profile>.yaml``): the serve section and cluster size."""
    p = get_profile(profile)
    serve = serve_options(p)
    cpu, gpu = p.cpu_workers, p.gpu_workers

    def group(g: WorkerGroup) -> dict[str, Any]:
        limits: dict[str, Any] = {"cpu": g.cpu, "memory": g.memory}
        if g.gpus:
            limits["nvidia.com/gpu"] = g.gpus
        return {"enabled": g.enabled, "minReplicas": g.min_replicas,
                "maxReplicas": g.max_replicas, "gpus": g.gpus,
                "resources": {"requests": dict(limits), "limits": limits}}

    return {
        "profile": p.name,
        "workerGroups": {"cpu": group(cpu), "gpu": group(gpu)},
        # The Ray autoscaler removes an idle pod only after Serve had time to scale its replicas
        # down: else a pod would go and come back in a loop (docs/autoscaling.md, tuning).
        "autoscaler": {"idleTimeoutSeconds": _idle_timeout_s(p)},
        # The images carry what each profile needs: docker/Dockerfile.cpu prepares the embedded
        # models at build time; GPU models are hub ids downloaded into the cache at first start.
        # So no prepare-models init container (it is for images built without the models).
        "modelCache": {"sizeLimit": p.model_cache_size, "prepare": {"enabled": False}},
        # Pods outlive the slowest replica drain plus the proxy's own draining period.
        "shutdown": {"terminationGracePeriodSeconds": int(max_shutdown_s(serve)) + 30},
        "serve": serve,
    }


# --- loading a generated Serve config ------------------------------------------------------------

def serve_config_path(profile: str) -> Path:
    """Path of the generated ``serve-<profile>.yaml``."""
    return PROFILES_DIR / f"serve-{profile}.yaml"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def load_serve_config(profile: str = "cpu", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``serve-<profile>.yaml`` and apply ``overrides``; the result passes the strict check.

    ``overrides`` is deep-merged into the config (dicts merge, other values replace). Two extra
    keys address the voxserve application: ``args`` (merged into its AppArgs) and
    ``deployments`` (a dict by deployment name, merged into that deployment's options), e.g.
    ``{"grpc_options": {"port": 9100}, "deployments": {"LLM": {"max_ongoing_requests": 4}}}``.
    Raises NotFound for an unknown profile, InvalidArgument if the result fails the check.
    """
    if profile not in PROFILE_NAMES:
        raise NotFound(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILE_NAMES)}")
    path = serve_config_path(profile)
    # The file is generated from serve_config(profile) (a test keeps them equal); a non-editable
    # install may lack it, so build the same config then.
    config: dict[str, Any] = (yaml.safe_load(path.read_text()) if path.is_file()
                              else serve_config(profile))
    over = copy.deepcopy(overrides or {})
    app = next(a for a in config["applications"] if a["name"] == APP_NAME)
    if "args" in over:
        _merge(app.setdefault("args", {}), over.pop("args"))
    for name, opts in (over.pop("deployments", None) or {}).items():
        if name not in DEPLOYMENTS:
            raise InvalidArgument(f"unknown deployment '{name}' in overrides; "
                                  f"deployments: {', '.join(DEPLOYMENTS)}")
        entry = next((d for d in app["deployments"] if d["name"] == name), None)
        if entry is None:
            entry = {"name": name}
            app["deployments"].append(entry)
        _merge(entry, opts)
    _merge(config, over)
    problems = check_serve_config(config)
    if problems:
        raise InvalidArgument("invalid serve config: " + "; ".join(problems))
    return config


# --- strict check ---------------------------------------------------------------------------------

def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, with Optional/Union/Annotated taken apart."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]


def _strict_value(annotation: Any, value: Any, path: str, out: list[str]) -> None:
    alternatives = _unwrap(annotation)
    plain = {typing.get_origin(a) or a for a in alternatives}
    if value is None:
        return
    if plain & {int, float} and str not in plain and (
            isinstance(value, bool) or not isinstance(value, int | float)):
        out.append(f"{path}: must be a number, got {value!r}")
        return
    for alt in alternatives:
        if isinstance(alt, type) and issubclass(alt, BaseModel) and isinstance(value, dict):
            _strict_walk(alt, value, path, out)
            return
        if typing.get_origin(alt) is list and isinstance(value, list) and typing.get_args(alt):
            for i, item in enumerate(value):
                _strict_value(typing.get_args(alt)[0], item, f"{path}[{i}]", out)
            return


def _strict_walk(model: type[BaseModel], data: dict[str, Any], path: str, out: list[str]) -> None:
    """Unknown keys and non-numeric numbers, checked against a pydantic model's declared fields.

    Ray's Serve schema ignores unknown keys and coerces strings like "0.5" into numbers; both
    hide mistakes in hand-edited values, so both are reported here.
    """
    fields = model.model_fields
    aliases = {f.alias: n for n, f in fields.items() if f.alias}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            out.append(f"{path}.{key}: unknown option (valid: {', '.join(sorted(fields))})")
            continue
        _strict_value(fields[name].annotation, value, f"{path}.{key}", out)


def check_serve_config(config: dict[str, Any], ray_schema: bool = True) -> list[str]:
    """Problems of a Serve config for this app; empty when it is valid.

    Checks, beyond Ray's ``ServeDeploySchema`` (run when ``ray_schema``): every key exists in
    Ray's schema models; the voxserve app imports ``IMPORT_PATH`` and registers the gRPC
    servicer; every deployment name is one the app builds; ``args`` validate strictly against
    ``AppArgs`` (read at call time, so new engine fields are picked up); GPU fractions are
    numbers in [0, 1] or whole GPUs; cross-field rules (vLLM memory share within its GPU share,
    CUDA engines only on deployments that reserve a GPU, gateway sessions within its
    max_ongoing_requests).
    """
    problems: list[str] = []
    if not isinstance(config, dict):
        return [f"serve config must be a mapping, got {type(config).__name__}"]
    from ray.serve.schema import ServeDeploySchema

    _strict_walk(ServeDeploySchema, config, "config", problems)
    if ray_schema and not problems:
        try:
            ServeDeploySchema.model_validate(config)
        except ValidationError as exc:
            problems.extend(f"ray schema: {'.'.join(map(str, e['loc']))}: {e['msg']}"
                            for e in exc.errors())
    servicers = (config.get("grpc_options") or {}).get("grpc_servicer_functions") or []
    if GRPC_SERVICER not in servicers:
        problems.append(f"grpc_options.grpc_servicer_functions must include {GRPC_SERVICER}")
    apps = [a for a in config.get("applications") or [] if isinstance(a, dict)]
    ours = [a for a in apps if a.get("import_path") == IMPORT_PATH]
    if len(ours) != 1:
        problems.append(f"exactly one application must have import_path {IMPORT_PATH}")
        return problems
    problems.extend(check_app(ours[0]))
    return problems


def check_app(app: dict[str, Any]) -> list[str]:
    """Strict checks of the voxserve application entry (names, args, GPU shares)."""
    problems: list[str] = []
    deps = [d for d in app.get("deployments") or [] if isinstance(d, dict)]
    seen: set[str] = set()
    by_name: dict[str, dict[str, Any]] = {}
    for d in deps:
        name = d.get("name")
        if name not in DEPLOYMENTS:
            problems.append(f"deployment '{name}' is not part of the app "
                            f"(deployments: {', '.join(DEPLOYMENTS)})")
        elif name in seen:
            problems.append(f"deployment '{name}' is listed twice")
        else:
            seen.add(name)
            by_name[name] = d
        gpus = (d.get("ray_actor_options") or {}).get("num_gpus", 0)
        if isinstance(gpus, int | float) and not isinstance(gpus, bool) and (
                gpus < 0 or (gpus > 1 and gpus != int(gpus))):
            problems.append(f"deployment '{name}': num_gpus {gpus} must be a fraction in [0, 1] "
                            f"or a whole number of GPUs")
    try:
        args = AppArgs.model_validate(app.get("args") or {}, strict=True)
    except ValidationError as exc:
        problems.extend(f"args.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return problems

    def gpus_of(name: str) -> float:
        value = (by_name.get(name, {}).get("ray_actor_options") or {}).get("num_gpus", 0)
        return float(value) if isinstance(value, int | float) else 0.0

    llm_gpus = gpus_of(LLM)
    if llm_gpus and args.llm.gpu_memory_utilization > llm_gpus + 1e-9:
        problems.append(f"args.llm.gpu_memory_utilization {args.llm.gpu_memory_utilization} "
                        f"exceeds the LLM deployment's num_gpus {llm_gpus}: vLLM would take "
                        f"memory reserved for ASR/TTS")
    if args.asr.device == "cuda" and not gpus_of(ASR):
        problems.append("args.asr.device is 'cuda' but the ASR deployment reserves no GPU")
    if args.tts.use_cuda and not gpus_of(TTS):
        problems.append("args.tts.use_cuda is set but the TTS deployment reserves no GPU")
    shutdown = by_name.get(GATEWAY, {}).get("graceful_shutdown_timeout_s", 20.0)
    if isinstance(shutdown, int | float) and shutdown < args.sessions.drain_timeout_s + DRAIN_MARGIN_S:
        problems.append(f"Gateway graceful_shutdown_timeout_s {shutdown:g} leaves less than {DRAIN_MARGIN_S:g} s "
                        f"after sessions.drain_timeout_s {args.sessions.drain_timeout_s:g}: Serve would cut "
                        "sessions before they are moved")
    gw = by_name.get(GATEWAY, {}).get("max_ongoing_requests")
    admitted = args.gateway.max_sessions + args.gateway.burst_sessions
    if isinstance(gw, int) and gw < admitted:
        problems.append(f"Gateway max_ongoing_requests {gw} is below gateway.max_sessions + burst_sessions "
                        f"{admitted}: streams would queue instead of starting")
    problems.extend(_check_policies(by_name, args))
    return problems


def _check_policies(by_name: dict[str, dict[str, Any]], args: AppArgs) -> list[str]:
    """VoicePolicy kwargs: signals the deployment's replicas report, and targets that agree with
    the gateway's own limits (they are numbers in the config, not derived at run time)."""
    problems: list[str] = []
    for name, d in by_name.items():
        policy = ((d.get("autoscaling_config") or {}).get("policy") or {})
        if policy.get("policy_function", VOICE_POLICY) != VOICE_POLICY or not policy:
            continue
        kwargs = policy.get("policy_kwargs") or {}
        try:
            SignalTargets.model_validate(kwargs)
        except ValidationError as exc:
            problems.extend(f"deployment '{name}': autoscaling policy_kwargs.{'.'.join(map(str, e['loc']))}: "
                            f"{e['msg']}" for e in exc.errors())
            continue
        known = SIGNALS.get(name, set())
        for kind in ("counts", "ratios"):
            for signal in kwargs.get(kind) or {}:
                if signal not in known:
                    problems.append(f"deployment '{name}': autoscaling signal {kind}.{signal} is not reported by "
                                    f"its replicas (they report: {', '.join(sorted(known)) or 'none'})")
        for signal, limit in (kwargs.get("budget") or {}).items():
            if signal not in SIGNALS[GATEWAY]:
                problems.append(f"deployment '{name}': budget.{signal} is not a Gateway signal")
            elif isinstance(limit, int | float) and limit > args.gateway.admission_first_audio_ms:
                problems.append(f"deployment '{name}': budget.{signal} {limit:g} is over gateway."
                                f"admission_first_audio_ms {args.gateway.admission_first_audio_ms:g}: the gateway "
                                "would shed callers before this stage grows")
        sessions = (kwargs.get("counts") or {}).get("sessions")
        if name == GATEWAY and isinstance(sessions, int | float) and sessions > args.gateway.max_sessions:
            problems.append(f"Gateway autoscaling target sessions {sessions:g} is over gateway.max_sessions "
                            f"{args.gateway.max_sessions}: replicas would be full before another is added")
    return problems

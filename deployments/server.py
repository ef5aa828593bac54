"""Run the voxserve app on a local Ray cluster (``voxserve serve``, the demo and the tests)."""

from __future__ import annotations

import copy
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from deployments.config import GRPC_SERVICER, merged

#: Environment every local Ray process needs (token auth off: loopback-only local cluster).
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def set_local_env(cache_root: str | os.PathLike[str] | None = None) -> None:
    """Defaults for local runs (tests, benchmarks, ``voxserve serve``): Ray without token auth or
    usage stats, and, given ``cache_root``, vLLM's and torch's compile caches inside it."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    if cache_root is not None:
        for key, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
            os.environ.setdefault(key, os.path.join(cache_root, sub))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    """Handle to a running local deployment."""

    grpc_address: str
    http_port: int
    app_name: str
    #: With direct ingress: the gateway replica's own gRPC address (no proxy in between).
    direct_grpc_address: str | None = None

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def start_local(serve_config: dict[str, Any], *, grpc_port: int | None = None, http_port: int | None = None,
                num_cpus: int | None = None, object_store_mb: int = 256, app_overrides: dict[str, Any] | None = None,
                timeout_s: float = 600.0, http_host: str = "127.0.0.1",
                direct_ingress: bool = False,
                deployment_options: dict[str, dict[str, Any]] | None = None) -> LocalServer:
    """Start Ray + Serve in this machine and deploy the app described by a Serve config dict.

    ``app_overrides`` is merged into the app's ``args`` (e.g. {"gateway": {"max_sessions": 4}}).
    ``deployment_options`` adds ``.options(...)`` per deployment name on top of the config's
    ``deployments:`` entries (the tests deploy subclasses that expose more: ``func_or_class``).
    Ray's logical CPUs default to at least 8 so that replicas of every stage fit on a small machine:
    stages are mostly idle between turns, and the OS shares the real cores.
    """
    set_local_env()
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from deployments.app import build_app

    config = copy.deepcopy(serve_config)
    app = config["applications"][0]
    args = merged(app.get("args", {}), app_overrides or {})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    for name, extra in (deployment_options or {}).items():
        options[name] = {**options.get(name, {}), **extra}
    grpc_port = grpc_port or int(config.get("grpc_options", {}).get("port", 9000))
    http_port = http_port or free_port()

    env = dict(LOCAL_ENV)
    direct_grpc: int | None = None
    if direct_ingress:
        # Serve's throughput mode: the gateway replica serves gRPC and HTTP itself (no proxy actor
        # relaying every client message: ~25% of a core per streaming session on 2 cores), handles
        # talk gRPC, user code runs on the replica's own loop. Experimental in Ray 2.60.
        direct_grpc, direct_http = free_port(), free_port()
        env.update(RAY_SERVE_THROUGHPUT_OPTIMIZED="1",
                   RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=str(direct_grpc),
                   RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=str(direct_grpc + 50),
                   RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(direct_http),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(direct_http + 50))
        os.environ.update(env)
    ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 2), include_dashboard=False,
             object_store_memory=object_store_mb * 1024 * 1024, log_to_driver=False,
             runtime_env={"env_vars": env}, ignore_reinit_error=True)
    serve.start(http_options=HTTPOptions(host=http_host, port=http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=config.get(
                    "grpc_options", {}).get("grpc_servicer_functions", [GRPC_SERVICER])))
    t0 = time.monotonic()
    serve.run(build_app(args, options), name=app.get("name", "voxserve"),
              route_prefix=app.get("route_prefix", "/"), blocking=False)
    _wait_healthy(app.get("name", "voxserve"), timeout_s - (time.monotonic() - t0))
    return LocalServer(f"127.0.0.1:{grpc_port}", http_port, app.get("name", "voxserve"),
                       f"127.0.0.1:{direct_grpc}" if direct_grpc else None)


def _wait_healthy(app_name: str, timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"voxserve failed to deploy: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"voxserve was not healthy after {timeout_s:.0f} s")



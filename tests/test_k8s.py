"""Kubernetes packaging, validated offline: Helm chart, rendered manifests, Serve configs.

Tools come from PyPI only: helm-python-sdk (Helm's Go SDK in a wheel) renders and lints,
kubernetes-validate holds the Kubernetes JSON schemas, jsonschema checks the RayService against
the vendored KubeRay CRD schema, and Ray's own ServeDeploySchema plus our strict check
(deployments.profiles.check_serve_config) validate the embedded serveConfigV2.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.auth import ApiKeyAuth, AuthConfig, load_keys
from deployments.config import DEPLOYMENTS, LLM, AppArgs
from deployments.profiles import (
    PROFILE_NAMES,
    check_serve_config,
    helm_values,
    load_serve_config,
    serve_config,
    serve_config_from_options,
)
from services.errors import InvalidArgument, NotFound

helm = pytest.importorskip("helm_python", reason="pip install -e .[dev] (helm-python-sdk)")
kv = pytest.importorskip("kubernetes_validate", reason="pip install -e .[dev] (kubernetes-validate)")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "voxserve"
CRD_SCHEMA = Path(__file__).parent / "data" / "kuberay-v1.7.0-rayservice-v1.schema.json"
#: Kubernetes version the standard resources are validated against (gRPC probes: >= 1.27).
K8S_VERSION = "1.31.0"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "scripts" / "render_k8s.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_k8s", module)
    spec.loader.exec_module(module)
    return module


render_k8s = _load_script()


def docs_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]


def rayservice_of(rendered: dict[str, str]) -> dict[str, Any]:
    (rs,) = [d for d in docs_of(rendered) if d["kind"] == "RayService"]
    return rs


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    """Chart rendered per profile, with the optional ServiceMonitor on (so it is checked too)."""
    on = {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}
    return {p: render_k8s.render_chart(deep_merge(helm_values(p), on)) for p in PROFILE_NAMES}


@pytest.fixture(scope="module")
def crd_validator() -> Any:
    schema = json.loads(CRD_SCHEMA.read_text())
    return jsonschema.Draft7Validator(strictify(schema))


@pytest.fixture()
def chart_without_schema(tmp_path: Path) -> Path:
    """A copy of the chart minus values.schema.json: what a user gets with
    --skip-schema-validation, so the checks after rendering must still catch mistakes."""
    copy_dir = tmp_path / "voxserve"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    return copy_dir


def strictify(schema: Any) -> Any:
    """Reject unknown fields, as the API server does with strict field validation.

    CRD schemas leave additionalProperties open (the server prunes unknown fields silently),
    which would hide a misspelled field; objects that preserve unknown fields stay open.
    """
    if isinstance(schema, dict):
        out = {k: strictify(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strictify(v) for v in schema]
    return schema


# --- one source -----------------------------------------------------------------------------------

def test_generated_files_in_sync() -> None:
    """k8s/, values-*.yaml, values.schema.json and serve-*.yaml match deployments/profiles.py."""
    problems = render_k8s.drift()
    assert not problems, "run `python scripts/render_k8s.py`:\n" + "\n".join(problems)[:4000]


def test_render_script_check_mode() -> None:
    assert render_k8s.main(["--check"]) == 0


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_chart_serve_config_is_the_local_one(profile: str, rendered: dict[str, dict[str, str]]) -> None:
    chart_config = yaml.safe_load(rayservice_of(rendered[profile])["spec"]["serveConfigV2"])
    local = load_serve_config(profile)
    assert chart_config == serve_config(profile) == local
    assert serve_config_from_options(helm_values(profile)["serve"]) == local


def without_generated_keys(rendered: dict[str, str]) -> dict[str, str]:
    """The rendering with the chart-generated API key blanked (a fresh random one per render)."""
    return {name: re.sub(r"(?m)^(  (api-keys|resume-secret): ).*$", r"\1<generated>", text)
            for name, text in rendered.items()}


def test_chart_defaults_are_the_cpu_profile() -> None:
    assert without_generated_keys(render_k8s.render_chart({})) == \
        without_generated_keys(render_k8s.render_chart(helm_values("cpu")))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_profiles_pass_ray_and_strict_checks(profile: str) -> None:
    config = serve_config(profile)
    assert check_serve_config(config) == []
    names = [d["name"] for d in config["applications"][0]["deployments"]]
    assert sorted(names) == sorted(DEPLOYMENTS)
    assert config["grpc_options"]["port"] == 9000


def test_gpu_profile_shares_one_gpu() -> None:
    deps = {d["name"]: d for d in serve_config("gpu")["applications"][0]["deployments"]}
    gpus = {n: d["ray_actor_options"]["num_gpus"] for n, d in deps.items()}
    assert 0.5 <= gpus[LLM] <= 0.7
    assert gpus["VAD"] == gpus["Gateway"] == 0
    assert 0 < gpus["ASR"] and 0 < gpus["TTS"]
    assert sum(gpus.values()) <= 1.0
    values = helm_values("gpu")
    assert values["workerGroups"]["gpu"]["enabled"]
    assert values["workerGroups"]["gpu"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = AppArgs.model_validate(serve_config("gpu")["applications"][0]["args"])
    assert args.llm.gpu_memory_utilization <= gpus[LLM]
    cpu = serve_config("cpu")["applications"][0]["deployments"]
    assert all(d["ray_actor_options"]["num_gpus"] == 0 for d in cpu)


# --- structure of the rendered cluster ------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_rayservice_cluster_shape(profile: str, rendered: dict[str, dict[str, str]]) -> None:
    rs = rayservice_of(rendered[profile])
    assert rs["apiVersion"] == "ray.io/v1"
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert "cpu" in groups
    assert ("gpu" in groups) == (profile == "gpu")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    longest = max(d["graceful_shutdown_timeout_s"] for d in serve["applications"][0]["deployments"])
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pod = g["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["terminationGracePeriodSeconds"] >= longest + 5
        assert c["readinessProbe"]["grpc"]["port"] == serve["grpc_options"]["port"]
        assert any(v["name"] == "model-cache" for v in pod["volumes"])
        gpu_limit = c["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpu_limit == (1 if g["groupName"] == "gpu" else 0)
        most = max(d["ray_actor_options"]["num_gpus"] for d in serve["applications"][0]["deployments"])
        if g["groupName"] == "gpu":
            assert most <= gpu_limit
    ports = {p["name"]: p for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    kinds = sorted(d["kind"] for d in docs_of(rendered[profile]))
    # Secrets: the generated API key and the resume-token secret
    assert kinds == ["RayService", "Secret", "Secret", "Service", "ServiceMonitor"]


# --- offline validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_helm_lint(profile: str) -> None:
    report = helm.lint(str(CHART), helm_values(profile), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_standard_resources_match_kubernetes_schemas(profile: str,
                                                     rendered: dict[str, dict[str, str]]) -> None:
    checked = 0
    for doc in docs_of(rendered[profile]):
        if doc["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/")):
            continue
        kv.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    rs = rayservice_of(rendered[profile])
    # The pod templates and the Service embedded in the RayService are core objects too:
    # check them with the (strict) Kubernetes schemas, tighter than the CRD's copy.
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    for i, template in enumerate(templates):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"t{i}"}, "template": template}
        kv.validate(pod_template, K8S_VERSION, strict=True)
        checked += 1
    svc = {"apiVersion": "v1", "kind": "Service", **rs["spec"]["serveService"]}
    kv.validate(svc, K8S_VERSION, strict=True)
    assert checked >= 3


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_rayservice_matches_kuberay_crd(profile: str, rendered: dict[str, dict[str, str]],
                                       crd_validator: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in crd_validator.iter_errors(rayservice_of(rendered[profile]))]
    assert errors == []


def test_crd_check_rejects_bad_rayservice(rendered: dict[str, dict[str, str]],
                                          crd_validator: Any) -> None:
    rs = rayservice_of(rendered["gpu"])
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    assert not crd_validator.is_valid(bad)
    typo = copy.deepcopy(rs)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscale"] = True
    assert not crd_validator.is_valid(typo)


# --- negative cases: what users get wrong ---------------------------------------------------------

def _write_values(tmp_path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """A user's values file, read back the way Helm reads `-f`."""
    path = tmp_path / "my-values.yaml"
    path.write_text(yaml.safe_dump(values))
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "typo'd deployment name": (
        {"serve": {"deployments": {"ASRR": {"max_ongoing_requests": 4}}}}, "ASRR"),
    "non-numeric GPU fraction": (
        {"serve": {"deployments": {LLM: {"ray_actor_options": {"num_gpus": "half"}}}}}, "num_gpus"),
    "GPU fraction as a string": (
        {"serve": {"deployments": {LLM: {"ray_actor_options": {"num_gpus": "0.5"}}}}}, "num_gpus"),
    "typo'd deployment option": (
        {"serve": {"deployments": {LLM: {"max_ongoing_request": 4}}}}, "max_ongoing_request"),
    "typo'd autoscaling option": (
        {"serve": {"deployments": {LLM: {"autoscaling_config": {"max_replica": 4}}}}},
        "max_replica"),
    "typo'd engine arg": ({"serve": {"args": {"llm": {"modle": "x"}}}}, "modle"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_helm_schema(case: str, tmp_path: Path) -> None:
    values, needle = BAD_VALUES[case]
    with pytest.raises(helm.HelmError, match=needle.split(".")[-1]):
        render_k8s.render_chart(_write_values(tmp_path, values))
    assert helm.lint(str(CHART), values)["errors"]


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_strict_serve_check(case: str, tmp_path: Path,
                                            chart_without_schema: Path) -> None:
    """Rendered without the chart schema, the embedded serveConfigV2 still fails our check
    (Ray's schema alone ignores unknown keys and coerces "0.5")."""
    values, needle = BAD_VALUES[case]
    out = render_k8s.render_chart(_write_values(tmp_path, values), chart=chart_without_schema)
    config = yaml.safe_load(rayservice_of(out)["spec"]["serveConfigV2"])
    problems = check_serve_config(config)
    assert problems and any(needle in p for p in problems), problems


def test_ray_schema_alone_misses_typos() -> None:
    """Why the strict check exists: Ray accepts a config with unknown names."""
    from ray.serve.schema import ServeDeploySchema

    config = serve_config("cpu")
    config["applications"][0]["deployments"][0]["max_ongoing_request"] = 4
    ServeDeploySchema.model_validate(config)
    assert check_serve_config(config)


def test_cross_field_rules() -> None:
    config = serve_config("gpu")
    app = config["applications"][0]
    app["args"]["llm"]["gpu_memory_utilization"] = 0.9
    deps = {d["name"]: d for d in app["deployments"]}
    deps["Gateway"]["max_ongoing_requests"] = 2
    deps["ASR"]["ray_actor_options"]["num_gpus"] = 1.5
    problems = " | ".join(check_serve_config(config))
    assert "gpu_memory_utilization" in problems
    assert "max_sessions" in problems
    assert "1.5" in problems


def test_grace_period_shorter_than_serve_drain_fails() -> None:
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render_k8s.render_chart({"shutdown": {"terminationGracePeriodSeconds": 30}})


# --- load_serve_config ----------------------------------------------------------------------------

def test_load_serve_config_overrides() -> None:
    config = load_serve_config("cpu", {
        "grpc_options": {"port": 9100},
        "args": {"llm": {"max_tokens": 32}},
        "deployments": {LLM: {"max_ongoing_requests": 3}},
    })
    assert config["grpc_options"]["port"] == 9100
    assert config["grpc_options"]["grpc_servicer_functions"]  # merged, not replaced
    app = config["applications"][0]
    assert app["args"]["llm"]["max_tokens"] == 32
    llm = next(d for d in app["deployments"] if d["name"] == LLM)
    assert llm["max_ongoing_requests"] == 3
    assert llm["ray_actor_options"]["num_cpus"] > 0
    with pytest.raises(InvalidArgument, match="ASRR"):
        load_serve_config("cpu", {"deployments": {"ASRR": {}}})
    with pytest.raises(InvalidArgument, match="modle"):
        load_serve_config("cpu", {"args": {"llm": {"modle": "x"}}})
    with pytest.raises(NotFound):
        load_serve_config("tpu")


# --- API keys (auth.*) ----------------------------------------------------------------------------

def _containers(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every container and init container of the Ray pods."""
    cluster = rayservice_of(rendered)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["containers"] + pod.get("initContainers", [])]


def _key_env(container: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in container.get("env", []) if e["name"] == "VOXSERVE_API_KEYS"), None)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_auth_on_by_default_with_a_generated_secret(profile: str) -> None:
    rendered = render_k8s.render_chart(helm_values(profile))
    (secret,) = [d for d in docs_of(rendered) if d["kind"] == "Secret" and "api-keys" in d["metadata"]["name"]]
    assert secret["metadata"]["name"] == "voxserve-api-keys"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert len(key) == 48 and key.isalnum()
    for c in _containers(rendered):
        assert _key_env(c) == {"name": "VOXSERVE_API_KEYS", "valueFrom": {"secretKeyRef": {
            "name": "voxserve-api-keys", "key": "api-keys"}}}, c["name"]
    # the key reaches the app only through the Secret, never through the Serve config
    rs_text = yaml.safe_dump(rayservice_of(rendered))
    assert key not in rs_text
    # what the gateway does at start-up in that pod: the app args plus the environment
    args = AppArgs.model_validate(yaml.safe_load(rayservice_of(rendered)["spec"]["serveConfigV2"])
                                  ["applications"][0]["args"])
    auth = ApiKeyAuth.from_config(args.auth, {"VOXSERVE_API_KEYS": key})
    assert auth.enabled and auth.is_valid(key) and not auth.is_valid(key[:-1])
    # every render makes a new key (lookup keeps the existing one on a live cluster)
    again = next(d for d in docs_of(render_k8s.render_chart(helm_values(profile))) if d["kind"] == "Secret")
    assert again["data"]["api-keys"] != secret["data"]["api-keys"]


def test_auth_with_an_existing_secret() -> None:
    rendered = render_k8s.render_chart(deep_merge(helm_values("cpu"), {
        "auth": {"existingSecret": "my-keys", "secretKey": "keys"}}))
    assert not [d for d in docs_of(rendered) if d["kind"] == "Secret" and "api-keys" in d["metadata"]["name"]]
    for c in _containers(rendered):
        assert _key_env(c) == {"name": "VOXSERVE_API_KEYS", "valueFrom": {"secretKeyRef": {
            "name": "my-keys", "key": "keys"}}}
    # the variable follows the app's auth.api_keys_env
    renamed = render_k8s.render_chart(deep_merge(helm_values("cpu"), {
        "auth": {"existingSecret": "my-keys"}, "serve": {"args": {"auth": {"api_keys_env": "MY_KEYS"}}}}))
    for c in _containers(renamed):
        assert any(e["name"] == "MY_KEYS" for e in c["env"]) and _key_env(c) is None


def test_plain_manifests_expect_a_user_secret() -> None:
    """k8s/*.yaml hold no key (it would be committed to git): they read Secret voxserve-api-keys."""
    for profile in PROFILE_NAMES:
        text = (ROOT / "k8s" / f"voxserve-{profile}.yaml").read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        assert not [d for d in docs if d["kind"] == "Secret"]
        assert "kubectl create secret generic voxserve-api-keys" in text
        assert "name: voxserve-api-keys" in text


def test_auth_off() -> None:
    rendered = render_k8s.render_chart(deep_merge(helm_values("cpu"), {"auth": {"enabled": False}}))
    assert not [d for d in docs_of(rendered) if d["kind"] == "Secret" and "api-keys" in d["metadata"]["name"]]
    assert all(_key_env(c) is None for c in _containers(rendered))


def _env(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def test_resume_secret_and_redis_url_come_from_secrets() -> None:
    rendered = render_k8s.render_chart(helm_values("cpu"))
    (secret,) = [d for d in docs_of(rendered) if d["kind"] == "Secret" and "resume" in d["metadata"]["name"]]
    assert secret["metadata"]["name"] == "voxserve-resume-secret"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(secret["data"]["resume-secret"])) >= 32
    for c in _containers(rendered):
        assert _env(c, "VOXSERVE_RESUME_SECRET") == {"name": "VOXSERVE_RESUME_SECRET", "valueFrom": {
            "secretKeyRef": {"name": "voxserve-resume-secret", "key": "resume-secret"}}}
        assert _env(c, "VOXSERVE_REDIS_URL") is None
    own = render_k8s.render_chart(deep_merge(helm_values("cpu"), {"sessions": {
        "existingSecret": "mine", "redisUrlSecret": "redis", "redisUrlKey": "url"}}))
    assert not [d for d in docs_of(own) if d["kind"] == "Secret" and "resume" in d["metadata"]["name"]]
    for c in _containers(own):
        assert _env(c, "VOXSERVE_RESUME_SECRET")["valueFrom"]["secretKeyRef"]["name"] == "mine"  # type: ignore[index]
        assert _env(c, "VOXSERVE_REDIS_URL") == {"name": "VOXSERVE_REDIS_URL", "valueFrom": {
            "secretKeyRef": {"name": "redis", "key": "url"}}}
    shared = render_k8s.render_chart(deep_merge(helm_values("cpu"), {"sessions": {"createSecret": False}}))
    assert all(_env(c, "VOXSERVE_RESUME_SECRET") is None for c in _containers(shared))
    with pytest.raises(helm.HelmError, match="sessions"):
        render_k8s.render_chart(deep_merge(helm_values("cpu"), {"sessions": {"secretKye": "x"}}))


@pytest.mark.parametrize(("values", "needle"), [
    ({"auth": {"createSecret": False}}, "auth.existingSecret"),
    ({"auth": {"existingSecret": "k"}, "serve": {"args": {"auth": {"api_keys_env": ""}}}}, "api_keys_env"),
    ({"auth": {"enabeld": True}}, "enabeld"),
    ({"auth": {"secretKey": ""}}, "secretKey"),
])
def test_bad_auth_values_fail(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(helm.HelmError, match=needle):
        render_k8s.render_chart(deep_merge(helm_values("cpu"), values))


def test_app_auth_config_defaults_keep_local_serving_open() -> None:
    """The profiles carry AuthConfig's defaults: `voxserve serve` without VOXSERVE_API_KEYS runs
    without keys, and the chart turns keys on through the environment alone."""
    for profile in PROFILE_NAMES:
        args = AppArgs.model_validate(serve_config(profile)["applications"][0]["args"])
        assert args.auth == AuthConfig()
        assert load_keys(args.auth, {}) == frozenset()

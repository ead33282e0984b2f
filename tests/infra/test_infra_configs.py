"""Offline checks of the deployment configs under infra/.

No cloud is reachable from CI, so these tests check what can be checked locally:
- every YAML file parses;
- the `ray up` config passes Ray's own config preparation and validation (ray-schema.json) and its
  GCP TPU node checks;
- the KubeRay manifests go through Ray's KubeRay autoscaler translation and carry what TPU/GPU
  scheduling needs;
- the Kubernetes objects use only fields the Kubernetes API models know;
- MLflow (compose and Kubernetes) is bound to localhost / ClusterIP, uses basic-auth and Postgres;
- no file contains a literal credential.
"""

from __future__ import annotations

import collections
import configparser
import fnmatch
import math
import os
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
README = INFRA / "README.md"
RAY_UP_CONFIGS = sorted((INFRA / "ray").glob("*.yaml"))
K8S_DIR = INFRA / "k8s"
RAYCLUSTER_FILES = sorted(K8S_DIR.glob("raycluster-*.yaml"))
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Dummy values for the envsubst placeholders (README, "Variables").
DUMMY_VALUES = {
    "GCP_PROJECT": "test-project",
    "GCP_REGION": "us-west4",
    "GCP_ZONE": "us-west4-a",
    "RUNNER_GIT_URL": "https://github.com/example/runner.git@v0.1.0",
    "RAY_AUTH_TOKEN_FILE": "/home/user/.ray/auth_token",
    "RUNNER_SECRETS_ENV": "/home/user/.config/runner/secrets.env",
    "RUNNER_RAY_IMAGE": "us-west4-docker.pkg.dev/test-project/runner/ray-runner:tpu-test",
    "RUNNER_RAY_GPU_IMAGE": "us-west4-docker.pkg.dev/test-project/runner/ray-runner:cuda-test",
    "MLFLOW_IMAGE": "us-west4-docker.pkg.dev/test-project/runner/mlflow:test",
}
RUNNER_SECRET_ENV = {
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "KAGGLE_USERNAME",
    "KAGGLE_KEY",
    "HF_TOKEN",
}
# Each TPU type's own custom resource (infra/ray/tpu-cluster.yaml, the KubeRay manifests): runner's
# cluster.resources names it, so that no two node types fit the same demand.
TPU_TYPE_RESOURCES = {"v5litepod-8": "tpu-v5e-8", "v6e-8": "tpu-v6e-8", "v4-8": "tpu-v4-8",
                      "v5litepod-16": "tpu-v5e-16"}
# GKE node-selector value -> Ray/Cloud TPU generation name.
GKE_TPU_ACCELERATORS = {
    "tpu-v4-podslice": "v4",
    "tpu-v5-lite-podslice": "v5litepod",
    "tpu-v5p-slice": "v5p",
    "tpu-v6e-slice": "v6e",
}
TPU_RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Fields of the KubeRay ray.io/v1 RayCluster CRD (KubeRay v1.5.1's raycluster_types.go).
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
    "upgradeStrategy", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {
    "serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels",
}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
    "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels",
}
AUTH_OPTIONS_FIELDS = {"mode"}  # v1.5.1's AuthOptions; v1.5.0 has no authOptions at all


# --------------------------------------------------------------------------------------------
# helpers


def all_infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def yaml_files() -> list[Path]:
    return sorted(p for p in all_infra_files() if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(text: str) -> str:
    """envsubst with the documented variables only (shell variables like $HOME stay)."""
    return PLACEHOLDER.sub(lambda m: DUMMY_VALUES.get(m.group(1), m.group(0)), text)


def load_rendered(path: Path) -> list[Any]:
    text = render(path.read_text())
    leftover = PLACEHOLDER.findall(text)
    assert not leftover, f"{path.name}: undocumented placeholders {leftover}"
    return [d for d in yaml.safe_load_all(text) if d is not None]


def compose_interpolate(value: str) -> str:
    """docker compose interpolation with an empty environment: defaults apply, required -> dummy."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return f"<required:{name}>"
        return ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", sub, value)


@cache
def readme_text() -> str:
    return README.read_text()


def readme_logical_lines() -> list[str]:
    """README lines with backslash continuations joined."""
    out, buf = [], ""
    for line in readme_text().splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
        else:
            out.append(buf + line)
            buf = ""
    return out


def walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, path + (i,))


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def ray_start_commands(cmds: list[str]) -> list[str]:
    return [c for c in cmds if re.search(r"\bray start\b", c)]


# --------------------------------------------------------------------------------------------
# Kubernetes API model check (offline replacement for `kubectl --dry-run=server`)


@cache
def k8s_models():
    import kubernetes.client.models as models

    return models


def check_k8s_model(obj: Any, type_name: str, where: str, errors: list[str]) -> None:
    """Recursively check obj against the kubernetes python client model `type_name`.

    Type names look like `V1PodSpec`, `List[V1Container]` / `list[...]`, `Dict[str, str]` /
    `dict(str, str)`, `str`, `int`, `bool`, `object` (int-or-string and free-form fields).
    """
    if type_name.lower().startswith("list["):
        if not isinstance(obj, list):
            errors.append(f"{where}: expected a list, got {type(obj).__name__}")
            return
        for i, item in enumerate(obj):
            check_k8s_model(item, type_name[5:-1], f"{where}[{i}]", errors)
        return
    if type_name.lower().startswith(("dict(", "dict[")):
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a mapping, got {type(obj).__name__}")
            return
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        for k, v in obj.items():
            check_k8s_model(v, inner, f"{where}.{k}", errors)
        return
    if type_name == "str":
        if not isinstance(obj, (str, int, float)) or isinstance(obj, bool):
            errors.append(f"{where}: expected a string, got {obj!r}")
        return
    if type_name == "int":
        if not isinstance(obj, int) or isinstance(obj, bool):
            errors.append(f"{where}: expected an integer, got {obj!r}")
        return
    if type_name == "bool":
        if not isinstance(obj, bool):
            errors.append(f"{where}: expected a boolean, got {obj!r}")
        return
    if type_name in ("object", "datetime", "date", "float"):
        return
    cls = getattr(k8s_models(), type_name)
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected a {type_name} mapping, got {obj!r}")
        return
    json_to_attr = {v: k for k, v in cls.attribute_map.items()}
    for key, value in obj.items():
        attr = json_to_attr.get(key)
        if attr is None:
            errors.append(f"{where}: unknown field {key!r} for {type_name}")
            continue
        check_k8s_model(value, cls.openapi_types[attr], f"{where}.{key}", errors)


K8S_KIND_MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}


# --------------------------------------------------------------------------------------------
# every YAML parses


def test_infra_has_the_expected_files():
    expected = [
        "README.md",
        "ray/tpu-cluster.yaml",
        "k8s/raycluster-tpu-v5e-8.yaml",
        "k8s/raycluster-tpu-v5e-16.yaml",
        "k8s/raycluster-gpu.yaml",
        "k8s/mlflow.yaml",
        "mlflow/docker-compose.yaml",
        "mlflow/.env.example",
        "mlflow/basic_auth.ini",
        "mlflow/Dockerfile",
        "docker/ray-runner.Dockerfile",
        "ray/attach-tpu-slice.sh",
        "k8s/token-auth-fallback.py",
    ]
    missing = [p for p in expected if not (INFRA / p).is_file()]
    assert not missing, missing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: top-level document is {type(doc).__name__}"


@pytest.mark.parametrize(
    "path",
    [p for p in yaml_files() if p.parent.name in ("ray", "k8s")],
    ids=lambda p: str(p.relative_to(INFRA)),
)
def test_placeholders_are_exactly_those_documented_in_readme(path):
    """Every ${VAR} of a file is in the README's envsubst command for that file, and vice versa."""
    rel = str(path.relative_to(ROOT))
    used = set(PLACEHOLDER.findall(path.read_text()))
    documented = None
    for line in readme_logical_lines():
        m = re.search(r"envsubst\s+'([^']*)'\s*<\s*(\S+)", line)
        if m and m.group(2) == rel:
            documented = set(PLACEHOLDER.findall(m.group(1)))
    if not used:
        return
    assert documented is not None, f"README has no `envsubst '...' < {rel}` command"
    assert used == documented, f"{rel}: uses {sorted(used)}, README substitutes {sorted(documented)}"
    assert used <= set(DUMMY_VALUES), sorted(used - set(DUMMY_VALUES))
    for name in used:
        assert f"`{name}`" in readme_text(), f"{name} is not explained in the README variables table"


# --------------------------------------------------------------------------------------------
# `ray up` config


@cache
def ray_up_config(name: str) -> dict:
    (doc,) = load_rendered(INFRA / "ray" / name)
    return doc


@cache
def prepared_ray_up_config(name: str) -> dict:
    """What `ray up` does before talking to the cloud: prepare_config, TPU fill-out, validate_config."""
    import copy

    from ray.autoscaler._private.gcp.node_provider import GCPNodeProvider
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(ray_up_config(name)))
    config = GCPNodeProvider.fillout_available_node_types_resources(config)
    validate_config(config)
    return config


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_passes_ray_validation(path):
    config = prepared_ray_up_config(path.name)
    assert config["provider"]["type"] == "gcp"
    assert config["provider"]["project_id"] == DUMMY_VALUES["GCP_PROJECT"]
    assert config["provider"]["availability_zone"].startswith(config["provider"]["region"])


def test_ray_up_tpu_node_types():
    from ray._private.accelerators import tpu
    from ray.autoscaler._private.gcp.config import (
        _get_num_tpu_chips,
        _is_head_node_a_tpu,
        _is_single_host_tpu,
        get_node_type,
    )
    from ray.autoscaler._private.gcp.node import GCPNodeType

    config = prepared_ray_up_config("tpu-cluster.yaml")
    assert not _is_head_node_a_tpu(config), "TPUs cannot be the Ray head"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("TPU", 0) == 0

    seen: dict[str, bool] = {}
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        if name == config["head_node_type"]:
            assert get_node_type(node) == GCPNodeType.COMPUTE
            continue
        assert get_node_type(node) == GCPNodeType.TPU, name  # also validates acceleratorType
        accel = node["acceleratorType"]
        generation = accel.split("-")[0]
        assert node["runtimeVersion"] == TPU_RUNTIME_VERSIONS[generation], name
        chips_per_host = tpu.get_num_tpu_visible_chips_per_host(accel)
        hosts = math.ceil(_get_num_tpu_chips(node) / chips_per_host)
        resources = node_type["resources"]
        # One runner actor per host requests all of the host's chips; Ray allows 1, 2, 4 or 8.
        assert resources["TPU"] == chips_per_host, f"{name}: TPU {resources['TPU']} != {chips_per_host}/host"
        assert resources["TPU"] in (1, 2, 4, 8)
        assert resources[f"TPU-{accel}-head"] == 1
        assert resources[TPU_TYPE_RESOURCES[accel]] == 1, f"{name}: its own custom resource"
        assert resources.get("CPU", 0) > 0, f"{name}: declare the host's vCPUs (ray start override)"
        seen[accel] = _is_single_host_tpu(node)
        if not seen[accel]:
            assert hosts > 1
            assert node_type["max_workers"] <= 2, "autoscaling TPU slices is unreliable; keep it small"

    assert {"v5litepod-8", "v6e-8", "v4-8"} <= {a for a, single in seen.items() if single}
    assert any(not single for single in seen.values()), "need one multi-host slice type"


def test_ray_up_security_and_install():
    config = ray_up_config("tpu-cluster.yaml")
    head_starts = ray_start_commands(config["head_start_ray_commands"])
    worker_starts = ray_start_commands(config["worker_start_ray_commands"])
    assert head_starts and worker_starts
    for cmd in head_starts + worker_starts:
        assert re.search(r"RAY_AUTH_MODE=token", cmd), f"no token auth: {cmd}"
    for cmd in head_starts:
        assert "--head" in cmd
        assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", cmd), cmd
        assert "JAX_PLATFORMS=cpu" in cmd, "the driver must not initialise JAX on a TPU"
    all_commands = "\n".join(
        c for key in config if key.endswith("_commands") for c in config[key]
    )
    assert "0.0.0.0" not in all_commands, "nothing may bind all interfaces"
    assert "~/.ray/auth_token" in config["file_mounts"]
    worker_setup = "\n".join(config["worker_setup_commands"])
    head_setup = "\n".join(config["head_setup_commands"])
    assert re.search(r'"runner\[tpu\] @ git\+\S+"', worker_setup), worker_setup
    assert re.search(r'"runner @ git\+\S+"', head_setup), "the head installs runner without libtpu"
    assert "google-api-python-client" in head_setup, "the autoscaler on the head needs it"


def tpu_node_types(config: dict) -> dict[str, dict[str, float]]:
    return {name: node_type["resources"] for name, node_type in config["available_node_types"].items()
            if name != config["head_node_type"]}


def test_each_tpu_node_type_answers_a_demand_no_other_type_fits():
    """What a runner host (or slice host) actor asks for fits exactly one node type, so the autoscaler never
    chooses between a type the zone offers and one it lacks."""
    types = tpu_node_types(prepared_ray_up_config("tpu-cluster.yaml"))
    for name, resources in types.items():
        demand = {key: value for key, value in resources.items() if key != "CPU" and not key.endswith("-head")}
        fits = [other for other, offered in types.items() if all(offered.get(k, 0) >= v for k, v in demand.items())]
        assert fits == [name], f"{demand} fits {fits}"
    # Without their custom resources, {TPU: 8} and {TPU: 4} would each fit two types: the reason they exist.
    by_chips = collections.Counter(resources["TPU"] for resources in types.values())
    assert by_chips[8] == 2 and by_chips[4] == 2


def test_uv_and_python_are_pinned_to_a_patch_version_on_every_node():
    config = ray_up_config("tpu-cluster.yaml")
    every_node = "\n".join(config["setup_commands"])
    per_kind = "\n".join(config["head_setup_commands"] + config["worker_setup_commands"])
    (uv,) = set(re.findall(r"astral\.sh/uv/(\d+\.\d+\.\d+)/install\.sh", every_node))
    assert "astral.sh/uv/install.sh" not in every_node + per_kind, "an unversioned uv installer"
    assert f"^uv {uv.replace('.', '[.]')}( |$)" in every_node, "a node with another uv reinstalls this one"
    (python,) = set(re.findall(r"uv venv [^\n]*--python (\S+)", every_node))
    assert re.fullmatch(r"3\.12\.\d+", python), f"--python {python} is not a patch version"
    assert f"sys.version_info[:3] == ({python.replace('.', ', ')})" in every_node, "the venv's Python is checked"
    assert "uv venv" not in per_kind and "--python 3" not in per_kind.replace("--python ~/runner-venv", "")
    assert f"Python {python}" in readme_text() and f"uv {uv}" in readme_text()


def token_auth_fallback():
    import importlib.util

    spec = importlib.util.spec_from_file_location("token_auth_fallback", K8S_DIR / "token-auth-fallback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", RAYCLUSTER_FILES, ids=lambda p: p.name)
def test_the_token_fallback_for_kuberay_before_1_5_1_sets_what_kuberay_1_5_1_sets(path):
    import subprocess

    rendered = render(path.read_text())
    out = subprocess.run([sys.executable, str(K8S_DIR / "token-auth-fallback.py")], input=rendered, text=True,
                         capture_output=True, check=True).stdout
    (cluster,) = [doc for doc in yaml.safe_load_all(out) if doc and doc.get("kind") == "RayCluster"]
    name = cluster["metadata"]["name"]
    assert "authOptions" not in cluster["spec"]
    errors: list[str] = []
    for group_name, group, container in ray_containers(cluster):
        env = env_of(container)
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, group_name
        # KubeRay v1.5.1's SetContainerTokenAuthEnvVars: Secret named after the cluster, key auth_token.
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "auth_token"}
        check_k8s_model(group["template"], "V1PodTemplateSpec", f"{path.name}:{group_name}", errors)
    assert not errors, "\n".join(errors)
    assert token_auth_fallback().with_token_env(rayclusters(path)[0]) == cluster


def test_the_readme_creates_the_fallbacks_token_secret_and_pipes_a_manifest_through_it():
    lines = readme_logical_lines()
    assert any(re.search(r"kubectl -n runner create secret generic runner-v5e-8 --from-literal=auth_token=", line)
               for line in lines)
    assert any("infra/k8s/raycluster-tpu-v5e-8.yaml" in line and "| python3 infra/k8s/token-auth-fallback.py |"
               in line and "kubectl apply -f -" in line for line in lines)


def test_the_hand_made_slice_script_sends_every_host_the_configs_own_commands(tmp_path):
    import json
    import subprocess

    config_path = tmp_path / "runner-tpu.yaml"
    config_path.write_text(render((INFRA / "ray" / "tpu-cluster.yaml").read_text()))
    fake = tmp_path / "bin"
    fake.mkdir()
    calls_file = str(tmp_path / "calls.jsonl")
    (fake / "gcloud").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                 f"open({calls_file!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (fake / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GCP_ZONE": DUMMY_VALUES["GCP_ZONE"], "RAY_AUTH_TOKEN_FILE": DUMMY_VALUES["RAY_AUTH_TOKEN_FILE"],
           "RUNNER_SECRETS_ENV": DUMMY_VALUES["RUNNER_SECRETS_ENV"], "RUNNER_TPU_CONFIG": str(config_path),
           "HEAD_INTERNAL_IP": "10.1.2.3"}
    script = str(INFRA / "ray" / "attach-tpu-slice.sh")
    subprocess.run(["bash", script, "runner-v5e-16"], env=env, check=True, capture_output=True, text=True)

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert all(call[:3] == ["compute", "tpus", "tpu-vm"] and "--worker=all" in call for call in calls), "every host"
    copied = {(call[4], call[5]) for call in calls if call[3] == "scp"}
    assert copied == {(DUMMY_VALUES["RAY_AUTH_TOKEN_FILE"], "runner-v5e-16:~/.ray/auth_token"),
                      (DUMMY_VALUES["RUNNER_SECRETS_ENV"], "runner-v5e-16:~/.runner/secrets.env")}
    remote = calls[-1][calls[-1].index("--command") + 1]
    config = yaml.safe_load(config_path.read_text())
    for command in (config["initialization_commands"] + config["setup_commands"] + config["worker_setup_commands"]
                    + config["worker_start_ray_commands"]):
        assert command in remote, command
    resources = json.dumps(config["available_node_types"]["tpu_v5e_16_slice"]["resources"], separators=(",", ":"))
    assert f"RAY_HEAD_IP=10.1.2.3 RAY_OVERRIDE_RESOURCES='{resources}'" in remote
    assert "tpu-v5e-16" in resources

    public = {**env, "HEAD_INTERNAL_IP": "34.1.2.3"}
    refused = subprocess.run(["bash", script, "runner-v5e-16"], env=public, capture_output=True, text=True)
    assert refused.returncode != 0 and "not a private address" in refused.stderr


READMES = (ROOT / "README.md", README)


def shown_slices() -> list[tuple[str, dict]]:
    """Every `cluster:` setting with a slice_topology that README.md or infra/README.md shows: YAML blocks, inline
    `{...}` settings, and the values a block only mentions in a comment (with 4-chip hosts, which every multi-host
    topology allows)."""
    shown = []
    for readme in READMES:
        where, text = str(readme.relative_to(ROOT)), readme.read_text()
        for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and isinstance(data.get("cluster"), dict) and "slice_topology" in data["cluster"]:
                shown.append((where, data["cluster"]))
                continue
            topologies = re.findall(r"slice_topology: (\d+x\d+(?:x\d+)?)", block)
            generations = re.findall(r"accelerator_version: (v\w+)", block)
            shown += [(where, {"replica": "slice", "slice_topology": topology, "accelerator_version": generation,
                               "resources": {"TPU": 4}}) for topology in topologies for generation in generations]
        for inline in re.findall(r"`(?:cluster: )?(\{[^`]*slice_topology[^`]*\})`", text.replace("\n", " ")):
            shown.append((where, yaml.safe_load(inline)))
    return shown


def test_every_slice_the_readmes_show_passes_runner_validate(tmp_path):
    from typer.testing import CliRunner

    from runner.cli import app
    from runner.config.tpu_slices import TPU_GENERATIONS

    shown = shown_slices()
    assert {where for where, _ in shown} == {"README.md", "infra/README.md"}, shown
    for index, (where, cluster) in enumerate(shown):
        experiment = {"name": "readme-slice", "model": {"source": "synthetic", "preset": "tiny"},
                      "sae": {"source": "synthetic"}, "prompts": ["hi"],
                      "steering": {"layers": [1], "features": [3], "scales": [0]}, "cluster": cluster}
        path = tmp_path / f"slice-{index}.yaml"
        path.write_text(yaml.safe_dump(experiment))
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, f"{where}: {cluster}: {result.output}"
        assert " hosts x " in result.stdout
    # The generations the READMEs list next to accelerator_version are the ones runner takes.
    listed = [group for readme in READMES for line in readme.read_text().splitlines() if "accelerator_version" in line
              for group in re.findall(r"v\w+(?: \| v\w+)+", line)]
    assert listed, "the READMEs list the generations"
    for group in listed:
        assert set(group.split(" | ")) <= set(TPU_GENERATIONS), group


def test_ray_version_is_pinned_consistently():
    versions = set()
    for path in RAY_UP_CONFIGS:
        versions |= set(re.findall(r"ray\[default\]==([\d.]+)", path.read_text()))
    dockerfile = (INFRA / "docker" / "ray-runner.Dockerfile").read_text()
    versions |= set(re.findall(r"ray\[default\]==([\d.]+)", dockerfile))
    versions |= set(re.findall(r"rayproject/ray:([\d.]+)-", dockerfile))
    for path in RAYCLUSTER_FILES:
        for doc in load_docs(path):
            if doc.get("kind") == "RayCluster":
                versions.add(str(doc["spec"]["rayVersion"]))
    assert len(versions) == 1, f"Ray must be the same version everywhere: {versions}"
    (version,) = versions
    assert tuple(int(x) for x in version.split(".")) >= (2, 52, 0), "token auth needs Ray >= 2.52"


# --------------------------------------------------------------------------------------------
# KubeRay manifests


def rayclusters(path: Path) -> list[dict]:
    return [d for d in load_rendered(path) if d.get("kind") == "RayCluster"]


def ray_containers(cluster: dict) -> Iterator[tuple[str, dict, dict]]:
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        # KubeRay: the Ray container is the first container of the pod.
        yield name, group, group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("path", RAYCLUSTER_FILES, ids=lambda p: p.name)
def test_raycluster_structure_and_auth(path):
    (cluster,) = rayclusters(path)
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert set(spec["authOptions"]) <= AUTH_OPTIONS_FIELDS
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head Service must not be public"
    assert not head.get("enableIngress", False)
    assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1"
    errors: list[str] = []
    for name, group, _ in ray_containers(cluster):
        check_k8s_model(group["template"], "V1PodTemplateSpec", f"{path.name}:{name}.template", errors)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", RAYCLUSTER_FILES, ids=lambda p: p.name)
def test_raycluster_credentials_come_from_secrets(path):
    (cluster,) = rayclusters(path)
    for name, _, container in ray_containers(cluster):
        env = env_of(container)
        for var in RUNNER_SECRET_ENV:
            assert var in env, f"{path.name}:{name} lacks {var}"
            ref = env[var].get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref.get("name") and ref.get("key"), f"{path.name}:{name}: {var} not from a Secret"
            assert "value" not in env[var]
        if name == "head":
            assert env["JAX_PLATFORMS"]["value"] == "cpu"


def test_secrets_referenced_in_manifests_are_created_in_readme():
    created: set[tuple[str, str, str]] = set()
    for line in readme_logical_lines():
        m = re.search(r"kubectl\s+-n\s+(\S+)\s+create secret generic\s+(\S+)", line)
        if m:
            for key in re.findall(r"--from-literal=([\w.-]+)=", line):
                created.add((m.group(1), m.group(2), key))
    referenced = set()
    for path in K8S_DIR.glob("*.yaml"):
        for doc in load_rendered(path):
            namespace = doc.get("metadata", {}).get("namespace", "default")
            for p, node in walk(doc):
                if p and p[-1] == "secretKeyRef":
                    referenced.add((namespace, node["name"], node["key"]))
    assert referenced
    missing = referenced - created
    assert not missing, f"Secrets/keys used but never created in README: {sorted(missing)}"


@pytest.mark.parametrize("path", RAYCLUSTER_FILES, ids=lambda p: p.name)
def test_raycluster_accelerator_scheduling(path):
    from ray._private.accelerators import tpu
    from ray.autoscaler._private.kuberay import utils as kuberay_utils
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )
    from ray.util import tpu as ray_util_tpu

    (cluster,) = rayclusters(path)
    # Ray's own translation of the CR (runs validate_config on the result).
    autoscaling = _derive_autoscaling_config_from_ray_cr(cluster)
    node_types = autoscaling["available_node_types"]

    for group in cluster["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        requests, limits = resources["requests"], resources["limits"]
        selectors = pod.get("nodeSelector", {})
        ray_resources = node_types[group["groupName"]]["resources"]
        if "google.com/tpu" in limits or "google.com/tpu" in requests:
            assert str(requests.get("google.com/tpu")) == str(limits.get("google.com/tpu")), (
                "google.com/tpu requests must equal limits"
            )
            chips = int(limits["google.com/tpu"])
            assert chips in (1, 2, 4, 8)
            accelerator = selectors.get("cloud.google.com/gke-tpu-accelerator")
            topology = selectors.get("cloud.google.com/gke-tpu-topology")
            assert accelerator in GKE_TPU_ACCELERATORS, accelerator
            assert topology and re.fullmatch(r"\d+x\d+(x\d+)?", topology), topology
            total = math.prod(int(x) for x in topology.split("x"))
            num_hosts = group.get("numOfHosts", 1)
            assert num_hosts * chips == total, (
                f"numOfHosts {num_hosts} x {chips} chips != {total} chips of topology {topology}"
            )
            accel_type = kuberay_utils.tpu_node_selectors_to_type(topology, accelerator)
            assert tpu.get_num_tpu_visible_chips_per_host(accel_type) == chips, (
                f"a {accel_type} host has {tpu.get_num_tpu_visible_chips_per_host(accel_type)} chips"
            )
            assert ray_resources["TPU"] == chips
            assert ray_resources[f"TPU-{accel_type}-head"] == 1
            # Ray's own chips per host and hosts per slice for this generation and topology.
            version = GKE_TPU_ACCELERATORS[accelerator]
            assert tpu.get_chips_per_host(topology, version) == chips, (
                f"Ray gives a {version} {topology} host {tpu.get_chips_per_host(topology, version)} chips, not {chips}"
            )
            ray_hosts, _ = ray_util_tpu.get_tpu_worker_resources(topology, version, chips_per_vm=chips)
            assert num_hosts == ray_hosts, f"numOfHosts {num_hosts}, Ray: {ray_hosts} hosts"
            assert ray_resources[TPU_TYPE_RESOURCES[accel_type]] == 1, "the type's custom resource, as on ray up"
            tolerations = pod.get("tolerations", [])
            assert any(t.get("key") == "google.com/tpu" for t in tolerations)
        else:
            assert "nvidia.com/gpu" in limits, f"{group['groupName']}: no accelerator requested"
            assert str(requests.get("nvidia.com/gpu")) == str(limits["nvidia.com/gpu"])
            assert "cloud.google.com/gke-accelerator" in selectors
            assert ray_resources["GPU"] == int(limits["nvidia.com/gpu"])
        # Guaranteed QoS: no CPU/memory overcommit on accelerator hosts.
        for res in ("cpu", "memory"):
            assert str(requests[res]) == str(limits[res]), f"{group['groupName']}: {res}"


def test_raycluster_expected_topologies():
    expected = {
        "raycluster-tpu-v5e-8.yaml": ("tpu-v5-lite-podslice", "2x4", 1, 8),
        "raycluster-tpu-v5e-16.yaml": ("tpu-v5-lite-podslice", "4x4", 4, 4),
    }
    for filename, (accel, topology, hosts, chips) in expected.items():
        (cluster,) = rayclusters(K8S_DIR / filename)
        (group,) = cluster["spec"]["workerGroupSpecs"]
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] == {
            "cloud.google.com/gke-tpu-accelerator": accel,
            "cloud.google.com/gke-tpu-topology": topology,
        }
        assert group["numOfHosts"] == hosts
        assert int(pod["containers"][0]["resources"]["limits"]["google.com/tpu"]) == chips


# --------------------------------------------------------------------------------------------
# MLflow on Kubernetes


def mlflow_k8s_docs() -> list[dict]:
    return load_rendered(K8S_DIR / "mlflow.yaml")


def test_k8s_objects_match_kubernetes_api_models():
    errors: list[str] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in load_rendered(path):
            key = (doc.get("apiVersion"), doc.get("kind"))
            if doc.get("kind") == "RayCluster":
                continue
            assert key in K8S_KIND_MODELS, f"{path.name}: unexpected object {key}"
            check_k8s_model(doc, K8S_KIND_MODELS[key], f"{path.name}:{doc['kind']}", errors)
    assert not errors, "\n".join(errors)


def test_nothing_is_exposed_outside_the_cluster():
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in load_rendered(path):
            assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute"), f"{path.name}: {doc['kind']}"
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: {doc['metadata']}"
            for p, _node in walk(doc):
                if p and p[-1] in ("hostNetwork", "hostPort"):
                    pytest.fail(f"{path.name}: {'.'.join(map(str, p))}")
            if doc["kind"] == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), (
                    f"{path.name}: Secrets are created with kubectl, never committed"
                )


def _by_kind(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def check_basic_auth_ini(text: str, where: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    section = parser["mlflow"]
    assert not section.get("admin_password"), f"{where}: the admin password comes from the environment"
    uri = section["database_uri"]
    assert uri.startswith("postgresql"), f"{where}: auth users belong in Postgres, not {uri}"
    assert not re.search(r"://[^/@]*:[^/@]*@", uri), f"{where}: password in database_uri"
    assert section["default_permission"] in ("READ", "NO_PERMISSIONS")
    return section


def test_k8s_mlflow_server():
    docs = mlflow_k8s_docs()
    deploy = _by_kind(docs, "Deployment", "mlflow")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cmd = container.get("command", []) + container.get("args", [])
    assert cmd[:2] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in cmd
    (backend,) = [c.split("=", 1)[1] for c in cmd if c.startswith("--backend-store-uri=")]
    assert backend.startswith("postgresql") and not re.search(r"://[^/@]*:[^/@]*@", backend)
    assert any(c.startswith("--artifacts-destination=") for c in cmd)
    env = env_of(container)
    for var in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"], var
    # basic_auth.ini is a mounted ConfigMap without secrets
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mount = [m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount[0]["name"]]
    configmap = _by_kind(docs, "ConfigMap", volume["configMap"]["name"])
    section = check_basic_auth_ini(configmap["data"][Path(config_path).name], "mlflow.yaml")
    assert "mlflow-postgres" in section["database_uri"]
    # MLflow's Host-header allow-list (same matching as mlflow.server.security_utils): in-cluster
    # clients and kubectl port-forward must pass, anything else must not.
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")]

    def host_ok(host: str) -> bool:
        return "*" in allowed or any(
            fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed
        )

    for host in ("mlflow.mlflow.svc.cluster.local:5000", "mlflow.mlflow:5000", "localhost:5000"):
        assert host_ok(host), host
    assert not host_ok("evil.example.com") and not host_ok("evil.example.com:5000")
    service = _by_kind(docs, "Service", "mlflow")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == 5000


def test_k8s_postgres():
    docs = mlflow_k8s_docs()
    sts = _by_kind(docs, "StatefulSet", "mlflow-postgres")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("postgres:")
    env = env_of(container)
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    init = _by_kind(docs, "ConfigMap", "mlflow-postgres-init")
    assert any("CREATE DATABASE mlflow_auth" in v for v in init["data"].values())


# --------------------------------------------------------------------------------------------
# MLflow with docker compose


@cache
def compose() -> dict:
    (doc,) = load_docs(COMPOSE)
    return doc


def compose_command(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def test_compose_mlflow_binds_localhost_by_default():
    services = compose()["services"]
    mlflow, postgres = services["mlflow"], services["postgres"]
    ports = mlflow.get("ports", [])
    assert ports, "MLflow must publish its port"
    for entry in ports:
        if isinstance(entry, dict):  # long syntax
            host_ip = compose_interpolate(str(entry.get("host_ip", "")))
        else:
            parts = compose_interpolate(str(entry)).split(":")
            assert len(parts) == 3, f"{entry!r}: without an explicit host IP Docker binds 0.0.0.0"
            host_ip = parts[0]
        assert host_ip == "127.0.0.1", f"{entry!r} binds {host_ip!r} by default"
    assert not postgres.get("ports"), "Postgres must not be published"


def test_compose_mlflow_uses_basic_auth_and_postgres():
    services = compose()["services"]
    mlflow, postgres = services["mlflow"], services["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    cmd = compose_command(mlflow)
    assert cmd[:2] == ["mlflow", "server"]
    joined = " ".join(cmd)
    assert re.search(r"--app-name[= ]basic-auth\b", joined)
    backend = re.search(r"--backend-store-uri[= ](\S+)", joined).group(1)
    assert backend.startswith("postgresql"), backend
    assert not re.search(r"://[^/@]*:[^/@]*@", backend), "password in the backend store URI"
    assert re.search(r"--artifacts-destination[= ]\S+", joined)
    assert "--serve-artifacts" in cmd
    assert "postgres" in mlflow.get("depends_on", {})
    env = mlflow["environment"]
    for var in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(env[var])), f"{var} must be required from .env"
    assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(postgres["environment"]["POSTGRES_PASSWORD"]))
    # basic_auth.ini is mounted where MLFLOW_AUTH_CONFIG_PATH points, and holds no secret
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"] if isinstance(v, str)}
    source = mounts[env["MLFLOW_AUTH_CONFIG_PATH"]]
    section = check_basic_auth_ini((COMPOSE.parent / source).read_text(), source)
    auth_db = section["database_uri"].rsplit("/", 1)[1]
    init_scripts = "".join(p.read_text() for p in (COMPOSE.parent / "initdb").glob("*.sh"))
    assert f"CREATE DATABASE {auth_db}" in init_scripts
    assert all(os.access(p, os.X_OK) for p in (COMPOSE.parent / "initdb").glob("*.sh"))


def test_compose_env_example_and_gitignore():
    text = COMPOSE.read_text()
    variables = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    example = (COMPOSE.parent / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, flags=re.M))
    assert variables <= documented, f"not in .env.example: {sorted(variables - documented)}"
    for line in example.splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if m and re.search(r"PASSWORD|SECRET|TOKEN|_KEY", m.group(1)):
            assert m.group(2) == "", f".env.example must not carry a value for {m.group(1)}"
    ignored = (COMPOSE.parent / ".gitignore").read_text().split()
    assert ".env" in ignored


# --------------------------------------------------------------------------------------------
# credential scan

SECRET_KEY_NAME = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|[_-]key$|credential)")
REFERENCE = re.compile(
    r"^(\$\{[A-Za-z_]\w*(:\?[^}]*|\?[^}]*|:-|-)?\}|\$\([A-Za-z_]\w*\)|\$[A-Za-z_]\w*)$"
)
KNOWN_TOKEN_FORMATS = [
    re.compile(r"hf_[A-Za-z0-9]{30,}"),  # Hugging Face
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\"private_key\"\s*:"),  # GCP service-account JSON
    re.compile(r"(?i)kaggle_key\W{1,5}[0-9a-f]{32}"),
    re.compile(r"ya29\.[0-9A-Za-z_-]{20,}"),  # Google OAuth access token
]
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"$<]+@")
INLINE_ASSIGNMENT = re.compile(
    r"(?<![\w$])([A-Za-z0-9_]*(?:PASSWORD|TOKEN|SECRET|_KEY))=(\"[^\"]*\"|'[^']*'|[^\s;]*)"
)


def literal_credentials_in_yaml(doc: Any) -> list[str]:
    """Values of credential-like keys that are not references to Secrets or the environment."""
    found = []
    for path, node in walk(doc):
        if not path:
            continue
        key = path[-1]
        if any(p in ("secretKeyRef", "secretRef", "configMapKeyRef") for p in path[:-1]):
            continue
        # Kubernetes/compose env list entry {name: X, value: Y}
        if (isinstance(node, dict) and isinstance(node.get("name"), str) and "value" in node
                and SECRET_KEY_NAME.search(node["name"]) and not _is_reference(node["value"])):
            found.append(f"{'.'.join(map(str, path))}: {node['name']}={node['value']!r}")
        if (isinstance(key, str) and SECRET_KEY_NAME.search(key) and isinstance(node, (str, int, float))
                and not _is_reference(node)):
            found.append(f"{'.'.join(map(str, path))}: {node!r}")
    return found


def _is_reference(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, str) and bool(REFERENCE.match(value.strip())))


def literal_credentials_in_text(text: str) -> list[str]:
    found = [m.group(0) for rx in KNOWN_TOKEN_FORMATS for m in rx.finditer(text)]
    found += [m.group(0) for m in URI_WITH_PASSWORD.finditer(text)]
    for m in INLINE_ASSIGNMENT.finditer(text):
        value = m.group(2).strip("\"'")
        if value and not value.startswith("$") and not value.startswith("<"):
            found.append(m.group(0))
    return found


def test_credential_scanner_catches_literals():
    assert literal_credentials_in_yaml({"env": [{"name": "HF_TOKEN", "value": "abc123"}]})
    assert literal_credentials_in_yaml({"environment": {"POSTGRES_PASSWORD": "hunter2"}})
    assert literal_credentials_in_yaml({"environment": {"X_PASSWORD": "${X:-hunter2}"}})
    assert literal_credentials_in_yaml({"stringData": {"auth_token": "abc"}})
    assert not literal_credentials_in_yaml({"env": [{"name": "HF_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "runner-hf", "key": "token"}}}]})
    assert not literal_credentials_in_yaml({"environment": {"PGPASSWORD": "${PGPASSWORD:?set it}"}})
    assert not literal_credentials_in_yaml({"tolerations": [{"key": "google.com/tpu"}]})
    assert literal_credentials_in_text("export MLFLOW_TRACKING_PASSWORD=hunter2")
    assert literal_credentials_in_text("uri: postgresql://mlflow:hunter2@db:5432/mlflow")
    assert literal_credentials_in_text("token: hf_" + "a" * 34)
    assert not literal_credentials_in_text('--from-literal=password="$MLFLOW_TRACKING_PASSWORD"')
    assert not literal_credentials_in_text("postgresql+psycopg2://mlflow@postgres:5432/mlflow")
    assert not literal_credentials_in_text("POSTGRES_PASSWORD=")


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_credentials_in_yaml(path):
    found = []
    for doc in load_docs(path):
        found += literal_credentials_in_yaml(doc)
    assert not found, f"{path}: literal credentials {found}"


@pytest.mark.parametrize(
    "path",
    [p for p in all_infra_files() if p.name != "README.md"],
    ids=lambda p: str(p.relative_to(INFRA)),
)
def test_no_literal_credentials_in_text(path):
    found = literal_credentials_in_text(path.read_text())
    assert not found, f"{path}: {found}"


def test_no_known_token_formats_in_readme():
    text = readme_text()
    found = [m.group(0) for rx in KNOWN_TOKEN_FORMATS for m in rx.finditer(text)]
    found += [m.group(0) for m in URI_WITH_PASSWORD.finditer(text)]
    assert not found, found

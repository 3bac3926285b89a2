"""deploy/kuberay: the KubeRay manifests of the scheduled job (a RayJob, and a RayCronJob for the
nightly run) parse, use the CRD fields we rely on with the CRD's types, run `segpipe run <config>
--incremental` on a config that is mounted from a ConfigMap and validates offline, autoscale a GPU
group from zero up to the config's actors, and take S3 credentials only from a Secret."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline.config import load_config
from pipeline.redaction import is_secret_name, redact

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kuberay"
MANIFESTS = {"rayjob.yaml": "RayJob", "raycronjob.yaml": "RayCronJob"}

# Field paths (relative to a RayJob's spec) that the manifests set and segpipe relies on, with the
# type the CRD gives them. Checked by hand against KubeRay v1.7.0 (tag v1.7.0, commit 59d663ae),
# ray-operator/config/crd/bases/ray.io_rayjobs.yaml (spec.versions[v1].schema.openAPIV3Schema) and
# ray-operator/apis/ray/v1/rayjob_types.go + raycluster_types.go; all are in v1.6.0 and v1.6.2 too.
# `[]` is every element of a list. (The full manifests also validated against those CRD schemas,
# unknown fields rejected, when this list was written; the schemas are not vendored here.)
RAYJOB_SPEC_FIELDS = [
    ("entrypoint", str),
    ("submissionMode", str),
    ("backoffLimit", int),
    ("shutdownAfterJobFinishes", bool),
    ("ttlSecondsAfterFinished", int),
    ("activeDeadlineSeconds", int),
    ("rayClusterSpec.rayVersion", str),
    ("rayClusterSpec.enableInTreeAutoscaling", bool),
    ("rayClusterSpec.autoscalerOptions.upscalingMode", str),
    ("rayClusterSpec.autoscalerOptions.idleTimeoutSeconds", int),
    ("rayClusterSpec.autoscalerOptions.resources.requests", dict),
    ("rayClusterSpec.autoscalerOptions.resources.limits", dict),
    ("rayClusterSpec.headGroupSpec.rayStartParams", dict),
    ("rayClusterSpec.headGroupSpec.template.spec.containers", list),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].name", str),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].image", str),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].env[].name", str),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].env[].valueFrom.secretKeyRef.name", str),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].env[].valueFrom.secretKeyRef.key", str),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].resources.limits", dict),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].volumeMounts[].name", str),
    ("rayClusterSpec.headGroupSpec.template.spec.containers[].volumeMounts[].mountPath", str),
    ("rayClusterSpec.headGroupSpec.template.spec.volumes[].name", str),
    ("rayClusterSpec.headGroupSpec.template.spec.volumes[].configMap.name", str),
    ("rayClusterSpec.headGroupSpec.template.spec.volumes[].configMap.items[].key", str),
    ("rayClusterSpec.headGroupSpec.template.spec.volumes[].configMap.items[].path", str),
    ("rayClusterSpec.workerGroupSpecs", list),
    ("rayClusterSpec.workerGroupSpecs[].groupName", str),
    ("rayClusterSpec.workerGroupSpecs[].replicas", int),
    ("rayClusterSpec.workerGroupSpecs[].minReplicas", int),
    ("rayClusterSpec.workerGroupSpecs[].maxReplicas", int),
    ("rayClusterSpec.workerGroupSpecs[].rayStartParams", dict),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.tolerations", list),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.containers[].name", str),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.containers[].image", str),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.containers[].env[].name", str),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.containers[].env[].valueFrom.secretKeyRef.name", str),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.containers[].env[].valueFrom.secretKeyRef.key", str),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.containers[].resources.limits", dict),
    ("rayClusterSpec.workerGroupSpecs[].template.spec.containers[].resources.requests", dict),
]
# The RayCronJob's own fields: ray-operator/config/crd/bases/ray.io_raycronjobs.yaml and
# ray-operator/apis/ray/v1/raycronjob_types.go at v1.7.0 (spec.jobTemplate is a RayJobSpec).
RAYCRONJOB_SPEC_FIELDS = [("schedule", str), ("jobTemplate", dict)]
# autoscalerOptions.upscalingMode: the CRD's enum (raycluster_types.go UpscalingMode, v1.6.0 to v1.7.0)
UPSCALING_MODES = ("Default", "Aggressive", "Conservative")
# ValidateRayJobMetadata / ValidateRayCronJobSpec (ray-operator/controllers/ray/utils/validation.go,
# constant.go at v1.7.0): names are DNS-1035 labels of at most 47 (RayJob) and 36 (RayCronJob) characters.
MAX_NAME = {"RayJob": 47, "RayCronJob": 36}
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def load_manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


def rayjob_spec(name: str) -> dict:
    doc = load_manifest(name)
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def values_at(node, path: str) -> list:
    """Every value at a dotted path; `name[]` steps into each element of the list `name`."""
    found = [node]
    for part in path.split("."):
        each = part.endswith("[]")
        key = part.removesuffix("[]")
        nxt = []
        for value in found:
            assert isinstance(value, dict) and key in value, f"{path}: no {key!r} in {value!r:.120}"
            child = value[key]
            if each:
                assert isinstance(child, list) and child, f"{path}: {key} is not a non-empty list"
                nxt.extend(child)
            else:
                nxt.append(child)
        found = nxt
    return found


def ray_containers(spec: dict) -> list[tuple[str, dict]]:
    """(group, the Ray container) of the head and of each worker group: KubeRay's container index 0."""
    cluster = spec["rayClusterSpec"]
    out = [("head", cluster["headGroupSpec"]["template"]["spec"]["containers"][0])]
    out += [(g["groupName"], g["template"]["spec"]["containers"][0]) for g in cluster["workerGroupSpecs"]]
    return out


def entrypoint_argv(spec: dict) -> list[str]:
    return shlex.split(spec["entrypoint"])


def mounted_config(spec: dict) -> tuple[str, str]:
    """The entrypoint's config path -> (ConfigMap name, key) of the head volume mounted over it."""
    path = PurePosixPath(entrypoint_argv(spec)[2])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    for mount in head["containers"][0].get("volumeMounts", []):
        rel = path.relative_to(mount["mountPath"]) if path.is_relative_to(mount["mountPath"]) else None
        config_map = volumes.get(mount["name"], {}).get("configMap")
        if rel is None or config_map is None:
            continue
        items = {i["path"]: i["key"] for i in config_map.get("items", [])}
        return config_map["name"], items.get(str(rel), str(rel))
    raise AssertionError(f"no ConfigMap is mounted on the head at {path}")


def quantity(text) -> float:
    """A Kubernetes CPU quantity ("8", "500m", 2) in cores."""
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("config validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name, kind", MANIFESTS.items())
def test_each_manifest_is_one_ray_io_v1_document_of_its_kind_with_a_name_kuberay_accepts(name, kind):
    doc = load_manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert len(doc["metadata"]["name"]) <= MAX_NAME[kind]


@pytest.mark.parametrize("name", MANIFESTS)
@pytest.mark.parametrize("path, kind", RAYJOB_SPEC_FIELDS, ids=[p for p, _ in RAYJOB_SPEC_FIELDS])
def test_the_rayjob_fields_we_rely_on_are_set_with_the_crd_type(name, path, kind):
    for value in values_at(rayjob_spec(name), path):
        # bool is an int in Python: an integer field must not hold YAML's true/false
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), f"{path}: {value!r} is no {kind.__name__}"


@pytest.mark.parametrize("path, kind", RAYCRONJOB_SPEC_FIELDS)
def test_the_raycronjob_fields_we_rely_on_are_set_with_the_crd_type(path, kind):
    (value,) = values_at(load_manifest("raycronjob.yaml")["spec"], path)
    assert isinstance(value, kind)


def test_raycronjob_runs_nightly_at_two_with_the_rayjob_spec_as_its_template():
    cron = load_manifest("raycronjob.yaml")["spec"]
    assert cron["schedule"] == "0 2 * * *"
    assert not cron.get("suspend", False)
    assert cron["jobTemplate"] == load_manifest("rayjob.yaml")["spec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_ray_cluster_is_deleted_after_the_job_finishes(name):
    spec = rayjob_spec(name)
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    # a night's run ends before the next one starts (RayCronJob has no concurrency policy)
    assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600


@pytest.mark.parametrize("name", MANIFESTS)
def test_entrypoint_is_segpipe_run_of_a_config_with_incremental_and_only_set_overrides(name):
    argv = entrypoint_argv(rayjob_spec(name))
    assert argv[:2] == ["segpipe", "run"]
    assert PurePosixPath(argv[2]).is_absolute() and argv[2].endswith((".yaml", ".yml"))
    rest = argv[3:]
    assert "--incremental" in rest
    rest.remove("--incremental")
    while rest:
        flag, value, *rest = rest
        assert flag == "--set" and "=" in value, f"unexpected entrypoint arguments: {[flag, value, *rest]}"


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_entrypoint_config_is_mounted_on_the_head_from_a_configmap_of_the_file_in_deploy(name):
    config_map, key = mounted_config(rayjob_spec(name))
    assert config_map == "segpipe-nightly"
    assert (DEPLOY / key).is_file(), f"the ConfigMap key {key} is no file in deploy/kuberay/"


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_entrypoint_config_validates_offline_with_its_overrides_and_names_the_job(name, no_network):
    spec = rayjob_spec(name)
    argv = entrypoint_argv(spec)
    _, key = mounted_config(spec)
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(DEPLOY / key, overrides)
    # the job --incremental compares against is named in the file, not taken from the mount's file name
    assert yaml.safe_load((DEPLOY / key).read_text())["job"] == cfg.job == "segpipe-nightly"
    # each night is a run of its own (a timestamped run_id): a fixed one would make every night a rerun
    assert cfg.run_id is None
    assert cfg.input.uri.startswith("s3://") and cfg.output.uri.startswith("s3://")


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_autoscaler_starts_the_gpu_workers_from_zero_up_to_every_actor_leaving_cpus_to_tasks(name):
    """The autoscaler is on, conservative; the GPU group starts at zero Pods (segpipe asks for GPUs
    and waits resources.wait_for_gpus_s) and its largest size holds the pool's largest, each Pod
    keeping a CPU beyond its actors' for the read and write tasks."""
    spec = rayjob_spec(name)
    _, key = mounted_config(spec)
    res = load_config(DEPLOY / key).resources
    assert res.gpus_per_actor > 0 and res.cpus_per_actor
    assert res.wait_for_gpus_s >= 600  # a GPU node from zero, and the image's pull, take minutes
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["upscalingMode"] == "Conservative" and options["upscalingMode"] in UPSCALING_MODES
    assert options["idleTimeoutSeconds"] >= 60
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # strings: rayStartParams is map[string]string
    most_actors, gpu_groups = 0, 0
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu", 0)
        assert resources["requests"].get("nvidia.com/gpu", gpus) == gpus  # extended resources: requests == limits
        # the autoscaler reads a group's Ray resources from the container's limits: no Ray resource overrides
        assert "resources" not in group and not any(k.startswith("ray.io/") for k in resources["limits"])
        per_pod = int(gpus // res.gpus_per_actor)
        if per_pod:
            gpu_groups += 1
            assert group["minReplicas"] == group.get("replicas", 0) == 0, "the GPU group starts from zero"
            assert quantity(resources["limits"]["cpu"]) >= per_pod * res.cpus_per_actor + 1
        most_actors += per_pod * group["maxReplicas"]
    assert gpu_groups and most_actors >= res.max_actors


@pytest.mark.parametrize("name", MANIFESTS)
def test_head_and_workers_run_one_image_and_get_s3_credentials_from_a_secret(name):
    containers = ray_containers(rayjob_spec(name))
    assert len({c["image"] for _, c in containers}) == 1
    for group, container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        for var in S3_ENV:
            assert var in env, f"{group}: {var} is not set"
            assert "value" not in env[var], f"{group}: {var} has a literal value"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "segpipe-s3" and ref["key"] == var


@pytest.mark.parametrize("name", [*MANIFESTS, "segpipe-nightly.yaml"])
def test_no_credential_value_is_written_in_the_manifests_or_the_config(name):
    text = (DEPLOY / name).read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*\S", text), "an AWS secret key"
    if name not in MANIFESTS:  # the segpipe config: s3fs finds the credentials in the environment
        data = yaml.safe_load(text)
        for section in ("input", "model", "output"):
            options = data.get(section, {}).get("storage_options", {})
            assert redact(options) == options, f"{section}.storage_options holds a credential"
        return
    assert all(doc.get("kind") != "Secret" for doc in yaml.safe_load_all(text))
    for group, container in ray_containers(rayjob_spec(name)):
        for env in container.get("env", []):
            if is_secret_name(env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{group}: {env['name']}"

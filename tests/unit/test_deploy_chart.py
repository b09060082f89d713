"""The Helm chart (deploy/helm/pdserve), rendered for the default values, a 4P4D values file and a 70B one
with tensor-parallel pools of two degrees: every
manifest is valid against its schema (KubeRay's RayJob CRD, Kubernetes' own kinds), the ConfigMap holds
a cluster config pdserve itself accepts, the pieces agree with each other (Service -> router pod, ports,
GPUs for the pools), and the committed rendering is current."""

from __future__ import annotations

import gzip
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdserve.cluster.config import cluster_config_from_dict
from tests.support.helm_lite import CHART, RENDERED, VALUE_SETS, dump, render_text, render_value_set

SCHEMAS = CHART.parent / "schemas"
K8S_VERSION = "1.30"


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rendered_manifests_are_valid_and_consistent(value_set: str) -> None:
    docs = render_value_set(value_set)
    kinds = _by_kind(docs)
    assert set(kinds) == {"ConfigMap", "PodDisruptionBudget", "RayJob", "Service", "ServiceMonitor"}
    schema = json.loads(gzip.decompress((SCHEMAS / "rayjob-v1.schema.json.gz").read_bytes()))
    jsonschema.validate(kinds["RayJob"], schema)
    for kind in ("ConfigMap", "PodDisruptionBudget", "Service"):
        kubernetes_validate.validate(kinds[kind], K8S_VERSION, strict=True)

    config = cluster_config_from_dict(yaml.safe_load(kinds["ConfigMap"]["data"]["cluster.yaml"]))
    cluster = kinds["RayJob"]["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role in config.roles:  # each pool on its own group: enough GPUs there, and pinned to it by resource
        group = groups["prefill" if role == "prefill" else "decode"]
        gpus = group["replicas"] * int(group["rayStartParams"]["num-gpus"])
        assert config.pool(role).replicas * config.pool(role).gpus_per_worker <= gpus
        # one worker per pod: its ranks on the pod's GPUs, which Ray and Kubernetes both count
        [worker] = group["template"]["spec"]["containers"]
        assert int(group["rayStartParams"]["num-gpus"]) == config.pool(role).gpus_per_worker
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == config.pool(role).gpus_per_worker
        advertised = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert config.pool(role).ray_resources and config.pool(role).ray_resources.items() <= advertised.items()
        other = groups["decode" if group is groups["prefill"] else "prefill"]
        assert not config.pool(role).ray_resources.keys() & json.loads(json.loads(other["rayStartParams"]["resources"]))
    head = cluster["headGroupSpec"]["template"]
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    [container] = head["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == config.router.port and ports["http"] == config.router.http_port
    assert container["readinessProbe"]["grpc"]["port"] == config.router.port
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    monitor = kinds["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    pdb = kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert all(pdb.items() <= g["template"]["metadata"]["labels"].items() for g in groups.values())
    assert "/etc/pdserve/cluster.yaml" in kinds["RayJob"]["spec"]["entrypoint"]


def test_the_4p4d_values_take_effect() -> None:
    kinds = _by_kind(render_value_set("4p4d"))
    config = cluster_config_from_dict(yaml.safe_load(kinds["ConfigMap"]["data"]["cluster.yaml"]))
    assert (config.pool("prefill").replicas, config.pool("decode").replicas) == (4, 4)
    groups = kinds["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"]) for g in groups] == [("prefill", 4), ("decode", 4)]
    for g in groups:
        assert g["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    env = kinds["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "PDSERVE_API_KEYS",
            "valueFrom": {"secretKeyRef": {"name": "pdserve-api-keys", "key": "keys"}}} in env


def test_the_70b_values_run_tensor_parallel_pools_of_different_degrees() -> None:
    kinds = _by_kind(render_value_set("70b-tp"))
    config = cluster_config_from_dict(yaml.safe_load(kinds["ConfigMap"]["data"]["cluster.yaml"]))
    assert config.engine_config("prefill").tensor_parallel_size == 2
    assert config.engine_config("decode").tensor_parallel_size == 4
    assert config.kv_transfer.head_groups == 4 and config.kv_transfer.backend == "nccl"
    groups = {g["groupName"]: g for g in kinds["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert (groups["prefill"]["replicas"], groups["decode"]["replicas"]) == (2, 1)


def test_a_broken_manifest_is_caught() -> None:
    """The validation can fail: a RayJob with a mistyped field is refused."""
    kinds = _by_kind(render_value_set("default"))
    broken = json.loads(json.dumps(kinds["RayJob"]))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    schema = json.loads(gzip.decompress((SCHEMAS / "rayjob-v1.schema.json.gz").read_bytes()))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    service = json.loads(json.dumps(kinds["Service"]))
    service["spec"]["ports"][0]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_the_committed_rendering_is_current(value_set: str) -> None:
    committed = (RENDERED / f"{value_set}.yaml").read_text()
    assert committed == dump(render_value_set(value_set)), \
        "deploy/helm/rendered is stale: run `python -m tests.support.helm_lite`"


def test_the_renderer_subset() -> None:
    context = {"Values": {"a": {"b": 3}, "on": True, "off": "", "m": {"k": "v"}, "e": {}}, "Release": {"Name": "r"}}
    text = "x: {{ .Values.a.b }}\n{{- if .Values.off }}\nno: 1\n{{- end }}\n{{- if .Values.on }}\nshown: {{ .Release.Name | quote }}\n{{- end }}\nm: {{ toYaml .Values.m | nindent 2 }}\ne: {{ toYaml .Values.e | nindent 2 }}\n"
    assert yaml.safe_load(render_text(text, context)) == {"x": 3, "shown": "r", "m": {"k": "v"}, "e": {}}
    with pytest.raises(ValueError):
        render_text("{{ include \"x\" . }}", context)
    with pytest.raises(ValueError):
        render_text("{{- if .Values.on }}", context)


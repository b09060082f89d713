"""The example cluster configs under deploy/ load and validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.cluster.config import load_cluster_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("path", sorted([*DEPLOY.glob("*.yaml"), DEPLOY / "docker" / "demo.yaml"]), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_cluster_config(path)
    assert config.roles
    for role in config.roles:
        assert config.engine_config(role).block_size == 16


def test_the_cpu_example_is_the_built_in_default() -> None:
    from pdserve.cluster.config import ClusterConfig

    assert load_cluster_config(DEPLOY / "cluster-cpu.yaml") == ClusterConfig()


def test_every_kv_backend_the_docs_name_is_accepted() -> None:
    from pdserve.common.kv_transfer_config import TRANSFER_BACKENDS, KVTransferConfig

    assert "cuda_ipc" in TRANSFER_BACKENDS
    for backend in TRANSFER_BACKENDS:
        assert KVTransferConfig(backend=backend).backend == backend


def test_environment_overrides_the_settings_a_manifest_needs() -> None:
    from pdserve.cluster.config import ClusterConfig

    environ = {"PDSERVE__MODE": "colocated", "PDSERVE__COLOCATED__REPLICAS": "3", "PDSERVE__ROUTER__GRPC_PORT": "6000",
               "PDSERVE__ROUTER__HOST": "0.0.0.0", "PDSERVE__SLO__TPOT_MS": "20", "PDSERVE__SLO__TTFT_MS": "300",
               "PDSERVE__ENGINE__MAX_MODEL_LEN": "256", "PDSERVE__KV_TRANSFER__BACKEND": "gloo",
               "PDSERVE_API_KEYS": "not an override (one underscore)"}
    config = load_cluster_config(DEPLOY / "cluster-cpu.yaml", environ)
    assert (config.mode, config.colocated_pool.replicas, config.router.port, config.router.host) == \
        ("colocated", 3, 6000, "0.0.0.0")
    assert config.slo is not None and (config.slo.tpot_ms, config.slo.ttft_ms) == (20, 300)
    assert config.engine_config("colocated").max_model_len == 256 and config.kv_transfer.backend == "gloo"
    assert load_cluster_config(None, {}) == ClusterConfig()  # no file, no override: the built-in default
    assert load_cluster_config(None, {"PDSERVE__DECODE__REPLICAS": "2"}).decode.replicas == 2


@pytest.mark.parametrize(("environ", "says"), [
    ({"PDSERVE__ROUTER__NOPE": "1"}, "router.nope: unknown setting"),
    ({"PDSERVE__DECODE__REPLICAS": "many"}, "decode.replicas"),
    ({"PDSERVE__MODEL__NAME": "x"}, "model is not a section"),
    ({"PDSERVE__ROUTER____PORT": "1"}, "empty level"),
])
def test_a_bad_environment_override_is_named(environ: dict[str, str], says: str) -> None:
    from pdserve.common.errors import ConfigError

    with pytest.raises(ConfigError, match=says) as info:
        load_cluster_config(DEPLOY / "cluster-cpu.yaml", environ)
    assert next(iter(environ)) in str(info.value)  # the message names the variable


@pytest.mark.parametrize(("resources", "says"), [
    ({"GPU": 1}, "custom resource name"), ({"pdserve_decode": 0}, "ray_resources.pdserve_decode"),
    ({"pdserve_decode": "one"}, "ray_resources.pdserve_decode"), (["pdserve_decode"], "mapping")])
def test_pool_ray_resources_are_validated(resources: object, says: str) -> None:
    from pdserve.cluster.config import cluster_config_from_dict
    from pdserve.common.errors import ConfigError

    assert cluster_config_from_dict({"decode": {"ray_resources": {"pdserve_decode": 1}}}).decode.ray_resources == \
        {"pdserve_decode": 1}
    with pytest.raises(ConfigError, match=says):
        cluster_config_from_dict({"decode": {"ray_resources": resources}})


def test_gpus_per_worker_sets_the_tensor_parallel_size() -> None:
    """A colocated worker of two GPUs runs two tensor-parallel ranks; a size that disagrees with the GPU
    count is refused naming the setting; prefill and decode workers of several GPUs are allowed (their KV
    moves by group of heads)."""
    from pdserve.cluster.config import cluster_config_from_dict
    from pdserve.common.errors import ConfigError

    config = cluster_config_from_dict({"mode": "colocated", "colocated": {"replicas": 1, "gpus_per_worker": 2}})
    assert config.engine_config("colocated").tensor_parallel_size == 2
    assert config.engine_config("colocated").device == "cuda"
    with pytest.raises(ConfigError, match="colocated.gpus_per_worker.*tensor_parallel_size is 4"):
        cluster_config_from_dict({"mode": "colocated", "colocated": {"replicas": 1, "gpus_per_worker": 2,
                                                                     "engine": {"tensor_parallel_size": 4}}})
    split = cluster_config_from_dict({"mode": "disaggregated", "prefill": {"gpus_per_worker": 2},
                                      "decode": {"gpus_per_worker": 1}})  # KV over CUDA IPC, by groups of heads
    assert split.engine_config("prefill").tensor_parallel_size == 2 and split.kv_transfer.head_groups == 2
    assert cluster_config_from_dict({"mode": "disaggregated", "prefill": {"gpus_per_worker": 2},
                                     "decode": {"gpus_per_worker": 2}, "kv_transfer": {"backend": "nccl"}}
                                    ).kv_transfer.head_groups == 2
    assert cluster_config_from_dict({"mode": "colocated", "colocated": {
        "replicas": 1, "engine": {"tensor_parallel_size": 2}}}).engine_config("colocated").device == "cpu"


@pytest.mark.parametrize(("pools", "expected"), [
    ({"prefill": {"gpus_per_worker": 2, "tensor_parallel_size": 2}, "decode": {"gpus_per_worker": 1}},
     {"prefill": (2, "cuda"), "decode": (1, "cuda")}),
    ({"prefill": {"tensor_parallel_size": 2}, "decode": {"tensor_parallel_size": 1}},  # CPU ranks (gloo)
     {"prefill": (2, "cpu"), "decode": (1, "cpu")}),
    ({"engine": {"tensor_parallel_size": 4}, "prefill": {"tensor_parallel_size": 2}},  # the pool's key wins
     {"prefill": (2, "cpu"), "decode": (4, "cpu")}),
    ({"mode": "colocated", "prefill": {"gpus_per_worker": 2}, "decode": {"gpus_per_worker": 1,
                                                                        "tensor_parallel_size": 1}},
     {"colocated": (2, "cuda")}),  # the default colocated pool: the larger pool's GPUs and ranks
])
def test_a_pools_tensor_parallel_size_sets_its_ranks(pools: dict, expected: dict) -> None:
    from pdserve.cluster.config import cluster_config_from_dict

    config = cluster_config_from_dict({"mode": "disaggregated", **pools})
    got = {role: (config.engine_config(role).tensor_parallel_size, config.engine_config(role).device)
           for role in config.roles}
    assert got == expected
    if config.mode == "disaggregated":
        assert config.kv_transfer.head_groups == max(ranks for ranks, _ in expected.values())


@pytest.mark.parametrize(("data", "says"), [
    ({"prefill": {"gpus_per_worker": 2, "tensor_parallel_size": 1}},
     "prefill.tensor_parallel_size: a worker of 2 GPU.*make gpus_per_worker and tensor_parallel_size equal"),
    ({"decode": {"tensor_parallel_size": 2, "engine": {"tensor_parallel_size": 4}}},
     "decode.engine.tensor_parallel_size: 4 disagrees with the pool's tensor_parallel_size 2"),
    ({"decode": {"tensor_parallel_size": -1}}, "decode.tensor_parallel_size"),
    ({"mode": "colocated", "prefill": {"tensor_parallel_size": 2}, "decode": {"gpus_per_worker": 1}},
     "colocated: the default colocated pool .* 2 ranks on 1 GPU"),
])
def test_a_pools_tensor_parallel_size_that_disagrees_is_refused(data: dict, says: str) -> None:
    from pdserve.cluster.config import cluster_config_from_dict
    from pdserve.common.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        cluster_config_from_dict(data)

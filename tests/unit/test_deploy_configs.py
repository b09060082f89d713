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

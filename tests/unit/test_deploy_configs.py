"""The example cluster configs under deploy/ load and validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.cluster.config import load_cluster_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_cluster_config(path)
    assert config.roles
    for role in config.roles:
        assert config.engine_config(role).block_size == 16

"""One local Ray instance for the whole test session, and clusters shared per test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PDSERVE_CACHE_DIR": os.environ["PDSERVE_CACHE_DIR"]}})
    yield
    ray.shutdown()

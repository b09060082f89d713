"""Session-wide test setup: an isolated cache dir, GPU skips, KV invariant checks after every test.

After every test, every live ``LLMEngine`` of this process must have a consistent block pool and, once
it holds no requests, every block free (no leaks).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest


def _cuda_available_early() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _cuda_available_early():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run (slowly) on the CPU in tests
    from tests.support.triton_interpreter import patch_interpreter_scalars

    patch_interpreter_scalars()
os.environ.setdefault("PDSERVE_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                         ".pytest_cache", "pdserve"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _check_engine_invariants() -> Iterator[None]:
    yield
    engine_module = sys.modules.get("pdserve.engine.engine")
    if engine_module is not None:
        for engine in engine_module.live_engines():
            engine.check_invariants()

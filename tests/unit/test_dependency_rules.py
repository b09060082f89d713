"""The layering rules of ARCHITECTURE.md, checked on the source (imports anywhere in each file)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "pdserve"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _package_imports(package: str) -> dict[Path, set[str]]:
    directory = ROOT / package
    return {p: _imports(p) for p in directory.rglob("*.py")} if directory.is_dir() else {}


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {m}" for p, mods in _package_imports(package).items()
            for m in mods if any(m == f or m.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("package", ["common", "router", "client", "rpc", "planner"])
def test_torch_free_packages(package: str) -> None:
    assert not _violations(package, ("torch", "numpy", "pdserve.engine", "pdserve.kvtransfer"))


def test_common_imports_nothing_of_ours() -> None:
    bad = [v for v in _violations("common", ("pdserve",)) if "pdserve.common" not in v.split(" imports ")[1]]
    assert not bad


def test_engine_never_imports_roles_router_or_ray() -> None:
    assert not _violations("engine", ("pdserve.prefill", "pdserve.decode", "pdserve.router", "pdserve.cluster",
                                      "ray"))


def test_kvtransfer_imports_no_role_router_or_ray() -> None:
    assert not _violations("kvtransfer", ("ray", "grpc", "pdserve.prefill", "pdserve.decode", "pdserve.router",
                                          "pdserve.cluster", "pdserve.worker"))


def test_worker_runtime_imports_no_role_and_nothing_above_it() -> None:
    """The worker runtime hosts a role it is given; only ``cluster`` knows the roles by name."""
    assert not _violations("worker", ("pdserve.prefill", "pdserve.decode", "pdserve.cluster", "pdserve.router",
                                      "ray"))


def test_roles_never_import_each_other() -> None:
    assert not _violations("prefill", ("pdserve.decode",))
    assert not _violations("decode", ("pdserve.prefill",))


def test_importing_common_does_not_load_torch() -> None:
    code = ("import sys, pdserve, pdserve.common.config, pdserve.common.sampling_params, "
            "pdserve.common.outputs; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

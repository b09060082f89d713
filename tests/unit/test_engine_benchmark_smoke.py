"""The engine benchmark's every section runs on the tiny preset (CPU here): a section that breaks when the
engine's interfaces change is caught in CI, not on a GPU host (the mixed-step table once was)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_benchmark_tiny_runs_every_section() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.engine", "--preset", "tiny", "--strict"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for table in ("## Decode", "## Prefill", "## Mixed steps", "## Inter-token latency", "## Offline throughput"):
        assert table in done.stdout
    assert "| error |" not in done.stdout


def test_step_anatomy_tiny_runs_both_sections() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_anatomy", "--preset", "tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "## Synthetic steps" in done.stdout and "## Live steps" in done.stdout
    for workload in ("prefill-heavy", "decode-heavy"):
        assert f"| {workload} |" in done.stdout

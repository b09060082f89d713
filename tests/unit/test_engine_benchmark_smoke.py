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


def test_step_anatomy_tiny_runs_both_sections(tmp_path: Path) -> None:
    """Both sections, and the live section on a (small, written here) Mooncake-format trace, whose steps with
    prompt chunks are also judged by their earlier context."""
    import json

    trace = tmp_path / "trace.jsonl"  # 3 s buckets of 4 requests, prompts of 2-9k tokens before the length scale
    trace.write_text("".join(json.dumps({"timestamp": 3000 * (i // 4), "input_length": 2000 + 1000 * (i % 8),
                                         "output_length": 40, "hash_ids": list(range(i, i + 4))}) + "\n"
                             for i in range(32)))
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_anatomy", "--preset", "tiny", "--rates",
                           "prefill-heavy=6,decode-heavy=24,trace=0.1", "--trace-path", str(trace)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "## Synthetic steps" in done.stdout and "## Live steps" in done.stdout
    for workload in ("prefill-heavy", "decode-heavy", "trace"):
        assert f"| {workload} |" in done.stdout
    assert "## Steps with prompt chunks, by the furthest chunk's earlier context" in done.stdout
    assert "| trace | 0.1 | fresh |" in done.stdout

"""Triton kernels compiled for sm_90 (an H100/H200) on the CPU, to read the PTX they generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def compile_ptx(script: str, timeout_s: int = 240) -> dict[str, str]:
    """Run ``script`` (Python that prints a JSON object of PTX texts) in a process of its own: a test session
    interprets Triton kernels (``TRITON_INTERPRET=1``), and interpreted kernels cannot be compiled."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout_s,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)

"""The ``pdserve`` command line as a user runs it: a subprocess, real output, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_streams_text_from_the_tiny_model() -> None:
    done = _run("generate", "--model", "tiny-random", "--max-tokens", "16", "--ignore-eos", "Hello")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 0
    assert "finish_reason=length" in done.stderr


def test_generate_batch_from_a_file(tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two"}\n\n{"prompt": "three"}\n')
    done = _run("generate", "--file", str(prompts), "--json", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3
    assert "generate" in done.stderr  # the progress bar


def test_bad_input_gives_one_clear_line_and_exit_2(tmp_path) -> None:
    done = _run("generate", "--temperature", "-1", "Hello")
    assert done.returncode == 2 and "temperature" in done.stderr and "Traceback" not in done.stderr
    done = _run("generate", "--model", str(tmp_path / "missing"), "Hello")
    assert done.returncode == 2 and "no such model directory" in done.stderr
    done = _run("generate")
    assert done.returncode == 2 and "no prompt" in done.stderr


def test_version_and_log_level_choices(capsys) -> None:  # noqa: ANN001
    import pytest

    from pdserve.cluster.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("pdserve ")
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["--log-level", "verbose", "status", "--target", "127.0.0.1:1"])
    assert refused.value.code == 2 and "invalid choice: 'VERBOSE'" in capsys.readouterr().err
    assert build_parser().parse_args(["--log-level", "debug", "status", "--target", "127.0.0.1:1"]).log_level == "DEBUG"


def test_profile_then_plan(tmp_path) -> None:
    """`pdserve profile` measures this machine's step-time model; `pdserve plan` predicts from it."""
    import json

    profile = tmp_path / "cpu.json"
    refused = _run("profile", "--max-batch-tokens", "128", "--out", str(profile), "--kv-transfer-gb-per-s", "0")
    assert refused.returncode == 2 and "--kv-transfer-gb-per-s: must be a number > 0" in refused.stderr
    assert "Traceback" not in refused.stderr and not profile.exists()
    done = _run("profile", "--max-batch-tokens", "128", "--out", str(profile), "--kv-transfer-gb-per-s", "25",
                timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(profile.read_text())
    assert data["model"]["per_token_s"] > 0 and data["kv_bytes_per_token"] > 0 and data["samples"]
    assert data["kv_capacity_tokens"] > 0
    assert (data["kv_transfer_bytes_per_s"], data["kv_transfer_source"]) == (25e9, "stated")
    done = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                "--rate", "20", "--prompt-len", "100", "--output-len", "8", "--requests", "60", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kv_transfer_gb_per_s"] == 25  # the profile's link
    assert [p["config"] for p in result["predictions"]] == ["colocated x2", "1P1D"]
    assert result["recommended"] in ("colocated x2", "1P1D")
    assert all(p["goodput_per_gpu"] > 0 for p in result["predictions"])
    plot = tmp_path / "plan.svg"
    done = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                "--rate", "20", "--prompt-len", "100", "--output-len", "8", "--requests", "60", "--plot", str(plot),
                "--plot-points", "4")
    assert done.returncode == 0, done.stderr
    assert f"wrote {plot}" in done.stderr and "<- recommended" in done.stdout
    assert plot.read_text().startswith("<svg") and plot.read_text().count('class="curve"') == 2
    for bad, why in ((tmp_path / "plan.png", "ending in .svg"), (tmp_path / "nowhere" / "plan.svg", "does not exist")):
        refused = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                       "--rate", "20", "--plot", str(bad))
        assert refused.returncode != 0 and "--plot" in refused.stderr and why in refused.stderr
        assert "Traceback" not in refused.stderr and not bad.exists()
    refused = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                   "--rate", "20", "--kv-capacity-tokens", "0")
    assert refused.returncode != 0 and "--kv-capacity-tokens" in refused.stderr
    done = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                "--rate", "20", "--prompt-len", "100", "--output-len", "8", "--requests", "20",
                "--kv-transfer-gb-per-s", "400")
    assert done.returncode == 0 and "KV link 400 GB/s" in done.stdout, done.stderr
    refused = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                   "--rate", "20", "--kv-transfer-gb-per-s", "-3")
    assert refused.returncode != 0 and "--kv-transfer-gb-per-s" in refused.stderr and "Traceback" not in refused.stderr
    refused = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                   "--rate", "20", "--kv-transfer-gb-per-s", "inf")
    assert refused.returncode != 0 and "must be a number > 0" in refused.stderr
    refused = _run("plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50",
                   "--rate", "20", "--borrow-tokens", "-1")
    assert refused.returncode != 0 and "--borrow-tokens" in refused.stderr
    refused = _run("plan", "--profile", str(profile), "--gpus", "4", "--gpus-per-worker", "3", "--slo-ttft-ms", "200",
                   "--slo-tpot-ms", "50", "--rate", "20")
    assert refused.returncode != 0 and "--gpus-per-worker" in refused.stderr and "divide" in refused.stderr
    done = _run("plan", "--profile", str(tmp_path / "missing.json"), "--gpus", "2", "--slo-ttft-ms", "200",
                "--slo-tpot-ms", "50", "--rate", "1")
    assert done.returncode == 2 and "cannot read" in done.stderr and "Traceback" not in done.stderr

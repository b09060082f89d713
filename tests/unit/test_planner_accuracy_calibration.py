"""The accuracy benchmark's live calibration from serving runs (``benchmarks/serving/run_files.py``): runs from before the ``chunked`` kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.common.step_model import StepKind


def _run_file(path: Path, calibrations: list[dict[str, float]]) -> str:
    workers = [{"step_time_error": {"calibration": c}} for c in calibrations]
    path.write_text(json.dumps({"results": {"auto": {"worker_stats": workers}}}))
    return path.name


def test_a_worker_without_the_chunked_kind_lends_it_the_mixed_factor(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.serving.run_files as accuracy

    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    old = _run_file(tmp_path / "old.json", [{"decode": 1.0, "mixed": 1.4, "prefill": 1.2}])
    new = _run_file(tmp_path / "new.json", [{"decode": 1.0, "mixed": 1.1, "chunked": 1.0, "prefill": 1.0}])
    assert accuracy.live_calibration([old]) == {StepKind.MIXED: 1.4, StepKind.CHUNKED: 1.4, StepKind.PREFILL: 1.2}
    # a worker that reports the kind and never recalibrated it keeps 1.0 (not averaged in)
    assert accuracy.live_calibration([new]) == {StepKind.MIXED: 1.1}
    assert accuracy.live_calibration([old, new])[StepKind.CHUNKED] == 1.4


def test_calibration_of_one_configuration_reads_only_its_workers(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``--sharegpt-calibration own``: each configuration's points use its own workers' factors; a run whose
    workers reported nothing (``worker_stats`` null, older runs) gives none."""
    import benchmarks.serving.run_files as accuracy

    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    workers = {"auto": [{"decode": 1.15, "mixed": 1.0}],
               "colocated-slo": [{"decode": 1.22, "mixed": 1.2}, {"decode": 1.12, "mixed": 1.26}],
               "1p1d": None}
    (tmp_path / "run.json").write_text(json.dumps({"results": {
        name: {"worker_stats": None if cs is None else [{"step_time_error": {"calibration": c}} for c in cs]}
        for name, cs in workers.items()}}))
    assert accuracy.live_calibration(["run.json"], configs={"auto"}) == {StepKind.DECODE: 1.15}
    assert accuracy.live_calibration(["run.json"], configs={"colocated-slo"}) == {
        StepKind.DECODE: 1.17, StepKind.MIXED: 1.23, StepKind.CHUNKED: 1.23}
    assert accuracy.live_calibration(["run.json"], configs={"1p1d"}) == {}
    assert accuracy.live_calibration(["run.json"])[StepKind.DECODE] == pytest.approx(1.163, abs=1e-3)

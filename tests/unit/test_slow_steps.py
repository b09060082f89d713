"""The slow-step log names launches that stalled the device, not those the device was busy through."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from pdserve.engine import slow_steps
from pdserve.engine.slow_steps import SlowStepWatch


def launch(watch: SlowStepWatch, device_busy: bool) -> None:
    plan: Any = SimpleNamespace(chunks=[SimpleNamespace(start=0, num_tokens=1), SimpleNamespace(start=0, num_tokens=512)])
    watch.launching()
    watch.launched(plan, lambda: {"inputs": 1.0, "forward": 2.0}, device_busy=device_busy)


def test_a_slow_launch_is_logged_only_when_the_device_ran_out_of_work(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(slow_steps, "SLOW_STEP_S", 0.0)  # every launch is "slow"
    watch = SlowStepWatch()
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.engine"):
        launch(watch, device_busy=True)  # the step before still ran: the launch queue held the host
        assert not caplog.records
        launch(watch, device_busy=False)
    [record] = caplog.records
    assert "launching a step took" in record.getMessage()
    assert "1 decodes, prefill chunks (start, tokens) [(0, 512)]" in record.getMessage()


def test_a_step_that_samples_nothing_is_running_until_its_end_event() -> None:
    """A prompt chunk that samples nothing has no tokens to wait for; whether the device is still at it is
    its end event's (the launch after it is then not reported as a stall)."""
    from pdserve.engine.runner import LaunchedStep

    class Event:
        def __init__(self, done: bool) -> None:
            self.done = done

        def query(self) -> bool:
            return self.done

    plan: Any = SimpleNamespace(chunks=[])
    busy = LaunchedStep(plan, [], None, 512, clock=(Event(True), Event(False)))
    assert busy.is_done() and busy.running()
    assert not LaunchedStep(plan, [], None, 512, clock=(Event(True), Event(True))).running()
    assert not LaunchedStep(plan, [], None, 512, clock=(0.0, 0.1)).running()  # the CPU: a step ends as it returns

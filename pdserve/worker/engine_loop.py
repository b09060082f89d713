"""The engine's own thread: it steps the engine whenever there is work and runs submitted calls between
steps, so the engine is only ever touched from one thread.

Lifecycle: ``start()`` -> ``call(fn)`` from any thread (returns a ``concurrent.futures.Future``; ``fn``
runs on the engine thread between steps) -> ``stop()``. ``call(fn, urgent=True)`` marks a call that may
also run *inside* a step, while the engine waits for the device to finish it, once a role enabled that
with :meth:`EngineLoop.run_urgent_calls_mid_step` (the decode role: a request whose KV landed gets its
first token out without waiting for the step in flight), and between the layers of a step the engine
launches eagerly (a long prompt chunk's launch alone can take tens of milliseconds of host time). An
urgent call must only change requests that are not in the step in flight or being launched (e.g. admit
a ``WAITING_FOR_KV`` request) and never step the engine.

After every step that produced deltas or new
landing zones, and for deltas a role emits itself (``emit``), the one ``on_step`` callback receives a
:class:`StepOutput` (the deltas, the landing zones to fill, the worker's load); it runs on the engine
thread and must not block (the worker hands what it must to its asyncio loop).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from pdserve.common.outputs import RequestDelta
from pdserve.engine.engine import LLMEngine
from pdserve.engine.remote_prefill import LandingZone

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: How often the engine thread checks the device while it serves urgent calls inside a step.
MID_STEP_POLL_S = 2e-4


@dataclass(frozen=True)
class LoadReport:
    running_requests: int
    waiting_requests: int
    kv_usage: float
    queued_prefill_tokens: int
    num_free_blocks: int
    prefill_tokens_per_s: float = 0.0  # what it can prefill now within its step budget (0: no model)


@dataclass(frozen=True)
class StepOutput:
    """What one engine step (or a role's ``emit``) hands to the worker."""

    deltas: list[RequestDelta]
    landing_zones: list[LandingZone]
    load: LoadReport


def load_of(engine: LLMEngine) -> LoadReport:
    scheduler = engine.scheduler
    queued = sum(r.num_prompt_tokens - min(r.num_computed_tokens, r.num_prompt_tokens)
                 for r in (*scheduler.waiting, *scheduler.running))
    return LoadReport(len(scheduler.running) + len(scheduler.waiting_for_kv), len(scheduler.waiting),
                      engine.kv.usage, queued, engine.kv.num_free_blocks, engine.spare_prefill_tokens_per_s())


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_step: Callable[[StepOutput], None],
                 idle_wait_s: float = 0.05, busy_wait_s: float = 0.0005) -> None:
        self.engine = engine
        self._on_step = on_step
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._urgent_calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._urgent_wake = threading.Event()
        self._mid_step_wanted: Callable[[], bool] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._busy_wait_s = busy_wait_s
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def call(self, fn: Callable[[LLMEngine], T], *, urgent: bool = False) -> Future[T]:
        future: Future[T] = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("the worker is shutting down"))
            return future
        if urgent:
            self._urgent_calls.put((fn, future))
            self._urgent_wake.set()
        else:
            self._calls.put((fn, future))
        self._wake.set()
        return future

    def run_urgent_calls_mid_step(self, wanted: Callable[[], bool]) -> None:
        """From now on, while the engine waits for a step on the device and ``wanted()`` is true (asked
        on the engine thread as it waits: e.g. "a transfer is in flight"), urgent calls run as they
        arrive, at the cost of polling the device every ``MID_STEP_POLL_S`` meanwhile; and those queued
        run between the layers of a step being launched."""
        self._mid_step_wanted = wanted
        self.engine.device_wait_hook = self._serve_urgent_calls
        self.engine.launch_hook = self._run_urgent_calls_now

    def _run_urgent_calls_now(self) -> None:
        """Engine thread, between the layers of a step being launched: run the urgent calls queued."""
        if not self._urgent_calls.empty():
            self._run_calls(self._urgent_calls)

    def _serve_urgent_calls(self, done: Callable[[], bool]) -> None:
        """Engine thread, inside a step: run urgent calls until the device is ``done`` with the step (or
        none is wanted; the engine then waits for the device as usual)."""
        wanted = self._mid_step_wanted
        while True:
            self._urgent_wake.clear()
            self._run_calls(self._urgent_calls)
            if done() or wanted is None or not (wanted() or not self._urgent_calls.empty()):
                return
            self._urgent_wake.wait(MID_STEP_POLL_S)

    def emit(self, deltas: list[RequestDelta], landing_zones: list[LandingZone] | None = None) -> None:
        """Publish deltas (and landing zones) produced outside ``step()`` (engine thread only)."""
        if deltas or landing_zones:
            self._on_step(StepOutput(deltas, landing_zones or [], load_of(self.engine)))

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._run_calls()
                if engine.has_unfinished_requests():
                    deltas = engine.step()
                    zones = engine.take_landing_zones()
                    if deltas or zones:
                        self._on_step(StepOutput(deltas, zones, load_of(engine)))
                    if deltas or engine.has_step_in_flight:
                        continue
                    self._wake.wait(self._busy_wait_s)  # waiting for KV or blocks: poll quickly
                else:
                    self._wake.wait(self._idle_wait_s)
                self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 (reported to every pending and future call)
            logger.exception("engine loop failed")
            self.error = exc
            self._stop.set()
        finally:
            self._fail_pending()

    def _run_calls(self, calls: queue.SimpleQueue | None = None) -> None:
        """Run the queued calls: urgent ones first, then the rest (only ``calls`` when given)."""
        if calls is None:
            self._run_calls(self._urgent_calls)
            calls = self._calls
        while True:
            try:
                fn, future = calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                future.set_exception(exc)

    def _fail_pending(self) -> None:
        for calls in (self._urgent_calls, self._calls):
            while True:
                try:
                    _, future = calls.get_nowait()
                except queue.Empty:
                    break
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError(f"the engine loop stopped: {self.error!r}"))

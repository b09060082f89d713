"""The workers' telemetry as the router holds it: the latest ``Telemetry`` snapshot of each worker.

Lifecycle: ``TelemetryPoller(registry)`` -> ``run()`` as a background task (every ``interval_s`` it
asks every healthy worker at once, each call bounded by ``timeout_s``) -> cancelled with the router's
other tasks. :meth:`fresh` lets a scrape wait for snapshots at most ``max_age_s`` old (one refresh at a
time: a second caller waits for the one in flight). A worker that does not answer loses its snapshot
(its per-worker series disappear rather than going stale); one that answers garbage is logged once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any

import grpc

from pdserve.router.registry import WorkerRegistry
from pdserve.v1 import worker_pb2

logger = logging.getLogger(__name__)


class TelemetryPoller:
    def __init__(self, registry: WorkerRegistry, interval_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self._registry = registry
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self.snapshots: dict[str, dict[str, Any]] = {}
        # (time.time(), snapshots) of the last refreshes: rates over time (the dashboard)
        self.history: collections.deque[tuple[float, dict[str, dict[str, Any]]]] = collections.deque(maxlen=64)
        self.refreshed_at = 0.0  # time.monotonic() of the last refresh
        self._refresh: asyncio.Task[None] | None = None
        self._garbled: set[str] = set()

    async def run(self) -> None:
        while True:
            await self.fresh(0.0)
            await asyncio.sleep(self._interval_s)

    async def fresh(self, max_age_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """The snapshots, refreshed first if older than ``max_age_s``."""
        if time.monotonic() - self.refreshed_at > max_age_s:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.ensure_future(self._refresh_all())
            await asyncio.shield(self._refresh)
        return self.snapshots

    async def _refresh_all(self) -> None:
        states = [s for s in self._registry.all() if s.healthy]
        answers = await asyncio.gather(*(self._ask(s.worker_id) for s in states))
        self.snapshots = {s.worker_id: snap for s, snap in zip(states, answers, strict=True) if snap is not None}
        self.refreshed_at = time.monotonic()
        self.history.append((time.time(), self.snapshots))

    async def _ask(self, worker_id: str) -> dict[str, Any] | None:
        try:
            reply = await self._registry.stub(worker_id).Telemetry(worker_pb2.TelemetryRequest(),
                                                                   timeout=self._timeout_s)
            snapshot = json.loads(reply.json)
            if not isinstance(snapshot, dict):
                raise ValueError("not a JSON object")
            return snapshot
        except grpc.aio.AioRpcError as exc:
            logger.debug("Telemetry of worker %s: %s", worker_id, exc.code().name)
        except (ValueError, KeyError) as exc:
            if worker_id not in self._garbled:
                self._garbled.add(worker_id)
                logger.warning("worker %s sent unreadable telemetry: %s", worker_id, exc)
        return None

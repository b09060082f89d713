"""One ``Worker.Updates`` stream per decode/colocated worker, held open for the router's lifetime.

Each :class:`UpdatesStream` runs as a background task: it opens the stream, waits for the worker's
response headers (the worker sends them, or a first ``StepUpdate``, once it has registered the
subscriber; only then is the worker routable, since deltas of a request submitted earlier could be
lost), hands every ``StepUpdate`` to ``on_update``, and when the stream drops or fails calls
``on_lost`` (once per live period) and reconnects with exponential backoff. Cancelling the task
cancels the stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import grpc

from pdserve.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


class UpdatesStream:
    def __init__(
        self,
        worker_id: str,
        stub: Callable[[], worker_pb2_grpc.WorkerStub],
        *,
        on_update: Callable[[str, worker_pb2.StepUpdate], None],
        on_live: Callable[[str], None],
        on_lost: Callable[[str, str], None],
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        self.worker_id = worker_id
        self._stub = stub
        self._on_update = on_update
        self._on_live = on_live
        self._on_lost = on_lost
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self.live = asyncio.Event()
        self.connects = 0
        self._retry_now = asyncio.Event()

    def retry_now(self) -> None:
        """Reconnect without waiting out the backoff (the worker moved to a new address)."""
        self._retry_now.set()

    async def run(self) -> None:
        """Forever: connect, stream, reconnect. Never raises except ``CancelledError``."""
        backoff = self._backoff_initial_s
        while True:
            reason = await self._stream_once()
            if self.live.is_set():
                self.live.clear()
                logger.warning("Updates stream of worker %s dropped: %s", self.worker_id, reason)
                self._on_lost(self.worker_id, reason)
                backoff = self._backoff_initial_s
            try:
                await asyncio.wait_for(self._retry_now.wait(), backoff * random.uniform(0.75, 1.0))
                backoff = self._backoff_initial_s
            except TimeoutError:
                backoff = min(backoff * 2, self._backoff_max_s)
            self._retry_now.clear()

    async def _stream_once(self) -> str:
        """Run one stream until it ends; return why it ended."""
        call = self._stub().Updates(worker_pb2.UpdatesRequest())
        try:
            await call.initial_metadata()
            if call.done():  # failed before the worker answered (connection refused, unimplemented ...)
                code = await call.code()
                return f"{code.name}: {await call.details()}"
            self.connects += 1
            self.live.set()
            self._on_live(self.worker_id)
            async for update in call:
                self._on_update(self.worker_id, update)
            return "the worker ended its Updates stream"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            call.cancel()

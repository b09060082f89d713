"""The router's table of in-flight requests: admission, ids, and each request's event queue.

A request enters with :meth:`InFlightTable.admit` (RESOURCE_EXHAUSTED beyond the limit) and leaves with
:meth:`InFlightTable.remove` exactly once, whatever its outcome. While in the table it receives, on its
queue, the deltas its decode worker streams (only from that worker: after a retry, stray deltas from
the previous worker are dropped) and a :class:`WorkerLost` event if that worker's stream drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field

import grpc

from pdserve.router.errors import RouteError, RouterOverloadedError
from pdserve.v1 import common_pb2


@dataclass(frozen=True)
class WorkerLost:
    """The request's decode worker stopped streaming (its ``Updates`` stream dropped)."""

    worker_id: str
    reason: str


RequestEvent = common_pb2.RequestDelta | WorkerLost


@dataclass(eq=False)
class InFlightRequest:
    """One admitted request. ``decode_worker``/``prefill_worker`` are its current assignment (None
    before the first Submit and after a failed one); ``prefill_tokens`` is what this request adds to
    its prefill worker's queue estimate until its first delta arrives, ``local_prefill_tokens`` what it
    adds to its decode worker's when that worker prefills it itself."""

    request_id: str
    num_prompt_tokens: int
    queue: asyncio.Queue[RequestEvent] = field(default_factory=asyncio.Queue)
    decode_worker: str | None = None
    prefill_worker: str | None = None
    prefill_tokens: int = 0
    local_prefill_tokens: int = 0
    tokens_sent: int = 0
    attempts: int = 0
    failed_workers: set[str] = field(default_factory=set)
    migrations: int = 0  # times the stream continued on another decode worker after tokens went out

    @property
    def started_streaming(self) -> bool:
        """Whether any output reached the client: from then on the request moves only as a resumed stream."""
        return self.tokens_sent > 0


class InFlightTable:
    def __init__(self, max_inflight: int) -> None:
        self._max = max_inflight
        self._requests: dict[str, InFlightRequest] = {}
        self.closed_reason: str | None = None  # set when the router drains: new requests are refused
        self._emptied = asyncio.Event()

    def admit(self, requested_id: str, num_prompt_tokens: int) -> InFlightRequest:
        """Admit a request under ``requested_id`` if non-empty and not in flight, else under a fresh uuid."""
        if self.closed_reason is not None:
            raise RouteError(grpc.StatusCode.UNAVAILABLE, self.closed_reason)
        if len(self._requests) >= self._max:
            raise RouterOverloadedError(self._max)
        request_id = requested_id if requested_id and requested_id not in self._requests else uuid.uuid4().hex
        request = InFlightRequest(request_id=request_id, num_prompt_tokens=num_prompt_tokens)
        self._requests[request_id] = request
        return request

    def remove(self, request: InFlightRequest) -> None:
        if self._requests.get(request.request_id) is request:
            del self._requests[request.request_id]
            if not self._requests:
                self._emptied.set()

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (or ``timeout_s`` passed); True if none is left."""
        if not self._requests:
            return True
        self._emptied.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._emptied.wait(), timeout_s)
        return not self._requests

    def get(self, request_id: str) -> InFlightRequest | None:
        return self._requests.get(request_id)

    def on_worker(self, worker_id: str) -> list[InFlightRequest]:
        return [r for r in self._requests.values() if r.decode_worker == worker_id]

    def __len__(self) -> int:
        return len(self._requests)

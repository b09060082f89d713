"""The worker registry: what the router knows about each worker, and the channels to reach them.

Lifecycle: :meth:`WorkerRegistry.open` (inside the router's event loop) creates one gRPC channel per
worker; :meth:`describe_all` calls ``Worker.Describe`` on every worker once (with a timeout) and marks
the ones that answer, with the expected role and model, healthy; :meth:`probe` (called by the router
every ``health_check_interval_s``) describes unhealthy workers again, and healthy prefill workers
(which have no ``Updates`` stream to reveal a failure); :meth:`close` closes the channels.

A worker is *routable* when it is healthy and, for token-streaming roles (decode, colocated), its
``Worker.Updates`` stream is live: a request submitted to a worker whose stream is down could lose
its tokens. All mutation happens on the router's event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from pdserve.router.config import WorkerEndpoint, WorkerRole
from pdserve.rpc.auth import peer_channel
from pdserve.rpc.options import CHANNEL_OPTIONS
from pdserve.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSnapshot:
    """A worker's load as of its latest ``StepUpdate`` (or ``Describe``)."""

    running_requests: int = 0
    waiting_requests: int = 0
    kv_usage: float = 0.0
    queued_prefill_tokens: int = 0
    num_free_blocks: int = 0
    prefill_tokens_per_s: float = 0.0  # spare prefill rate within the worker's step budget (0: unknown)
    loop_lag_s: float = 0.0  # how late the worker's event loop runs (common/loop_lag.py)

    @classmethod
    def from_proto(cls, msg: worker_pb2.WorkerLoad) -> LoadSnapshot:
        return cls(running_requests=msg.running_requests, waiting_requests=msg.waiting_requests,
                   kv_usage=min(max(msg.kv_usage, 0.0), 1.0), queued_prefill_tokens=msg.queued_prefill_tokens,
                   num_free_blocks=msg.num_free_blocks, prefill_tokens_per_s=max(msg.prefill_tokens_per_s, 0.0),
                   loop_lag_s=max(msg.loop_lag_s, 0.0))


@dataclass
class WorkerState:
    """The router's view of one worker. Policies read it; only the registry and the router write it.

    ``assigned_requests`` counts this router's in-flight requests on the worker (decode role: the
    requests it streams; prefill role: the requests whose prefill it was asked to do and whose first
    token has not arrived). ``queued_prefill_tokens`` is the router's own estimate of the prompt
    tokens waiting on a worker: on a prefill worker every prompt sent there, on a decode worker the
    prompts it prefills itself, until their first token.
    """

    endpoint: WorkerEndpoint
    healthy: bool = False
    stream_live: bool = False
    load: LoadSnapshot = field(default_factory=LoadSnapshot)
    info: worker_pb2.WorkerInfo | None = None
    assigned_requests: int = 0
    queued_prefill_tokens: int = 0
    last_error: str = ""
    restarts: int = 0  # times it came back at a new address (a new process)
    lost_at: float | None = None  # time.monotonic() when it stopped being usable (after being usable once)
    last_recovery_s: float = 0.0  # from its last loss to usable again
    ever_usable: bool = False
    draining: bool = False  # being removed: no new requests; those it holds finish (see Router.remove_worker)

    @property
    def worker_id(self) -> str:
        return self.endpoint.worker_id

    @property
    def role(self) -> WorkerRole:
        return self.endpoint.role

    @property
    def full_prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second at full speed, from its ``Describe`` (0: unknown)."""
        return max(self.info.prefill_tokens_per_s, 0.0) if self.info is not None else 0.0

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining and (self.stream_live or not self.role.streams_tokens)


class WorkerRegistry:
    """Per-worker state plus one gRPC channel and stub per worker."""

    def __init__(self, workers: Iterable[WorkerEndpoint], *, model: str, describe_timeout_s: float) -> None:
        self._states = {w.worker_id: WorkerState(endpoint=w) for w in workers}
        self._model = model
        self._describe_timeout_s = describe_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # -- channels ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Create the channels; call from the event loop that will use them."""
        for worker_id, state in self._states.items():
            channel = peer_channel(state.endpoint.address, list(CHANNEL_OPTIONS))
            self._channels[worker_id] = channel
            self._stubs[worker_id] = worker_pb2_grpc.WorkerStub(channel)

    def add(self, endpoint: WorkerEndpoint) -> WorkerState:
        """A worker joins (scale-out): its state and channel; unusable until it describes itself."""
        if endpoint.worker_id in self._states:
            raise ValueError(f"worker {endpoint.worker_id} is already registered")
        state = self._states[endpoint.worker_id] = WorkerState(endpoint=endpoint)
        channel = peer_channel(endpoint.address, list(CHANNEL_OPTIONS))
        self._channels[endpoint.worker_id] = channel
        self._stubs[endpoint.worker_id] = worker_pb2_grpc.WorkerStub(channel)
        return state

    def remove(self, worker_id: str) -> None:
        """A worker leaves (scale-in): forget it; its channel closes in the background."""
        self._states.pop(worker_id)
        self._stubs.pop(worker_id, None)
        self._close_later(self._channels.pop(worker_id, None))

    def _close_later(self, channel: grpc.aio.Channel | None) -> None:
        if channel is None:
            return
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    def stub(self, worker_id: str) -> worker_pb2_grpc.WorkerStub:
        return self._stubs[worker_id]

    # -- state ------------------------------------------------------------------------------------
    def get(self, worker_id: str) -> WorkerState:
        return self._states[worker_id]

    def all(self) -> list[WorkerState]:
        return list(self._states.values())

    def with_role(self, *roles: WorkerRole) -> list[WorkerState]:
        return [s for s in self._states.values() if s.role in roles]

    def model_info(self) -> worker_pb2.WorkerInfo | None:
        """The ``Describe`` answer of a healthy token-streaming worker (else of any described worker)."""
        described = [s for s in self._states.values() if s.info is not None]
        described.sort(key=lambda s: (not s.healthy, not s.role.streams_tokens))
        return described[0].info if described else None

    def mark_unhealthy(self, worker_id: str, reason: str) -> None:
        state = self._states.get(worker_id)
        if state is None:  # removed (scale-in)
            return
        if state.healthy:
            logger.warning("worker %s (%s) marked unhealthy: %s", worker_id, state.endpoint.address, reason)
        state.healthy = False
        state.last_error = reason
        self._note_usability(state)

    def set_stream_live(self, worker_id: str, live: bool) -> None:
        state = self._states.get(worker_id)
        if state is None:  # removed (scale-in)
            return
        state.stream_live = live
        self._note_usability(state)

    def rebind(self, worker_id: str, address: str) -> None:
        """The worker came back as a new process at ``address``: talk to it there (unusable until it
        describes itself again); its old channel is closed in the background."""
        state = self._states[worker_id]
        old = self._channels.get(worker_id)
        state.endpoint = WorkerEndpoint(worker_id, state.role, address, state.endpoint.node)
        state.restarts += 1
        state.healthy = state.stream_live = False
        state.last_error = f"restarted at {address}"
        self._note_usability(state)
        channel = peer_channel(address, list(CHANNEL_OPTIONS))
        self._channels[worker_id] = channel
        self._stubs[worker_id] = worker_pb2_grpc.WorkerStub(channel)
        self._close_later(old)

    @staticmethod
    def _note_usability(state: WorkerState) -> None:
        """Track when a worker stopped being usable and how long it took to come back."""
        if not state.routable:
            if state.ever_usable and state.lost_at is None:
                state.lost_at = time.monotonic()
            return
        state.ever_usable = True
        if state.lost_at is not None:
            state.last_recovery_s = time.monotonic() - state.lost_at
            state.lost_at = None
            logger.info("worker %s usable again after %.1f s", state.worker_id, state.last_recovery_s)

    def update_load(self, worker_id: str, load: worker_pb2.WorkerLoad) -> None:
        self._states[worker_id].load = LoadSnapshot.from_proto(load)

    def add_assigned(self, worker_id: str, delta: int) -> None:
        """Charge (or release) requests on a worker; a worker removed meanwhile is ignored."""
        state = self._states.get(worker_id)
        if state is not None:
            state.assigned_requests = max(0, state.assigned_requests + delta)

    def add_prefill_tokens(self, worker_id: str, delta: int) -> None:
        state = self._states.get(worker_id)
        if state is not None:
            state.queued_prefill_tokens = max(0, state.queued_prefill_tokens + delta)

    # -- Describe ---------------------------------------------------------------------------------
    async def describe(self, worker_id: str) -> bool:
        """Call ``Describe`` once; mark the worker healthy iff it answers with the expected role and model."""
        state = self._states[worker_id]
        try:
            info = await self._stubs[worker_id].Describe(worker_pb2.DescribeRequest(),
                                                          timeout=self._describe_timeout_s)
        except grpc.aio.AioRpcError as exc:
            self.mark_unhealthy(worker_id, f"Describe failed: {exc.code().name}: {exc.details()}")
            return False
        problem = self._mismatch(state, info)
        if problem:
            if state.healthy or state.last_error != problem:
                logger.error("worker %s (%s) excluded: %s", worker_id, state.endpoint.address, problem)
            state.healthy = False
            state.last_error = problem
            return False
        if not state.healthy:
            logger.info("worker %s (%s, %s) is healthy", worker_id, state.endpoint.address, state.role.value)
        state.info = info
        state.healthy = True
        state.last_error = ""
        if info.HasField("load"):
            self.update_load(worker_id, info.load)
        self._note_usability(state)
        return True

    def _mismatch(self, state: WorkerState, info: worker_pb2.WorkerInfo) -> str:
        if info.role and info.role != state.role.value:
            return f"it describes itself as role {info.role!r} but is configured as {state.role.value!r}"
        if info.model_name and info.model_name != self._model:
            return f"it serves model {info.model_name!r} but the router serves {self._model!r}"
        return ""

    async def describe_all(self) -> None:
        await asyncio.gather(*(self.describe(worker_id) for worker_id in self._states))

    async def probe(self) -> None:
        """Describe unhealthy workers again, and healthy prefill workers (their only failure signal)."""
        due = [s.worker_id for s in self._states.values() if not s.healthy or s.role is WorkerRole.PREFILL]
        await asyncio.gather(*(self.describe(worker_id) for worker_id in due))

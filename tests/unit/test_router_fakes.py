"""Fake workers and a harness for the router tests: real ``grpc.aio`` servers in the test process.

A :class:`FakeWorker` answers ``Describe`` with its role, model and a configurable load; ``Submit``
records the request and starts "generating"; a step loop emits, every ``step_interval_s``, ONE
``StepUpdate`` holding the deltas of every active request (so several requests share an update);
``Abort`` records the ids. Generated tokens are deterministic (see :func:`expected_tokens`), so tests
can check what the router assembled. Knobs: ``silent`` (never send a delta, only loads), ``submit_error`` (Submit
fails with that code), ``max_prompt_tokens`` (longer prompts fail Submit with INVALID_ARGUMENT).

Shared by the ``test_router_*`` modules (imported as ``tests.unit.test_router_fakes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from pdserve.router import Router, RouterConfig, WorkerEndpoint
from pdserve.v1 import common_pb2, pdserve_pb2, pdserve_pb2_grpc, worker_pb2, worker_pb2_grpc

MODEL = "fake-model"
T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run one async test scenario in a fresh event loop, bounded by ``timeout``."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


def chat_text(messages: Sequence[Any]) -> str:
    """How the fake "renders" a chat: role and content of every message (dicts or ChatMessage protos)."""
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else (m.role, m.content) for m in messages]
    return "".join(f"{role}:{content}" for role, content in pairs)


def _prompt_text(submit: worker_pb2.SubmitRequest) -> str:
    return chat_text(submit.chat.messages) if submit.HasField("chat") else submit.prompt_text


def base_token(submit: worker_pb2.SubmitRequest) -> int:
    if submit.HasField("prompt_token_ids"):
        return sum(submit.prompt_token_ids.ids) % 1000
    return (7 * len(_prompt_text(submit))) % 1000


def prompt_len(submit: worker_pb2.SubmitRequest) -> int:
    return len(submit.prompt_token_ids.ids) if submit.HasField("prompt_token_ids") else len(_prompt_text(submit))


def expected_tokens(prompt: Sequence[int] | str, max_tokens: int) -> list[int]:
    base = sum(prompt) % 1000 if not isinstance(prompt, str) else (7 * len(prompt)) % 1000
    return [base + i for i in range(max_tokens)]


FAKE_MAX_MODEL_LEN = 2048


def token_text(token: int) -> str:
    return f"<{token}>"


@dataclass
class _Active:
    submit: worker_pb2.SubmitRequest
    max_tokens: int
    generated: int = 0


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServicer):
    worker_id: str
    role: str
    model: str = MODEL
    tokens_per_step: int = 2
    step_interval_s: float = 0.005
    silent: bool = False
    submit_error: grpc.StatusCode | None = None
    max_prompt_tokens: int = 1000
    kv_usage: float = 0.0
    prefill_tokens_per_s: float = 0.0  # reported with every step (0: no rate known)
    queued_prefill_tokens: int = 0
    full_prefill_tokens_per_s: float = 0.0  # in Describe: the worker's rate at full speed (0: unknown)
    address: str = ""
    node: str = ""
    submitted: list[worker_pb2.SubmitRequest] = field(default_factory=list)
    submit_attempts: int = 0
    aborted: list[str] = field(default_factory=list)
    max_batch: int = 0
    active: dict[str, _Active] = field(default_factory=dict)
    _subscribers: list[asyncio.Queue[worker_pb2.StepUpdate | None]] = field(default_factory=list)
    _server: Any = None
    _loop_task: Any = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self, port: int = 0) -> str:
        self._server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        self._loop_task = asyncio.create_task(self._step_loop())
        return self.address

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for queue in self._subscribers:
            queue.put_nowait(None)
        if self._server is not None:
            await self._server.stop(0)

    def endpoint(self) -> WorkerEndpoint:
        return WorkerEndpoint(self.worker_id, self.role, self.address, self.node)  # type: ignore[arg-type]

    def load(self) -> worker_pb2.WorkerLoad:
        return worker_pb2.WorkerLoad(running_requests=len(self.active), kv_usage=self.kv_usage, num_free_blocks=100,
                                     prefill_tokens_per_s=self.prefill_tokens_per_s,
                                     queued_prefill_tokens=self.queued_prefill_tokens)

    # -- RPCs -------------------------------------------------------------------------------------
    async def Describe(self, request: Any, context: Any) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(worker_id=self.worker_id, role=self.role, address=self.address,
                                     model_name=self.model, max_model_len=FAKE_MAX_MODEL_LEN, vocab_size=1000,
                                     num_kv_blocks=100, load=self.load(), kv_transport="loopback",
                                     prefill_tokens_per_s=self.full_prefill_tokens_per_s)

    async def Telemetry(self, request: Any, context: Any) -> worker_pb2.TelemetryReply:
        """What a CPU worker reports (the schema of pdserve/worker/telemetry.py), from the fake's state."""
        snapshot = {"worker_id": self.worker_id, "role": self.role, "model": self.model,
                    "engine": {"running_requests": len(self.active), "waiting_requests": 0, "kv_usage": self.kv_usage,
                               "num_kv_blocks": 100, "queued_prefill_tokens": self.queued_prefill_tokens,
                               "preemptions": 0, "late_prompts": 2, "prompt_tokens_computed": 0, "prefix_cache_queries": 0,
                               "prefix_cache_hits": 0, "steps": {"decode": {"count": 3, "seconds": 0.03}},
                               "step_time_model": {"base_s": 0.005, "per_token_s": 2e-5, "free_tokens": 256},
                               "step_time_calibration": {"decode": 1.0, "mixed": 1.0, "prefill": 1.0},
                               "step_time_busy": {"decode": {"steps": 3, "measured_s": 0.03, "profiled_s": 0.03}},
                               "kv_bytes_per_token": 1000},
                    "kv_transfer": {"transport": "loopback", "received": len(self.submitted)},
                    "gpu": {"available": False, "reason": "no NVIDIA GPU on this worker"}}
        return worker_pb2.TelemetryReply(json=json.dumps(snapshot))

    async def Submit(self, request: worker_pb2.SubmitRequest, context: Any) -> worker_pb2.SubmitReply:
        self.submit_attempts += 1
        if self.submit_error is not None:
            await context.abort(self.submit_error, f"{self.worker_id} refuses")
        if prompt_len(request) > self.max_prompt_tokens:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt: the prompt has {prompt_len(request)} tokens but max is {self.max_prompt_tokens}")
        self.submitted.append(request)
        max_tokens = request.params.max_tokens if request.params.HasField("max_tokens") else 16
        max_tokens = min(max_tokens, FAKE_MAX_MODEL_LEN - prompt_len(request))  # the engine stops at the model length
        # a resumed stream goes on after the tokens a lost worker already sent (as the engine does)
        self.active[request.request_id] = _Active(request, max_tokens, generated=len(request.resume_token_ids.ids))
        return worker_pb2.SubmitReply()

    async def Abort(self, request: worker_pb2.AbortRequest, context: Any) -> worker_pb2.AbortReply:
        self.aborted.extend(request.request_ids)
        gone = [i for i in request.request_ids if self.active.pop(i, None) is not None]
        return worker_pb2.AbortReply(aborted=gone)

    async def Updates(self, request: Any, context: Any) -> AsyncIterator[worker_pb2.StepUpdate]:
        queue: asyncio.Queue[worker_pb2.StepUpdate | None] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            yield worker_pb2.StepUpdate(load=self.load())  # "subscribed": the router may route to us now
            while (update := await queue.get()) is not None:
                yield update
        finally:
            self._subscribers.remove(queue)

    # -- the fake engine --------------------------------------------------------------------------
    async def _step_loop(self) -> None:
        while True:
            await asyncio.sleep(self.step_interval_s)
            if not self.active:
                continue
            deltas = [] if self.silent else [self._step(request_id, a) for request_id, a in list(self.active.items())]
            self.max_batch = max(self.max_batch, len(deltas))
            update = worker_pb2.StepUpdate(deltas=deltas, load=self.load())
            for queue in self._subscribers:
                queue.put_nowait(update)

    def _step(self, request_id: str, a: _Active) -> common_pb2.RequestDelta:
        base = base_token(a.submit)
        n = min(self.tokens_per_step, a.max_tokens - a.generated)
        tokens = [base + a.generated + i for i in range(n)]
        a.generated += n
        delta = common_pb2.RequestDelta(request_id=request_id, new_token_ids=tokens,
                                        new_text="".join(token_text(t) for t in tokens),
                                        num_prompt_tokens=prompt_len(a.submit), num_cached_tokens=3)
        if a.generated >= a.max_tokens:
            delta.finished = True
            delta.finish_reason = common_pb2.FINISH_REASON_LENGTH
            self.active.pop(request_id, None)
        return delta


def closed_port_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.asynccontextmanager
async def cluster(workers: Sequence[FakeWorker], *, mode: str = "colocated", extra: Sequence[WorkerEndpoint] = (),
                  **config: Any) -> AsyncIterator[tuple[Router, pdserve_pb2_grpc.PdServeStub]]:
    """Start ``workers``, a router over them (plus ``extra`` endpoints), and a client stub."""
    for worker in workers:
        await worker.start()
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "describe_timeout_s": 2.0,
                                "request_timeout_s": 10.0, **config}
    router = Router(RouterConfig(**settings), model=MODEL, mode=mode,
                    workers=[w.endpoint() for w in workers] + list(extra))
    port = await router.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield router, pdserve_pb2_grpc.PdServeStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        await router.stop(grace=1.0)
        for worker in workers:
            await worker.stop()


def generate_request(prompt: Sequence[int] | str, max_tokens: int = 8, **kwargs: Any) -> pdserve_pb2.GenerateRequest:
    request = pdserve_pb2.GenerateRequest(params=common_pb2.SamplingParams(max_tokens=max_tokens), **kwargs)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_fake_worker_is_deterministic() -> None:
    submit = worker_pb2.SubmitRequest(request_id="r", prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]))
    worker = FakeWorker("w", "colocated", tokens_per_step=3)
    active = _Active(submit, max_tokens=4)
    first, second = worker._step("r", active), worker._step("r", active)
    assert list(first.new_token_ids) + list(second.new_token_ids) == expected_tokens([1, 2, 3], 4)
    assert second.finished and not first.finished


class BackgroundCluster:
    """:func:`cluster` on its own event loop thread, for callers that block (a browser driver): ``url``
    is the router's HTTP base, ``send(n)`` runs ``n`` unary requests through it. Use as a context
    manager; leaving it stops everything."""

    def __init__(self, workers: Sequence[FakeWorker], **config: Any) -> None:
        self._workers, self._config = workers, config
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.url = ""

    async def _serve(self) -> None:
        async with cluster(self._workers, http_port=0, **self._config) as (router, stub):
            self.router, self._stub, self._loop = router, stub, asyncio.get_running_loop()
            self.url = f"http://127.0.0.1:{router.http_port}"
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)

    def send(self, n: int, max_tokens: int = 4) -> None:
        async def requests() -> None:
            for i in range(n):
                await self._stub.GenerateUnary(generate_request([1, 2, i % 50], max_tokens))
        asyncio.run_coroutine_threadsafe(requests(), self._loop).result(60)

    def __enter__(self) -> BackgroundCluster:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the fake cluster did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

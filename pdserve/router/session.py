"""One request's life in the router, from ``Submit`` to its final response.

:meth:`RequestSession.run` submits the request (with retries, see :class:`~pdserve.router.dispatch.Dispatcher`),
then waits on the request's queue: each delta becomes one response (built by
:class:`~pdserve.rpc.convert.ResponseAssembler`) passed to ``emit`` (a stream write); the finished delta
ends the session, which returns the accumulated completion (the unary answer). Deltas that queued up
while the previous write was in progress leave as one response (tokens concatenated): a stream behind
its worker catches up in one write instead of one write per token, so a router relaying thousands of
tokens a second spends its time per write, not per token, once it falls behind (vLLM's output
collector merges waiting outputs the same way). Before falling behind, too: with
``stream_writes_per_s`` (``RouterConfig``) a stream that wrote tokens waits ``in-flight requests /
stream_writes_per_s`` (at most :data:`MAX_WRITE_INTERVAL_S`) before its next write, so the router's
writes per second stay near that rate however many streams it relays; the first tokens never wait.
Failure paths:

* nothing arrives for ``request_timeout_s``: DEADLINE_EXCEEDED (and an Abort at the worker);
* the worker's Updates stream drops: the request is re-submitted elsewhere if no token reached the
  client yet and the retry budget lasts; once tokens went out, the stream *moves*: it is submitted
  to another decode worker (or to the same one once restarted, waiting up to ``request_timeout_s``)
  with the tokens already sent as ``resume_token_ids``, which that worker computes with the prompt
  and does not send again, so the client sees one stream (up to ``max_stream_migrations`` times;
  then, or with no worker back in time, UNAVAILABLE);
* the worker reports an error in the delta (``finish_reason`` ERROR or ``error`` set): the status code
  the worker named (UNAVAILABLE for a lost peer), else INTERNAL, with the worker's message;
* the caller is cancelled (client gone, deadline): the cancellation propagates, after an Abort.

Whatever the outcome, the ``finally`` clause leaves no trace: an unfinished request is aborted at its
decode worker (which also cancels its prefill), its load charges are released and it leaves the table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from pdserve.router.dispatch import Dispatcher
from pdserve.router.errors import RequestTimeoutError, RouteError
from pdserve.router.inflight import InFlightRequest, InFlightTable, RequestEvent, WorkerLost
from pdserve.router.metrics import RouterMetrics
from pdserve.rpc.convert import ResponseAssembler
from pdserve.v1 import common_pb2, pdserve_pb2, worker_pb2

Emit = Callable[[pdserve_pb2.GenerateResponse], Awaitable[None]]

#: The longest a stream holds tokens back to pace its writes (``RouterConfig.stream_writes_per_s``).
MAX_WRITE_INTERVAL_S = 0.05
#: Shorter waits are not worth a timer: the next step's tokens come about as soon.
MIN_WRITE_INTERVAL_S = 0.002


class RequestSession:
    def __init__(self, dispatcher: Dispatcher, table: InFlightTable, request: InFlightRequest,
                 submit: worker_pb2.SubmitRequest, *, timeout_s: float, metrics: RouterMetrics | None = None,
                 stream_writes_per_s: float = 0.0) -> None:
        self._metrics = metrics
        self._stream_writes_per_s = stream_writes_per_s
        self._last_token_write: float | None = None  # when tokens last left on the stream (loop clock)
        self._dispatcher = dispatcher
        self._table = table
        self._request = request
        self._submit = submit
        self._timeout_s = timeout_s
        self._assembler = ResponseAssembler(request.request_id)
        self._started = 0.0  # when run() began (the event loop's clock)
        self._first_token_s: float | None = None  # run() start -> first token, once one arrived

    async def run(self, emit: Emit | None = None,
                  on_accepted: Callable[[], Awaitable[None]] | None = None) -> pdserve_pb2.GenerateResponse:
        """Serve the request; ``emit`` receives each streamed response, ``on_accepted`` is awaited once a
        worker accepted the request (before any response). Returns the whole completion (the
        ``GenerateUnary`` answer). Raises :class:`RouteError` on failure."""
        request = self._request
        worker_done = False
        clock = asyncio.get_running_loop().time
        self._started, outcome, finish = clock(), "cancelled", ""
        try:
            await self._dispatcher.place(request, self._submit, clock() + self._dispatcher.no_worker_wait_s)
            if on_accepted is not None:
                await on_accepted()
            while not worker_done:
                pending: list[common_pb2.RequestDelta] = []  # sent as one response (see module)
                if emit is not None:
                    await self._pace_writes(clock())
                for event in await self._next_events():
                    if isinstance(event, WorkerLost):
                        await self._send(emit, pending)
                        await self._move(event)
                        continue
                    if event.finish_reason == common_pb2.FINISH_REASON_ERROR or event.error:
                        await self._send(emit, pending)
                        raise RouteError(_status_code(event.error_code),
                                         f"request {request.request_id} failed on worker {request.decode_worker}: "
                                         f"{event.error or 'unspecified worker error'}")
                    pending.append(event)
                    if event.finished:
                        worker_done = True
                        finish = common_pb2.FinishReason.Name(event.finish_reason).removeprefix("FINISH_REASON_").lower()
                        break
                await self._send(emit, pending)
            outcome = "finished"
            return self._assembler.unary_response()
        except RouteError:
            outcome = "error"
            raise
        finally:
            if self._metrics is not None:
                usage = self._assembler.usage
                self._metrics.ended(outcome, finish, clock() - self._started, usage.prompt_tokens,
                                    usage.completion_tokens, self._first_token_s)
            if not worker_done and request.decode_worker is not None:
                self._dispatcher.abort_in_background(request.request_id, request.decode_worker)
            self._dispatcher.release(request)
            self._table.remove(request)

    def discard(self) -> None:
        """Release a session that will never :meth:`run` (its caller failed first); idempotent."""
        self._dispatcher.release(self._request)
        self._table.remove(self._request)

    async def _next_events(self) -> list[RequestEvent]:
        """Every event waiting on the request's queue, waiting for the first up to the request timeout."""
        queue = self._request.queue
        if queue.empty():
            try:
                async with asyncio.timeout(self._timeout_s):  # (no task per wait, unlike wait_for on 3.11)
                    first = await queue.get()
            except TimeoutError:
                raise RequestTimeoutError(self._request.request_id, self._request.decode_worker or "?",
                                          self._timeout_s) from None
            events = [first]
        else:
            events = []
        while not queue.empty():
            events.append(queue.get_nowait())
        return events

    async def _pace_writes(self, now: float) -> None:
        """After a write with tokens, wait out this stream's share of the router's write budget (see the
        module docstring); events arriving meanwhile queue and leave together."""
        if self._last_token_write is None or self._stream_writes_per_s <= 0:
            return
        interval = min(len(self._table) / self._stream_writes_per_s, MAX_WRITE_INTERVAL_S)
        wait = self._last_token_write + interval - now
        if interval >= MIN_WRITE_INTERVAL_S and wait > 0:
            await asyncio.sleep(wait)

    def _observe_tokens(self, now: float) -> None:
        """Metrics, before a write with tokens at ``now``: the first token's delay, or the gap since the
        previous write with tokens."""
        if self._metrics is None:
            return
        if self._last_token_write is None:
            self._first_token_s = now - self._started
            self._metrics.first_token(self._first_token_s)
        else:
            self._metrics.token_gap(now - self._last_token_write)

    async def _send(self, emit: Emit | None, pending: list[common_pb2.RequestDelta]) -> None:
        """Record the waiting deltas, emit them as one response, and forget them. Per call, not per delta:
        the clock, the token metrics and the write (the router's per-token path)."""
        if not pending:
            return
        response = self._assembler.add_protos(pending)
        pending.clear()
        if response.token_ids:
            now = asyncio.get_running_loop().time()
            self._observe_tokens(now)
            self._request.tokens_sent += len(response.token_ids)
            self._last_token_write = now
        if emit is not None:
            await emit(response)

    async def _move(self, lost: WorkerLost) -> None:
        """Re-submit to another worker after ``lost``: from scratch if no token went out yet, else as a
        resumed stream (see the module docstring)."""
        request = self._request
        if lost.worker_id != request.decode_worker:  # stale: the request already moved
            return
        if request.started_streaming:
            await self._resume(lost)
            return
        self._dispatcher.abort_in_background(request.request_id, lost.worker_id)  # in case it still runs
        self._dispatcher.release(request)
        self._dispatcher.note_failure(request, lost.worker_id, lost.reason)
        self._assembler = ResponseAssembler(request.request_id)  # drop what the lost worker reported
        await self._dispatcher.submit(request, self._submit)


    async def _resume(self, lost: WorkerLost) -> None:
        request = self._request
        lost_after = (f"request {request.request_id}: worker {lost.worker_id} was lost after "
                      f"{request.tokens_sent} tokens were sent ({lost.reason})")
        if request.migrations >= self._dispatcher.max_stream_migrations:
            raise RouteError(grpc.StatusCode.UNAVAILABLE,
                             f"{lost_after}; it already moved {request.migrations} time(s), the limit "
                             f"(router.max_stream_migrations)")
        self._dispatcher.abort_in_background(request.request_id, lost.worker_id)  # in case it still runs
        self._dispatcher.release(request)
        request.migrations += 1
        resume = self._submit.resume_token_ids.ids
        del resume[:]
        resume.extend(self._assembler.token_ids)
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:
            await self._dispatcher.place(request, self._submit, deadline, avoid=lost.worker_id)
        except RouteError as exc:
            raise RouteError(exc.code, f"{lost_after}; it could not continue elsewhere: {exc.message}") from None
        if self._metrics is not None:
            self._metrics.stream_moved()


def _status_code(name: str) -> grpc.StatusCode:
    """The status code a worker named for a failed request (INTERNAL if none or unknown)."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL) if name else grpc.StatusCode.INTERNAL

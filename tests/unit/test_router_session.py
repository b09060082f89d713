"""The router's per-request session: deltas that queued up while a write was in progress leave as one
response (tokens, text, logprobs concatenated, finish and usage from the last); one at a time otherwise."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.common.outputs import FinishReason
from pdserve.router.errors import RouteError
from pdserve.router.inflight import InFlightTable
from pdserve.router.session import RequestSession
from pdserve.rpc import convert
from pdserve.rpc.types import Completion
from pdserve.v1 import common_pb2, pdserve_pb2, worker_pb2


def _delta(ids: list[int], text: str, finished: bool = False, error: str = "") -> common_pb2.RequestDelta:
    delta = common_pb2.RequestDelta(request_id="r", new_token_ids=ids, new_text=text, finished=finished,
                                    num_prompt_tokens=3, error=error)
    if finished:
        delta.finish_reason = common_pb2.FINISH_REASON_LENGTH
    if error:
        delta.finish_reason = common_pb2.FINISH_REASON_ERROR
        delta.error_code = "UNAVAILABLE"
    return delta


class _Worker:
    """Stands in for the dispatcher: ``place`` assigns a worker and queues ``ahead`` deltas at once (a
    worker that ran ahead of the stream); ``feed`` queues more later."""

    no_worker_wait_s = 1.0
    max_stream_migrations = 0

    def __init__(self, ahead: list[common_pb2.RequestDelta]) -> None:
        self.ahead = ahead
        self.released = 0
        self.aborted: list[str] = []

    async def place(self, request, message, deadline, avoid=None) -> None:  # noqa: ANN001
        request.decode_worker = "decode-0"
        for delta in self.ahead:
            request.queue.put_nowait(delta)

    def release(self, request) -> None:  # noqa: ANN001
        self.released += 1

    def abort_in_background(self, request_id: str, worker_id: str) -> None:
        self.aborted.append(request_id)


def _run(ahead: list[common_pb2.RequestDelta], later: list[common_pb2.RequestDelta] = ()
         ) -> tuple[list[pdserve_pb2.GenerateResponse], pdserve_pb2.GenerateResponse | Exception]:
    async def main() -> tuple[list[pdserve_pb2.GenerateResponse], pdserve_pb2.GenerateResponse | Exception]:
        table = InFlightTable(8)
        request = table.admit("r", 3)
        worker = _Worker(ahead)
        session = RequestSession(worker, table, request, worker_pb2.SubmitRequest(), timeout_s=5)  # type: ignore[arg-type]
        sent: list[pdserve_pb2.GenerateResponse] = []

        async def emit(response: pdserve_pb2.GenerateResponse) -> None:
            sent.append(pdserve_pb2.GenerateResponse.FromString(response.SerializeToString()))
            if later:  # the next delta arrives while this write is in progress
                request.queue.put_nowait(later.pop(0))
            await asyncio.sleep(0)

        try:
            answer: pdserve_pb2.GenerateResponse | Exception = await session.run(emit)
        except RouteError as exc:
            answer = exc
        assert len(table) == 0 and worker.released == 1
        assert worker.aborted == ([] if isinstance(answer, pdserve_pb2.GenerateResponse) else ["r"])
        return sent, answer

    return asyncio.run(main())


def test_deltas_waiting_together_leave_as_one_response() -> None:
    sent, answer = _run([_delta([1], "a"), _delta([2, 3], "bc"), _delta([4], "d", finished=True)])
    assert len(sent) == 1
    assert list(sent[0].token_ids) == [1, 2, 3, 4] and sent[0].text == "abcd"
    assert sent[0].finish_reason == common_pb2.FINISH_REASON_LENGTH and sent[0].usage.completion_tokens == 4
    assert isinstance(answer, pdserve_pb2.GenerateResponse) and list(answer.token_ids) == [1, 2, 3, 4]


def test_deltas_arriving_one_by_one_leave_one_by_one() -> None:
    sent, answer = _run([_delta([1], "a")], [_delta([2], "b"), _delta([3], "c", finished=True)])
    assert [list(r.token_ids) for r in sent] == [[1], [2], [3]]
    streamed = Completion.from_chunks([convert.chunk_from_response(r) for r in sent])
    assert streamed == convert.completion_from_response(answer)
    assert streamed.finish_reason is FinishReason.LENGTH


def test_tokens_before_an_error_still_go_out_then_the_error() -> None:
    sent, answer = _run([_delta([1], "a"), _delta([2], "b"), _delta([], "", error="prefill worker lost")])
    assert [list(r.token_ids) for r in sent] == [[1, 2]]
    assert isinstance(answer, RouteError) and "prefill worker lost" in answer.message


def test_several_deltas_leave_as_one_response_in_order_with_the_last_finish() -> None:
    deltas = [_delta([5], "x"), _delta([], ""), _delta([6, 7], "yz", finished=True)]
    assembler = convert.ResponseAssembler("id")
    merged = assembler.add_protos(deltas)
    assert list(merged.token_ids) == [5, 6, 7] and merged.text == "xyz" and merged.usage.completion_tokens == 3
    assert merged.request_id == "id" and merged.finish_reason == deltas[-1].finish_reason
    assert convert.completion_from_response(merged) == convert.completion_from_response(assembler.unary_response())
    one_by_one = convert.ResponseAssembler("id")
    singles = [one_by_one.add_proto(d) for d in deltas]  # the same stream, one response per delta
    assert [t for r in singles for t in r.token_ids] == list(merged.token_ids)
    assert one_by_one.unary_response() == assembler.unary_response()
    unfinished = convert.ResponseAssembler("id").add_protos(deltas[:2])
    assert not unfinished.finish_reason and not unfinished.HasField("usage")
    with pytest.raises(ValueError, match="at least one"):
        convert.ResponseAssembler("id").add_protos([])
    with pytest.raises(ValueError, match="after the request finished"):
        assembler.add_protos([_delta([8], "w")])

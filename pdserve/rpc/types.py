"""The client API's result types: plain, torch-free dataclasses for what ``pdserve.v1.PdServe`` returns.

:mod:`pdserve.rpc.convert` builds them from proto messages (and back); :mod:`pdserve.client` returns
them. A streamed completion arrives as :class:`CompletionChunk` objects (deltas); a unary one, or a
stream folded with :meth:`Completion.from_chunks`, as one :class:`Completion`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.common.outputs import FinishReason, TokenLogprobs


@dataclass(frozen=True)
class Usage:
    """Token counts of one request. ``cached_prompt_tokens`` of the prompt were served from a cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class CompletionChunk:
    """One streamed response: what the completion gained since the previous chunk.

    ``text``/``token_ids``/``logprobs`` are deltas. ``finish_reason`` is ``None`` until the last chunk,
    which also carries ``usage`` (and ``stop_reason`` when a stop string or stop token ended it).
    ``logprobs`` is ``None`` when the request did not ask for logprobs (or the chunk has no tokens).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    """A whole completion: all generated text and token ids, why it ended, and its token counts.

    ``finish_reason`` is set for every completion the server finished (``None`` only when built from an
    unfinished stream). ``logprobs`` holds one entry per generated token, or ``None`` if not requested.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    usage: Usage
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None

    @classmethod
    def from_chunks(cls, chunks: Iterable[CompletionChunk]) -> Completion:
        """Concatenate streamed chunks into the completion they describe.

        The usage is the last chunk's; when no chunk carried usage, it counts the received tokens.
        """
        request_id = ""
        texts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprobs] | None = None
        finish_reason: FinishReason | None = None
        stop_reason: str | int | None = None
        usage: Usage | None = None
        for chunk in chunks:
            request_id = chunk.request_id or request_id
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            if chunk.logprobs:
                logprobs = (logprobs or []) + chunk.logprobs
            if chunk.finish_reason is not None:
                finish_reason, stop_reason = chunk.finish_reason, chunk.stop_reason
            if chunk.usage is not None:
                usage = chunk.usage
        return cls(request_id=request_id, text="".join(texts), token_ids=token_ids,
                   finish_reason=finish_reason, usage=usage or Usage(completion_tokens=len(token_ids)),
                   stop_reason=stop_reason, logprobs=logprobs)


@dataclass(frozen=True)
class ModelInfo:
    """A model the cluster serves."""

    name: str
    max_model_len: int = 0
    vocab_size: int = 0


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the router sees it. ``role`` is "prefill", "decode" or "colocated"."""

    worker_id: str
    role: str
    address: str = ""
    healthy: bool = False
    running_requests: int = 0
    waiting_requests: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    queued_prefill_tokens: int = 0
    num_kv_blocks: int = 0
    restarts: int = 0  # times it came back as a new process
    last_recovery_s: float = 0.0  # seconds from its last loss to serving again (0: never lost)
    loop_lag_s: float = 0.0  # how late its event loop runs, as last reported (s; common/loop_lag.py)


@dataclass(frozen=True)
class PlannedConfiguration:
    """One configuration as the online planner predicted it for the traffic of its window."""

    config: str  # "colocated x2", "1P1D", ...
    goodput_per_gpu: float = 0.0  # req/s per GPU with the target share meeting both SLOs
    attainment_at_offered: float = 0.0  # share meeting both SLOs at the window's own rate
    preemptions_per_request: float = 0.0  # at the window's rate


@dataclass(frozen=True)
class PlannerStatus:
    """The online planner's last round (``router.planner_mode`` recommend or apply). ``status`` is "ok" or
    why the round made no recommendation (too few requests, no step-time model yet, a failure)."""

    mode: str
    status: str
    recommended: str = ""
    current: str = ""
    planned_at: float = 0.0  # unix seconds (0: no round yet)
    predictions: tuple[PlannedConfiguration, ...] = ()
    apply_status: str = ""  # apply mode: what it decided last and why


@dataclass(frozen=True)
class ClusterStatus:
    """The cluster as the router sees it. ``mode`` is "disaggregated" or "colocated"; ``planner`` is None
    when the router runs no online planner."""

    mode: str
    model: str
    workers: tuple[WorkerStatus, ...] = ()
    requests_in_flight: int = 0
    router_loop_lag_s: float = 0.0  # how late the router's event loop runs now (s)
    router_gc_pause_s: float = 0.0  # the longest garbage collection in the router's process, last 2 s
    planner: PlannerStatus | None = None

    @property
    def healthy_workers(self) -> tuple[WorkerStatus, ...]:
        return tuple(w for w in self.workers if w.healthy)

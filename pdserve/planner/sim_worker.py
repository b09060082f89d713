"""One simulated worker's state in the cluster simulation (:mod:`pdserve.planner.simulate`): the
requests it holds (waiting prompts, decoding requests, KV that arrived), its prefix cache and its
KV blocks; and the simulated requests and their outcomes.

**Prefix caching**: a request may name its prompt's blocks (``prefix_blocks``, ``block_tokens`` tokens
each; equal leading ids mean an equal prefix, as the Mooncake trace's hash ids do). Each worker keeps the
blocks of the prompts it computed, least recently used first out past ``WorkerSpec.cache_tokens`` (None:
no limit); a prompt skips the leading blocks its worker holds when its first chunk is scheduled (never its
last token), as the engine's prefix cache does. The router's placement does not look at caches.

**KV capacity** (``WorkerSpec.kv_capacity_tokens``; None: no limit): a worker's requests hold their KV
in 16-token blocks -- a prompt what it has computed, a decoding request its prompt and output so far -- as
the engine allocates them, on demand. When a step's decodes need blocks that are not free, the most
recently admitted decoding requests are preempted (their KV freed; they return to the head of the queue
and later recompute prompt and output, as the engine does), and that step admits no new prompt; prompt
chunks are cut to the free blocks; a request whose KV arrived from a prefill worker starts decoding only
once its prompt fits, and its first token counts from then (the engine reserves that landing zone before
the prefill starts, which then starts that much later). A request that cannot fit even on an idle worker
is dropped (no first token).

**Deadline order**: a worker with a TTFT SLO (``WorkerSpec.ttft_slo_s``: every worker of a cluster with an
``slo``, prefill workers too) queues its fresh prompts as the engine does, by
:func:`pdserve.common.deadline_order.deadline_order` at each step. Not modelled: network and host overheads
beyond the profile's step times.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pdserve.common.config import EngineConfig
from pdserve.common.step_model import StepTimeModel

KV_BLOCK_TOKENS = EngineConfig.block_size  # the engines' KV block (their default)


def kv_blocks_tokens(tokens: int) -> int:
    """``tokens`` of KV rounded up to whole blocks."""
    return -(-tokens // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_blocks: tuple[int, ...] = ()  # ids of the prompt's consecutive blocks (see the module docstring)
    block_tokens: int = 0

    def block_keys(self) -> list[int]:
        """One key per full block of the prompt, each standing for the whole prefix up to it."""
        keys: list[int] = []
        key = 0
        if self.block_tokens <= 0:
            return keys
        for i, block in enumerate(self.prefix_blocks[: self.prompt_tokens // self.block_tokens]):
            key = hash((key, block)) if i else hash((-1, block))
            keys.append(key)
        return keys


@dataclass
class SimOutcome:
    request: SimRequest
    first_token_s: float | None = None
    done_s: float | None = None
    prompt_steps: int = 0  # steps that carried a chunk of its prompt (recomputation included)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.request.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.done_s is None or self.request.output_tokens < 2:
            return None
        return (self.done_s - self.first_token_s) / (self.request.output_tokens - 1)

    def meets(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        ttft, tpot = self.ttft_s, self.tpot_s
        return ttft is not None and ttft <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)


def decode_growth(active: ActiveRequest) -> int:
    """KV tokens a decoding request's next token needs beyond what it holds (a new block, or none)."""
    held = active.outcome.request.prompt_tokens + active.produced - 1
    return kv_blocks_tokens(held + 1) - kv_blocks_tokens(held)


@dataclass(frozen=True)
class WorkerSpec:
    """How one simulated worker schedules (the engine settings that matter here)."""

    max_batch_tokens: int = 8192
    max_running: int = 256
    step_budget_s: float | None = None  # the TPOT SLO of an SLO-budgeted worker
    min_prefill_chunk: int = 32
    budget_window: int = 0  # the engine's step_budget_window
    borrow_tokens: int = 0  # the engine's step_budget_borrow_tokens (with it, per-request slack as well)
    defer_below: int = 0  # the engine's defer_chunks_below
    ttft_slo_s: float | None = None  # prompts in deadline order; how long a deferred one may wait (a share of it)
    cache_tokens: int | None = None  # prefix cache size (None: unbounded; 0: no prefix caching)
    kv_capacity_tokens: int | None = None  # KV cache size in tokens (None: unbounded)
    graph_rows: tuple[int, ...] = ()  # rows its CUDA graphs compute, ascending (a budget-cut chunk fills them)


@dataclass
class ActiveRequest:
    outcome: SimOutcome
    computed: int = 0  # prompt tokens computed (or found in the worker's prefix cache)
    produced: int = 0  # output tokens produced
    looked_up: bool = False  # whether the worker's prefix cache was consulted
    recompute: int = 0  # after a preemption: the tokens (prompt and output so far) to compute again
    waited_for_blocks: bool = False  # its KV arrived at a decode worker with too few free blocks
    admitted: bool = False  # a chunk of its prompt was scheduled (no longer a fresh prompt: see deadline order)
    late: bool = False  # found unable to meet its TTFT deadline (once)

    @property
    def to_compute(self) -> int:
        """Tokens its prefill computes in all: the prompt, or what a preemption threw away."""
        return self.recompute or self.outcome.request.prompt_tokens

    @property
    def kv_tokens(self) -> int:
        """KV it holds: what it computed, or (decoding) its prompt and every output but the last, whose KV
        the next step writes."""
        if self.computed < self.to_compute:
            return kv_blocks_tokens(self.computed)
        return kv_blocks_tokens(self.outcome.request.prompt_tokens + self.produced - 1)


@dataclass
class SimWorker:
    role: str  # colocated | prefill | decode
    spec: WorkerSpec
    model: StepTimeModel
    waiting: deque[ActiveRequest] = field(default_factory=deque)  # prompts to compute (colocated, prefill)
    running: list[ActiveRequest] = field(default_factory=list)  # decoding
    joining: list[ActiveRequest] = field(default_factory=list)  # KV arrived, decodes from the next step
    busy: bool = False
    last_step_s: float = 0.0  # the step just run (the engine plans the next while it is in flight); 0 when idle
    recent_s: deque[float] = field(init=False)  # the last steps' seconds (the window budget)
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)  # prefix block key -> its tokens, LRU first
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        self.recent_s = deque(maxlen=max(self.spec.budget_window - 1, 0))

    def cached_prefix(self, request: SimRequest) -> int:
        """Prompt tokens this worker's prefix cache holds for ``request`` (at most all but the last)."""
        hit = 0
        for key in request.block_keys():
            if key not in self.cache:
                break
            self.cache.move_to_end(key)
            hit += request.block_tokens
        return min(hit, request.prompt_tokens - 1)

    def remember(self, request: SimRequest) -> None:
        """Keep the full blocks of a prompt this worker computed, evicting the least recently used."""
        limit = self.spec.cache_tokens
        if limit == 0:
            return
        for key in request.block_keys():
            if key in self.cache:
                self.cache.move_to_end(key)
                continue
            self.cache[key] = request.block_tokens
            self.cached_tokens += request.block_tokens
        while limit is not None and self.cached_tokens > limit and self.cache:
            self.cached_tokens -= self.cache.popitem(last=False)[1]

    @property
    def queued_prompt_tokens(self) -> int:
        return sum(a.to_compute - a.computed for a in self.waiting)

    def kv_used(self) -> int:
        """KV tokens (whole blocks) its decoding and partly computed requests hold."""
        return sum(a.kv_tokens for a in self.running) + sum(a.kv_tokens for a in self.waiting if a.computed)

    @property
    def held(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.joining)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.joining)

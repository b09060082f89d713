"""The engine: one model, its paged KV cache and a scheduler, advanced one step at a time.

Lifecycle: construct (loads weights, sizes and allocates the KV cache) -> ``add_request`` any time
(validated before it is queued) -> ``step()`` repeatedly while ``has_unfinished_requests()``; each
step returns a :class:`RequestDelta` for every request that produced a token or finished ->
``abort_request`` any time. A finished request has freed its blocks and is forgotten by the engine.

Role entry points (the engine knows nothing of roles; the shells set these per request):

* decode role: ``add_request(..., remote_prefill=True)``; a later step allocates its landing zone
  (``take_landing_zones()`` lists it); once the KV is there, ``complete_remote_prefill(id, first_token)``
  (or ``fail_request``).
* prefill role: ``add_request(..., prefill_only=True)`` finishes after the first token but keeps its
  blocks, which ``release_held_blocks(id)`` frees once they were sent; ``step_hooks`` sees each plan
  before the forward pass and each layer right after it wrote its KV.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pdserve.common.config import TINY_RANDOM_MODEL, EngineConfig
from pdserve.common.errors import ConfigError, InvalidParameterError
from pdserve.common.outputs import Logprob, RequestDelta, TokenLogprobs
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.attention.selector import select_backend
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.device import (
    rank_devices,
    resolve_device,
    resolve_dtype,
    resolve_max_model_len,
)
from pdserve.engine.eager_warmup import warm_eager_path
from pdserve.engine.kv_cache.manager import KVCacheManager
from pdserve.engine.kv_cache.tensors import KVCacheLayout, allocate_kv_caches, head_group_views
from pdserve.engine.model.interface import CausalLM
from pdserve.engine.model.loader import inspect_model_dir
from pdserve.engine.model.tiny import ensure_tiny_random
from pdserve.engine.placement import place_model, prepare_attention
from pdserve.engine.remote_prefill import LandingZone, RemotePrefill, StepHooks, between_layers
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.request_checks import check_resume, encode_prompt, stop_status
from pdserve.engine.runner import LaunchedStep, ModelRunner
from pdserve.engine.sampler import Sampler
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.sizing import size_kv_cache
from pdserve.engine.slow_steps import SlowStepWatch
from pdserve.engine.step_plan import SchedulerPlan
from pdserve.engine.step_profile import load_or_measure_step_time
from pdserve.engine.step_time import StepKind, StepTimeModel, StepTimeMonitor
from pdserve.engine.tensor_parallel import TensorParallelModel
from pdserve.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
_LIVE_ENGINES: weakref.WeakSet[LLMEngine] = weakref.WeakSet()


def live_engines() -> list[LLMEngine]:
    """Every engine of this process that has not been garbage-collected (tests check their invariants)."""
    return list(_LIVE_ENGINES)


def resolve_model_dir(model: str) -> Path:
    return ensure_tiny_random() if model == TINY_RANDOM_MODEL else Path(model).expanduser()


class LLMEngine(RemotePrefill):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        model_dir = resolve_model_dir(config.model)
        source = inspect_model_dir(model_dir)
        self.spec = spec = source.spec
        self.tokenizer = Tokenizer.from_dir(Path(config.tokenizer) if config.tokenizer else model_dir)
        self.dtype = resolve_dtype(config.dtype, spec.checkpoint_dtype, self.device)
        self.max_model_len = resolve_max_model_len(config, spec)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ConfigError("max_num_batched_tokens", f"{config.max_num_batched_tokens} is less than "
                              f"max_model_len={self.max_model_len}; without chunked prefill a whole prompt "
                              f"must fit in one step")
        timer = time.perf_counter()
        self.attention_backend = backend = select_backend(config.attention_backend, self.device)
        self.rank_devices = devices = rank_devices(self.device, config.tensor_parallel_size)
        self.model: CausalLM = place_model(source, backend, self.dtype, devices, config, self.max_model_len)
        tensor_parallel = self.model if isinstance(self.model, TensorParallelModel) else None
        self.startup_seconds = {"weights": time.perf_counter() - timer}
        self.eos_token_ids = tuple(dict.fromkeys((*self.tokenizer.eos_token_ids, *spec.eos_token_ids)))
        self.sampler = Sampler(self.device, seed=config.seed)
        self.runner = ModelRunner(self.model, [], config.block_size, self.device, self.sampler, self.eos_token_ids,
                                  max_num_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len,
                                  query_tile_rows=backend.query_tile_rows(spec.head_dim, self.dtype))
        timer = time.perf_counter()
        num_blocks = size_kv_cache(self)
        self.kv_layout = KVCacheLayout(spec.num_layers, num_blocks, config.block_size,
                                       self.model.spec.num_kv_heads, spec.head_dim, self.dtype)  # (a rank's heads)
        self.kv_caches = allocate_kv_caches(self.kv_layout, self.device)
        if tensor_parallel is not None:
            tensor_parallel.attach_kv_caches(self.kv_layout, self.kv_caches)
        self.runner.kv_caches = self.kv_caches
        self.startup_seconds["kv_cache"] = time.perf_counter() - timer
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig.of(config), self.kv)
        if self.device.type == "cuda" and backend.supports_cuda_graphs and not config.enforce_eager:
            self.startup_seconds["cuda_graphs"] = self.runner.capture_cuda_graphs(config.max_num_seqs,
                                                                                  config.graph_max_tokens)
            self.scheduler.use_graph_rows(self.runner.graph_rows)
        self.startup_seconds["attention_plans"] = prepare_attention(
            backend, self.model, self.dtype, devices, min(config.max_num_batched_tokens, self.max_model_len))
        if self.device.type == "cuda" and not config.measures_step_time:
            self.startup_seconds["eager_warmup"] = warm_eager_path(self)  # else the profile's grid compiles them
        self.step_time: StepTimeModel | None = None
        self.step_time_samples: list[dict] = []
        self.step_monitor: StepTimeMonitor | None = None
        if config.needs_step_time_model:
            self._set_up_step_time()
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._held: dict[str, Request] = {}  # prefill_only requests done computing, blocks not yet sent
        self._landing_zones: list[LandingZone] = []
        self._in_flight: LaunchedStep | None = None  # launched, tokens not yet read (async scheduling)
        # called with "is the step done?" while a step's tokens are awaited (the engine loop serves
        # urgent calls there); it must return by the time the step is done, and never step the engine
        self.device_wait_hook: Callable[[Callable[[], bool]], None] | None = None
        # called between layers while a step is launched eagerly (and after a graph replay is queued):
        # the same urgent calls may run there, under the same rule -- they never step the engine and
        # touch no request of the step being launched (its inputs are already packed)
        self.launch_hook: Callable[[], None] | None = None
        self.step_hooks: StepHooks | None = None
        self._slow_steps = SlowStepWatch()
        # steps measured so far and their device seconds, per kind (telemetry)
        self.step_seconds: dict[StepKind, list[float]] = {kind: [0, 0.0] for kind in StepKind}
        _LIVE_ENGINES.add(self)

    # ---- step-time model ---------------------------------------------------------------------

    def _set_up_step_time(self) -> None:
        timer = time.perf_counter()
        self.step_time, self.step_time_samples = load_or_measure_step_time(self)
        self.startup_seconds["step_time_profile"] = time.perf_counter() - timer
        self.scheduler.step_time = self.step_time
        self.step_monitor = StepTimeMonitor(self.step_time)
        logger.info("step-time model: %s", self.step_time)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second at full speed (chunks of the whole token budget); 0 without a model."""
        if self.step_time is None:
            return 0.0
        return self.step_time.prefill_tokens_per_s(self.config.max_num_batched_tokens)

    def spare_prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second this engine can compute now: within its step-time budget given its
        running decodes, or at full speed without a budget (0 without a model). The budget here is the
        TPOT SLO itself, not the slack the running decodes have built up: slack is transient, so the
        router's TTFT estimates should not count on it (at 74d2a19, which advertised it, ``auto`` had a
        TTFT p99 of 1.2 s at its lowest rate, against 0.23 s at 289f95c; one seed each: a hint, not a
        proof)."""
        model, budget_s = self.step_time, self.scheduler.config.step_time_budget_s
        if model is None:
            return 0.0
        decodes = self.scheduler.decode_shape()
        if budget_s is None or decodes.tokens == 0:
            return self.prefill_tokens_per_s
        return model.spare_prefill_tokens_per_s(decodes, budget_s, self.config.max_num_batched_tokens - decodes.tokens,
                                                self.scheduler.config.min_prefill_chunk)

    # ---- requests ------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
        """Validate a prompt (text xor token ids) and return its token ids; raises before any compute."""
        return encode_prompt(self.tokenizer, self.spec.vocab_size, self.max_model_len, prompt, prompt_token_ids)

    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: Sequence[int] | None = None,
                    params: SamplingParams | None = None, *, remote_prefill: bool = False,
                    prefill_only: bool = False, resume_token_ids: Sequence[int] = ()) -> Request:
        """Queue a request. ``resume_token_ids``: output a lost worker already generated (and streamed)
        for it; they follow the prompt, count as output (``max_tokens``, ``min_tokens``, penalties,
        usage), are computed here with the prompt and are not emitted again; a seeded request's
        generator skips the draws they took, so its remaining tokens equal an undisturbed run's."""
        if request_id in self._requests or request_id in self._held:
            raise InvalidParameterError("request_id", f"{request_id!r} is already in use")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError("sampling_params", f"must be SamplingParams, got {type(params).__name__}")
        ids = self.encode_prompt(prompt, prompt_token_ids)
        resumed = check_resume(ids, params, list(resume_token_ids), remote_prefill or prefill_only,
                               self.spec.vocab_size, self.max_model_len)
        request = Request(request_id, ids, params, prompt=prompt, remote_prefill=remote_prefill,
                          prefill_only=prefill_only)
        for token_id in resumed:
            request.append_output_token(token_id)
        if resumed:
            request.first_token_time = None  # its first token (on this worker) is still to come
            if request.logprobs is not None:
                request.logprobs.extend({} for _ in resumed)  # sent by the lost worker
            if params.seed is not None and not params.greedy:
                # one draw per token already sampled: the rest continue the same random sequence
                self.sampler.skip_draws(request_id, params.seed, self.spec.vocab_size, len(resumed))
        self._requests[request_id] = request
        self._detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer, ids + resumed, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output)
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> RequestDelta | None:
        """Stop a request and free its blocks; returns its final delta, or None if it is unknown."""
        if self.release_held_blocks(request_id):
            return None
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        return self._finalize(request, [], None)

    def has_unfinished_requests(self) -> bool:
        """Whether ``step()`` has anything left to do: queued or running requests, or a launched step
        whose tokens some live request still awaits."""
        return self.scheduler.has_unfinished() or self.has_step_in_flight

    @property
    def has_step_in_flight(self) -> bool:
        """A launched step some live request awaits, or whose landing frees a finished request's blocks."""
        step = self._in_flight
        return step is not None and (bool(self.scheduler.deferred_free) or any(
            self._requests.get(c.request.request_id) is c.request for c in step.sampling))

    @property
    def tensor_parallel_size(self) -> int:
        return self.config.tensor_parallel_size

    def transfer_caches(self, head_groups: int = 0) -> list[torch.Tensor]:
        """The caches KV transfer moves, layer-major: per layer ``head_groups`` views of consecutive KV
        heads (0: one per tensor-parallel rank, its whole cache), rank by rank (:mod:`pdserve.engine.
        tensor_parallel`). ``ConfigError`` when the heads do not split that way."""
        model, ranks = self.model, self.tensor_parallel_size
        groups = head_groups or ranks
        if groups % ranks or (groups != ranks and self.spec.num_kv_heads % groups):
            raise ConfigError("kv_transfer.head_groups", f"{groups} groups of KV heads do not fit {ranks} "
                              f"tensor-parallel rank(s) of a model with {self.spec.num_kv_heads} KV heads")
        caches = model.transfer_caches() if isinstance(model, TensorParallelModel) else self.kv_caches
        return [view for cache in caches for view in head_group_views(cache, groups // ranks)]

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    # ---- stepping ------------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """Schedule and launch the next step, then read the tokens of the step launched before it (with
        ``async_scheduling``; otherwise of this one). Returns the deltas of the tokens read.

        With asynchronous scheduling the next step is planned as if every request in flight gets its
        token (it may be an end-of-sequence: that request's extra row is computed and dropped), and its
        inputs take those tokens on the device. Requests whose sampling reads earlier tokens on the
        host (penalties) make the engine read the step in flight first.
        """
        deltas: list[RequestDelta] = []
        if self._in_flight is not None and any(c.request.params.uses_penalties for c in self._in_flight.sampling):
            deltas += self._land(self._in_flight)
            self._in_flight = None
        self.scheduler.in_flight_s = self._in_flight.plan.predicted_s if self._in_flight is not None else 0.0
        plan = self.scheduler.schedule()
        self._note_landing_zones(plan.landing_zones)
        self._slow_steps.launching()
        launched = self._launch(plan) if not plan.is_empty else None
        self._slow_steps.launched(plan, self.runner.host_breakdown_ms,
                                  device_busy=self._in_flight is not None and self._in_flight.running())
        if self._in_flight is not None:
            deltas += self._land(self._in_flight)
            self._slow_steps.landed(self._in_flight.plan)
        self._in_flight = launched
        if launched is not None and not self.config.async_scheduling:
            deltas += self._land(launched)
            self._in_flight = None
        if self._in_flight is None:
            self.scheduler.release_landed(all_landed=True)
        return deltas

    def _launch(self, plan: SchedulerPlan) -> LaunchedStep:
        hooks = self.step_hooks
        self.model.layer_hook = between_layers(hooks.before_forward(plan) if hooks is not None else None,
                                               self.launch_hook)
        try:
            launched = self.runner.launch(plan, timed=True)  # two CUDA events: telemetry and the step model
        finally:
            self.model.layer_hook = None
        self.scheduler.finish_step(plan)
        for chunk in launched.sampling:
            request = chunk.request
            request.expect_token(ends_request=self._next_token_is_last(request))
        return launched

    def _next_token_is_last(self, request: Request) -> bool:
        """Whether the token about to be sampled for ``request`` ends it whatever its value."""
        num_outputs = request.num_output_tokens + request.num_pending_tokens + 1
        return (request.prefill_only or num_outputs >= request.params.max_tokens
                or request.num_tokens + 1 >= self.max_model_len)

    def _land(self, launched: LaunchedStep) -> list[RequestDelta]:
        """Read a launched step's tokens (waits for the device, through ``device_wait_hook`` when set)
        and append them to their requests."""
        if self.device_wait_hook is not None and not launched.is_done():
            self.device_wait_hook(launched.is_done)
        token_ids, logprobs = launched.token_ids(), launched.logprobs()
        seconds = launched.seconds()
        if seconds is not None:
            shape = launched.plan.shape
            totals = self.step_seconds[shape.kind]
            totals[0] += 1
            totals[1] += seconds
            if self.step_monitor is not None and self.step_monitor.record(shape, seconds):
                self.step_time = self.scheduler.step_time = self.step_monitor.model  # recalibrated on live steps
        if self.step_hooks is not None:
            self.step_hooks.after_forward(launched.plan)
        deltas = []
        for chunk, token_id, token_logprobs in zip(launched.sampling, token_ids, logprobs, strict=True):
            request = chunk.request
            request.token_landed()
            if self._requests.get(request.request_id) is not request or request.is_finished:
                continue  # aborted, or ended by an earlier token: this row was computed in vain
            deltas.append(self._append_token(request, token_id, token_logprobs))
        self.scheduler.release_landed()
        return deltas

    def _append_token(self, request: Request, token_id: int, logprobs: TokenLogprobs | None) -> RequestDelta:
        request.append_output_token(token_id)
        if logprobs is not None:
            logprobs = {t: Logprob(lp.logprob, lp.rank, self.tokenizer.token_text(t)) for t, lp in logprobs.items()}
            assert request.logprobs is not None
            request.logprobs.append(logprobs)
        stop_string = self._detokenizers[request.request_id].push([token_id])
        status = stop_status(request, token_id, stop_string, self.eos_token_ids, self.max_model_len)
        if request.prefill_only:
            self.scheduler.finish(request, status or RequestStatus.FINISHED_STOPPED, free_blocks=False)
            self._held[request.request_id] = request
        elif status is not None:
            self.scheduler.finish(request, status)
        return self._finalize(request, [token_id], logprobs)

    # ---- role entry points ---------------------------------------------------------------------

    def fail_request(self, request_id: str, error: str, code: str | None = None) -> RequestDelta | None:
        """End a request with an error (e.g. its KV never arrived; ``code``: the gRPC status code name
        callers should see, e.g. ``UNAVAILABLE`` for a retryable fault); frees its blocks once."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        request.error, request.error_code = error, code
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
        return self._finalize(request, [], None)

    def _finalize(self, request: Request, new_ids: list[int], logprobs: TokenLogprobs | None) -> RequestDelta:
        finished = request.is_finished
        rid = request.request_id
        delta = RequestDelta(
            request_id=rid,
            new_token_ids=new_ids,
            new_text=self._detokenizers[rid].take_delta(finished),
            new_logprobs=None if logprobs is None else [logprobs],
            finished=finished,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            error=request.error,
            error_code=request.error_code,
        )
        if finished:
            self.sampler.release(rid)
            del self._requests[rid]
            del self._detokenizers[rid]
        return delta

    # ---- checks --------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        for request in self.scheduler.running:
            assert self.kv.has_blocks(request.request_id), f"running request {request.request_id} has no blocks"
        for request in self.scheduler.waiting:
            assert not self.kv.has_blocks(request.request_id), f"waiting {request.request_id} holds blocks"
        for request_id in (*self.scheduler.waiting_for_kv, *self._held):
            assert self.kv.has_blocks(request_id), f"{request_id} lost its blocks"
        if not self._requests and not self._held and not self.scheduler.deferred_free:
            self.kv.check_no_leaks()

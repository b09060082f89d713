"""The engine's side of disaggregated serving: landing zones for prompts prefilled elsewhere, their
completion, and the blocks of prefill-only requests kept until they are sent; and the per-step hooks a
role installs (the prefill role streams each layer's KV).

:class:`RemotePrefill` is part of :class:`~pdserve.engine.engine.LLMEngine` (its base class): it works on
the engine's scheduler, block manager, requests and sampler, under the engine's contract -- called on the
engine's thread only. A decode worker's request lives in three places in turn: ``add_request(...,
remote_prefill=True)`` queues it; the scheduler allocates its blocks and :meth:`open_landing_zones` /
:meth:`take_landing_zones` hand them to the role, which starts the transfer; once every byte landed,
:meth:`complete_remote_prefill` makes it decode from the next step (or :meth:`recompute_locally` computes
the prompt here after a failed transfer). A prefill worker's ``prefill_only`` request keeps its blocks
after its last step until :meth:`release_held_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from pdserve.common.outputs import RequestDelta, TokenLogprobs
from pdserve.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from pdserve.engine.kv_cache.manager import KVCacheManager
    from pdserve.engine.model.hf_config import ModelSpec
    from pdserve.engine.sampler import Sampler
    from pdserve.engine.scheduler import Scheduler
    from pdserve.engine.step_plan import SchedulerPlan


@dataclass(frozen=True)
class LandingZone:
    """Blocks allocated for a remote-prefill request's prompt KV; the first ``num_skip_blocks`` were
    already filled from this engine's prefix cache and need not be sent."""

    request_id: str
    prompt_token_ids: list[int]
    block_ids: list[int]
    num_skip_blocks: int


class StepHooks(Protocol):
    def before_forward(self, plan: SchedulerPlan) -> Callable[[int, torch.Tensor], None] | None:
        """Called with each plan about to run; may return a per-layer hook for this step's forward."""
        ...

    def after_forward(self, plan: SchedulerPlan) -> None:
        """Called once the step's forward pass and sampling are done."""
        ...


def between_layers(layer_hook: Callable[[int, torch.Tensor], None] | None,
                   launch_hook: Callable[[], None] | None) -> Callable[[int, torch.Tensor], None] | None:
    """The per-layer hook of one step: the role's (``StepHooks.before_forward``: KV streaming), then the
    engine loop's (``LLMEngine.launch_hook``)."""
    if launch_hook is None:
        return layer_hook

    def hook(index: int, kv_cache: torch.Tensor) -> None:
        if layer_hook is not None:
            layer_hook(index, kv_cache)
        launch_hook()

    return hook


class RemotePrefill:
    """The remote-prefill entry points of :class:`~pdserve.engine.engine.LLMEngine` (see the module)."""

    # the engine's state this part works on (set by LLMEngine.__init__)
    kv: KVCacheManager
    scheduler: Scheduler
    sampler: Sampler
    spec: ModelSpec
    _requests: dict[str, Request]
    _held: dict[str, Request]  # prefill_only requests done computing, blocks not yet sent
    _landing_zones: list[LandingZone]

    if TYPE_CHECKING:
        def _append_token(self, request: Request, token_id: int, logprobs: TokenLogprobs | None) -> RequestDelta:
            ...

    def _note_landing_zones(self, requests: list[Request]) -> None:
        for request in requests:
            block_ids = self.kv.block_ids(request.request_id)
            self._landing_zones.append(LandingZone(request.request_id, request.prompt_token_ids, list(block_ids),
                                                   request.num_computed_tokens // self.kv.block_size))

    def open_landing_zones(self) -> list[LandingZone]:
        """Open the landing zones of waiting remote-prefill requests now, without a step (also while a
        step is on the device: a zone touches no request in it), and return every zone not yet taken."""
        self._note_landing_zones(self.scheduler.open_landing_zones())
        return self.take_landing_zones()

    def take_landing_zones(self) -> list[LandingZone]:
        """Landing zones allocated since the last call (decode role: start their transfers now)."""
        zones, self._landing_zones = self._landing_zones, []
        return zones

    def complete_remote_prefill(self, request_id: str, first_token_id: int,
                                logprobs: TokenLogprobs | None = None) -> RequestDelta | None:
        """The prompt's KV has landed and the prefill worker sampled ``first_token_id``: the request
        decodes from the next step. Seeded requests skip the draw the prefill worker made, so their
        tokens equal a single engine's. Returns the first token's delta (None if the id is unknown)."""
        request = self._requests.get(request_id)
        if request is None or request.status != RequestStatus.WAITING_FOR_KV:
            return None
        self.scheduler.kv_arrived(request)
        if request.params.seed is not None and not request.params.greedy:
            self.sampler.skip_draws(request_id, request.params.seed, self.spec.vocab_size, 1)
        return self._append_token(request, first_token_id, logprobs)

    def recompute_locally(self, request_id: str) -> bool:
        """A remote prefill failed: compute the request's prompt on this engine instead."""
        request = self._requests.get(request_id)
        if request is None or request.status != RequestStatus.WAITING_FOR_KV:
            return False
        self.scheduler.recompute_locally(request)
        return True

    def release_held_blocks(self, request_id: str) -> bool:
        """Free the blocks a finished ``prefill_only`` request kept for sending (exactly once)."""
        request = self._held.pop(request_id, None)
        if request is None:
            return False
        self.kv.free(request)
        return True

    @property
    def num_held_requests(self) -> int:
        return len(self._held)

"""Tensor parallelism inside one model: which slice of each weight a rank holds, and the all-reduce.

Megatron-style: the projections that widen (``q/k/v_proj``, ``gate/up_proj``) are split by output rows
(column-parallel: each rank computes its heads and its share of the MLP), the ones that narrow
(``o_proj``, ``down_proj``) by input columns (row-parallel: each rank's partial sum is all-reduced,
then the bias added once). Attention heads are split evenly; KV heads too when there are at least as
many as ranks, else each rank keeps the one KV head its query heads read (replicated). The embedding
and the LM head are split by vocabulary rows (``vocab_rows``: consecutive ids, the last rank's share
shorter when the vocabulary does not divide): a rank looks up the ids it holds and the ranks' rows are
all-reduced; a rank computes the logits of its ids, and ``gather_vocab`` assembles every rank's into
the full vocabulary (an all-reduce of zero-padded rows: each element has one non-zero term, so it is
exact in any dtype). Norms are replicated.

:class:`TensorParallel` is one rank's view: ``rank``, ``size`` and the process group its all-reduces
run on (gloo on CPU, NCCL on GPUs; ``None`` for one rank). ``local_spec`` is the model shape a rank
builds; ``shard_index(name, shape, spec)`` says where that rank's slice of a checkpoint tensor (Hugging Face names)
lies, which the loader reads alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.common.errors import ConfigError
from pdserve.engine.model.hf_config import ModelSpec
from pdserve.engine.model.layers import Linear, RMSNorm, linear

#: Checkpoint sub-names split by output rows, and those split by input columns (weights only).
COLUMN_PARALLEL = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "mlp.gate_proj.", "mlp.up_proj.")
ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
#: Checkpoint names split by vocabulary rows.
VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None

    def check(self, spec: ModelSpec) -> None:
        """``ConfigError`` unless ``spec`` splits evenly over ``size`` ranks."""
        problems = []
        if spec.num_heads % self.size:
            problems.append(f"{spec.num_heads} attention heads")
        if spec.num_kv_heads % self.size and self.size % spec.num_kv_heads:
            problems.append(f"{spec.num_kv_heads} KV heads (neither a multiple nor a divisor of it)")
        if spec.intermediate_size % self.size:
            problems.append(f"an MLP width of {spec.intermediate_size}")
        if spec.vocab_size < self.size:
            problems.append(f"a vocabulary of {spec.vocab_size}")
        if problems:
            raise ConfigError("tensor_parallel_size", f"{self.size} ranks cannot split {', '.join(problems)}")

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shape of this rank's share of the model."""
        if self.size == 1:
            return spec
        self.check(spec)
        return dataclasses.replace(spec, num_heads=spec.num_heads // self.size,
                                   num_kv_heads=max(1, spec.num_kv_heads // self.size),
                                   intermediate_size=spec.intermediate_size // self.size)

    def kv_heads(self, spec: ModelSpec) -> range:
        """The (full model's) KV heads this rank holds."""
        if spec.num_kv_heads >= self.size:
            per = spec.num_kv_heads // self.size
            return range(self.rank * per, (self.rank + 1) * per)
        index = self.rank * spec.num_kv_heads // self.size
        return range(index, index + 1)

    def vocab_rows(self, vocab_size: int) -> range:
        """The token ids whose embedding and LM-head rows this rank holds."""
        per = -(-vocab_size // self.size)
        return range(min(vocab_size, self.rank * per), min(vocab_size, (self.rank + 1) * per))

    def shard_index(self, name: str, shape: tuple[int, ...], spec: ModelSpec) -> tuple[slice, ...] | None:
        """Where this rank's slice of checkpoint tensor ``name`` (of ``shape``, in the full model ``spec``)
        lies in it, as an index (rows, or all rows and a range of columns); None: the rank holds it whole.
        The loader reads just that slice from the safetensors file."""
        if self.size == 1:
            return None
        if name in VOCAB_PARALLEL:
            rows = self.vocab_rows(spec.vocab_size)
            return (slice(rows.start, rows.stop),)
        if any(part in name for part in ("self_attn.k_proj.", "self_attn.v_proj.")):
            heads = self.kv_heads(spec)
            return (slice(heads.start * spec.head_dim, heads.stop * spec.head_dim),)
        if any(part in name for part in COLUMN_PARALLEL):
            return (self._share(shape[0]),)
        if any(name.endswith(part) for part in ROW_PARALLEL):
            return (slice(None), self._share(shape[1]))
        return None

    def _share(self, extent: int) -> slice:
        """This rank's part of ``extent`` split in ``size`` (as ``torch.chunk`` splits it)."""
        per = -(-extent // self.size)
        return slice(min(extent, self.rank * per), min(extent, (self.rank + 1) * per))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.size > 1:
            self.group.allreduce([tensor]).wait()
        return tensor

    def reduce_norm(self, norm: RMSNorm, partial: torch.Tensor, residual: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm(sum of partial over the ranks, residual)``: in one kernel with the group's fused
        all-reduce + RMSNorm when it has one and the rows fit it (in place), else all-reduce then norm."""
        fused = getattr(self.group, "allreduce_rmsnorm", None)
        if fused is not None and norm.fused and fused(partial, residual, norm.weight, norm.eps):
            return partial, residual
        return norm(self.all_reduce(partial), residual)

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's columns of ``local`` (``[rows, len(vocab_rows)]``) as ``[rows, vocab_size]``."""
        if self.size == 1:
            return local
        full = local.new_zeros(local.shape[0], vocab_size)
        rows = self.vocab_rows(vocab_size)
        full[:, rows.start:rows.stop] = local
        return self.all_reduce(full)


SINGLE = TensorParallel()


class VocabParallelEmbedding(nn.Embedding):
    """``nn.Embedding`` over this rank's vocabulary rows: ids outside them give zeros here, and the
    ranks' lookups are summed. With one rank it is ``nn.Embedding``."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        self.rows = tp.vocab_rows(vocab_size)
        super().__init__(len(self.rows), hidden_size)
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.rows.start
        held = (local >= 0) & (local < len(self.rows))
        out = F.embedding(local.clamp(0, len(self.rows) - 1), self.weight) * held.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class RowParallelLinear(Linear):
    """:class:`~pdserve.engine.model.layers.Linear` whose input is split over the ranks: partial products are
    all-reduced, then the bias is added once. With one rank it is ``Linear``.

    Without a bias the all-reduce is deferred (``defers_reduce``): ``forward`` returns this rank's partial
    product, and the residual-add RMSNorm that always follows it sums it (:meth:`norm_output`), so that
    on GPUs one kernel can do both (:meth:`TensorParallel.reduce_norm`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp
        self.defers_reduce = tp.size > 1 and not bias

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x, gated)
        out = linear(x, self.weight, None, self.fused, gated)
        if self.defers_reduce:
            return out  # a partial sum: see norm_output
        out = self.tp.all_reduce(out)
        return out if self.bias is None else out + self.bias

    def norm_output(self, norm: RMSNorm, output: torch.Tensor, residual: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm(output, residual)`` for this projection's ``output``, summing it over the ranks first
        when :attr:`defers_reduce`."""
        if self.defers_reduce:
            return self.tp.reduce_norm(norm, output, residual)
        return norm(output, residual)

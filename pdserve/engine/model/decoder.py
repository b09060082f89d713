"""The decoder-only transformer every supported family shares (Llama, Mistral, Qwen2, Qwen3).

Families differ only in flags of :class:`ModelSpec` (QKV bias, q/k norm, sliding window, tied
embeddings, RoPE type); their adapters (``llama.py``, ``qwen.py``) set those flags from the config.

Projections are fused for speed: ``qkv_proj`` holds q, k and v stacked along the output dimension,
``gate_up_proj`` holds gate and up. :meth:`DecoderForCausalLM.load_weights` maps a checkpoint's
separate ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` tensors into those shards.

With tensor parallelism (:mod:`~pdserve.engine.model.parallel`) a rank builds its share: ``spec`` is
then that share's shape (``full_spec`` the model's), ``o_proj``/``down_proj`` all-reduce, and
:meth:`load_weights` cuts each checkpoint tensor to the rank's slice.

The forward pass takes a packed batch (all sequences' new tokens back to back, no padding), their
absolute positions, one KV cache tensor per layer and the step's :class:`AttentionMetadata`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pdserve.common.errors import ModelLoadError
from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.model.hf_config import ModelSpec
from pdserve.engine.model.layers import Linear, RMSNorm, RotaryEmbedding, linear
from pdserve.engine.model.parallel import SINGLE, RowParallelLinear, TensorParallel, VocabParallelEmbedding


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, backend: AttentionBackend, o_proj_bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.spec = spec
        self.backend = backend
        self.qkv_proj = Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.attention_bias)
        self.o_proj = RowParallelLinear(spec.q_size, spec.hidden_size, o_proj_bias, tp)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.scale = spec.head_dim**-0.5

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        spec = self.spec
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = q.view(-1, spec.num_heads, spec.head_dim)
        k = k.view(-1, spec.num_kv_heads, spec.head_dim)
        v = v.view(-1, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.backend.rope_write_attend(q, k, v, positions, rotary, kv_cache, metadata, scale=self.scale,
                                             sliding_window=spec.sliding_window)
        return self.o_proj(out.reshape(-1, spec.q_size))


class GatedMLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallel) -> None:
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), gated=True)  # silu(gate) * up, then down_proj


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, backend: AttentionBackend, o_proj_bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, backend, o_proj_bias, tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec, tp)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                rotary: RotaryEmbedding, kv_cache: torch.Tensor, metadata: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(MLP output, residual stream)``; with several ranks the MLP output may be this rank's partial
        sum (its ``down_proj`` defers the all-reduce to the norm that follows: the next layer's input norm,
        or the model's final one)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.mlp.down_proj.norm_output(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, kv_cache, metadata)
        hidden, residual = self.self_attn.o_proj.norm_output(self.post_attention_layernorm, hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, backend: AttentionBackend, o_proj_bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(spec, backend, o_proj_bias, tp) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """A causal LM over a packed batch. Subclasses (the families) provide :meth:`spec_from_config`."""

    o_proj_bias_follows_attention_bias = True
    """Llama puts ``attention_bias`` on all four projections; Qwen2 on q/k/v only."""

    def __init__(self, spec: ModelSpec, backend: AttentionBackend, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.full_spec = spec
        self.tp = tp
        self.spec = spec = tp.local_spec(spec)  # this rank's heads and MLP width (all of them with one rank)
        o_bias = spec.attention_bias and self.o_proj_bias_follows_attention_bias
        self.model = DecoderModel(spec, backend, o_bias, tp)
        self.lm_head = None if spec.tie_word_embeddings else Linear(
            spec.hidden_size, len(tp.vocab_rows(spec.vocab_size)), bias=False)  # this rank's vocabulary rows
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim)
        self.fused = False  # see use_fused_kernels
        self.layer_hook: Callable[[int, torch.Tensor], None] | None = None
        """Called as ``hook(layer_index, kv_cache)`` after each layer wrote its KV (KV streaming)."""

    @classmethod
    def spec_from_config(cls, config: dict, source: str) -> ModelSpec:
        raise NotImplementedError

    def use_fused_kernels(self) -> None:
        """Switch norms, the MLP activation and single-row products to the Triton kernels (GPU path)."""
        self.fused = True
        for module in self.modules():
            if isinstance(module, RMSNorm | Linear):
                module.fused = True

    def build_rotary(self, max_positions: int) -> None:
        """(Re)build derived tables on the model's device; call after the weights are in place."""
        self.rotary.build(max_positions, self.model.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        """Return the final hidden states ``[num_tokens, hidden_size]`` (normalised)."""
        hidden = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        hook = self.layer_hook
        for index, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            hidden, residual = layer(positions, hidden, residual, self.rotary, kv_cache, metadata)
            if hook is not None:
                hook(index, kv_cache)
        last = self.model.layers[-1]
        assert isinstance(last, DecoderLayer) and residual is not None
        hidden, _ = last.mlp.down_proj.norm_output(self.model.norm, hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[rows, vocab_size]`` for the given final hidden states (with several ranks,
        every rank calls this at once: each computes its vocabulary rows, and all get every row)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.tp.gather_vocab(linear(hidden, weight, None, self.fused), self.spec.vocab_size).float()

    # ---- weights -------------------------------------------------------------------------------

    def _shard_rules(self) -> dict[str, tuple[str, int, int]]:
        """Checkpoint sub-name -> (our parameter sub-name, row offset, rows) for fused projections."""
        s = self.spec
        return {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, s.q_size),
            "self_attn.k_proj": ("self_attn.qkv_proj", s.q_size, s.kv_size),
            "self_attn.v_proj": ("self_attn.qkv_proj", s.q_size + s.kv_size, s.kv_size),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, s.intermediate_size),
            "mlp.up_proj": ("mlp.gate_up_proj", s.intermediate_size, s.intermediate_size),
        }

    def checkpoint_slice(self, name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        """The part of checkpoint tensor ``name`` (of ``shape``) this rank holds (None: all of it); the
        loader reads only that part."""
        return self.tp.shard_index(name, shape, self.full_spec)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy checkpoint tensors (Hugging Face names, each already cut to :meth:`checkpoint_slice`) into
        the parameters; every parameter row must be written exactly once, or :class:`ModelLoadError` names
        what is missing or mismatched."""
        params = dict(self.named_parameters())
        rows_loaded: dict[str, int] = dict.fromkeys(params, 0)
        rules = self._shard_rules()
        ignored: list[str] = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.lm_head is None and name == "lm_head.weight"):
                continue
            target, offset, rows = name, 0, None
            for ckpt_part, (our_part, row_offset, num_rows) in rules.items():
                if f".{ckpt_part}." in name:
                    target = name.replace(ckpt_part, our_part)
                    offset, rows = row_offset, num_rows
                    break
            param = params.get(target)
            if param is None:
                ignored.append(name)
                continue
            dest = param.data if rows is None else param.data.narrow(0, offset, rows)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, the config "
                                     f"implies {tuple(dest.shape)}")
            dest.copy_(tensor)
            rows_loaded[target] += dest.shape[0] if dest.dim() else 1
        missing = [n for n, p in params.items() if rows_loaded[n] != (p.shape[0] if p.dim() else 1)]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelLoadError(f"{source}: the checkpoint lacks {len(missing)} weight(s) this architecture "
                                 f"needs: {shown}")
        if ignored:
            shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
            raise ModelLoadError(f"{source}: the checkpoint holds {len(ignored)} weight(s) this architecture "
                                 f"does not use: {shown} (is 'architectures' in config.json right?)")

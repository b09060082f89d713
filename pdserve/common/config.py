"""Engine configuration: one frozen dataclass, validated once on construction.

Torch-free on purpose: the CLI, the cluster config loader and the router validate engine settings on
machines that have no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pdserve.common.errors import ConfigError, InvalidParameterError
from pdserve.common.validation import ValidatedConfig, require_float, require_int

TINY_RANDOM_MODEL = "tiny-random"
"""Name of the built-in model: a tiny Llama with deterministic random weights and a byte tokenizer."""
MAX_POOL_REPLICAS = 1024
"""The most workers one pool may hold (a cluster file's ``replicas``, ``ScalePool`` / ``pdserve scale``)."""
DEFAULT_GRAPH_MAX_TOKENS = 1024
"""The largest step a one-GPU engine replays from a CUDA graph by default (``cuda_graph_max_tokens``)."""

LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")


@dataclass(frozen=True)
class EngineConfig(ValidatedConfig):
    """Settings of one engine (one worker's model executor).

    ``model`` is a local Hugging Face directory or ``"tiny-random"``. ``load_format="dummy"`` builds the
    architecture with random weights (benchmarks). ``dtype="auto"`` takes the checkpoint's dtype on a
    GPU and float32 on the CPU. ``max_model_len=None`` takes the model's ``max_position_embeddings``.
    ``max_num_batched_tokens`` is the per-step token budget shared by prefill chunks and decodes.
    The KV cache gets ``num_kv_blocks`` blocks when given; otherwise ``gpu_memory_utilization`` of the
    GPU's memory (minus weights and activations), or ``cpu_kv_cache_gib`` GiB on the CPU.
    On CUDA every step of up to ``cuda_graph_max_tokens`` tokens (decode, prefill or mixed) replays a
    CUDA graph captured at start-up (``enforce_eager`` turns graphs off); larger steps keep the GPU busy
    longer than their launches take, and run eagerly, where fresh prompts use torch's faster attention.
    ``None`` (the default) resolves to :attr:`graph_max_tokens`: 1024 with one rank; with more, every step
    up to ``max_num_batched_tokens`` (at most 8192), since the ranks' threads launch eagerly under one
    interpreter (on 2xH200 a 2k-token prefill at TP=2 took 78.6 ms eagerly, 31.2 ms from graphs). ``async_scheduling`` prepares
    and launches step N+1 before the host reads step N's tokens, so host work overlaps the GPU (as
    vLLM's option of the same name); outputs are the same either way.

    ``tensor_parallel_size`` splits the model over that many ranks in this process (one thread each,
    all-reduce over gloo on the CPU, NCCL on GPUs: rank r on the r-th GPU from ``device``;
    :mod:`pdserve.engine.tensor_parallel`). With more than one GPU rank, every rank captures its own CUDA graphs.
    ``peer_all_reduce_max_bytes`` > 0 sends GPU all-reduces up to that size through a one-shot kernel that
    reads the other ranks' buffers directly (NVLink peers; :mod:`pdserve.engine.peer_all_reduce`) instead
    of NCCL; 0 (the default until it is measured on two GPUs) keeps NCCL for every size. With it,
    ``peer_all_reduce_fuse_norm`` (default true; false for A/B runs) also fuses each row-parallel
    projection's all-reduce with the residual add and RMSNorm that follow (one kernel, same bits).

    SLO-aware scheduling: ``step_time_budget_ms`` caps the predicted time of a step that carries
    decodes (prefill chunks are cut to fit: the TPOT SLO, or more for requests ahead of it; with
    ``step_budget_borrow_tokens`` B > 0 a step may also borrow from up to B later tokens of every
    decoding request (those it can be counted on for), which each pay back a fifth of the SLO, at most
    six SLOs a step; with ``step_budget_window`` W > 0 a step may also take what keeps the mean of the
    last W steps within it, and with ``defer_chunks_below`` N a chunk cut below N tokens waits for a
    longer step instead, on workers with both SLOs);
    ``ttft_slo_ms`` admits prompts earliest
    deadline first, after those that can still meet it. Both use a step-time model, measured at start-up
    or read from ``step_time_profile`` (a JSON file written by ``pdserve.engine.step_time``).
    """

    model: str = TINY_RANDOM_MODEL
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.90
    num_kv_blocks: int | None = None
    cpu_kv_cache_gib: float = 1.0
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    cuda_graph_max_tokens: int | None = None
    async_scheduling: bool = True
    step_time_budget_ms: float | None = None
    ttft_slo_ms: float | None = None
    step_budget_window: int = 0
    step_budget_borrow_tokens: int = 0
    defer_chunks_below: int = 0
    step_time_profile: str | None = None
    tensor_parallel_size: int = 1
    peer_all_reduce_max_bytes: int = 0
    peer_all_reduce_fuse_norm: bool = True

    def _validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidParameterError("model", "must name a local model directory or 'tiny-random'")
        _require_choice("load_format", self.load_format, LOAD_FORMATS)
        _require_choice("dtype", self.dtype, DTYPES)
        _require_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise InvalidParameterError("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_model_len is not None:
            require_int("max_model_len", self.max_model_len, minimum=2)
        require_int("block_size", self.block_size, minimum=1, maximum=1024)
        if self.block_size & (self.block_size - 1):
            raise InvalidParameterError("block_size", f"must be a power of two, got {self.block_size}")
        require_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        require_int("max_num_seqs", self.max_num_seqs, minimum=1)
        require_float("gpu_memory_utilization", self.gpu_memory_utilization, minimum=0.0, maximum=1.0,
                      exclusive_minimum=True)
        if self.num_kv_blocks is not None:
            require_int("num_kv_blocks", self.num_kv_blocks, minimum=2)
        require_float("cpu_kv_cache_gib", self.cpu_kv_cache_gib, minimum=0.0, exclusive_minimum=True)
        require_int("seed", self.seed, minimum=0)
        if self.cuda_graph_max_tokens is not None:
            require_int("cuda_graph_max_tokens", self.cuda_graph_max_tokens, minimum=0, maximum=65536)
        require_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1, maximum=64)
        require_int("peer_all_reduce_max_bytes", self.peer_all_reduce_max_bytes, minimum=0, maximum=64 << 20)
        require_int("step_budget_window", self.step_budget_window, minimum=0, maximum=4096)
        require_int("step_budget_borrow_tokens", self.step_budget_borrow_tokens, minimum=0, maximum=1 << 20)
        require_int("defer_chunks_below", self.defer_chunks_below, minimum=0)
        if self.defer_chunks_below and self.step_budget_window <= 1:
            raise InvalidParameterError("defer_chunks_below", "defers chunks to a window of steps: set "
                                        "step_budget_window (> 1) as well, or leave it 0")
        for name in ("step_time_budget_ms", "ttft_slo_ms"):
            if getattr(self, name) is not None:
                require_float(name, getattr(self, name), minimum=0.0, exclusive_minimum=True)
        if self.step_time_profile is not None and (not isinstance(self.step_time_profile, str)
                                                   or not self.step_time_profile):
            raise InvalidParameterError("step_time_profile", "must be the path of a step-time profile (JSON)")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "async_scheduling",
                     "peer_all_reduce_fuse_norm"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(name, f"must be true or false, got {getattr(self, name)!r}")

    @property
    def graph_max_tokens(self) -> int:
        """The largest step replayed from a CUDA graph (``cuda_graph_max_tokens`` resolved)."""
        if self.cuda_graph_max_tokens is not None:
            return self.cuda_graph_max_tokens
        return DEFAULT_GRAPH_MAX_TOKENS if self.tensor_parallel_size == 1 else min(self.max_num_batched_tokens, 8192)

    @property
    def needs_step_time_model(self) -> bool:
        return (self.step_time_budget_ms is not None or self.ttft_slo_ms is not None
                or self.step_time_profile is not None)

    @property
    def measures_step_time(self) -> bool:
        """Whether start-up times the step-time profile's grid: a model is needed and no file gives it."""
        return self.needs_step_time_model and self.step_time_profile is None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None, prefix: str = "") -> EngineConfig:
        """Build from a mapping (a YAML section), rejecting unknown keys with the key's dotted path."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{prefix}{key}", f"unknown engine setting; known: {', '.join(sorted(known))}",
                                  source)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc.key}", exc.message, source) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidParameterError(field, f"must be one of {', '.join(choices)}; got {value!r}")

"""Build a model from a local Hugging Face directory: real safetensors weights, or random ("dummy").

The model is created on the meta device (no memory, no init cost), materialised directly on the
target device in the target dtype, then filled from the checkpoint tensor by tensor, so peak host memory
stays near one tensor rather than the whole model; a tensor-parallel rank reads only its slice of each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.common.errors import ModelLoadError
from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.model.hf_config import ModelSpec, architecture_of, read_config_json
from pdserve.engine.model.parallel import SINGLE, TensorParallel
from pdserve.engine.model.registry import model_class_for

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model directory and its parsed spec (what the engine needs before allocating)."""

    directory: Path
    spec: ModelSpec
    model_class: type[DecoderForCausalLM]


def inspect_model_dir(directory: Path) -> ModelSource:
    config = read_config_json(directory)
    source = str(directory / "config.json")
    cls = model_class_for(architecture_of(config, source), source)
    return ModelSource(directory, cls.spec_from_config(config, source), cls)


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files: from the index when there is one, else ``model.safetensors``."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: expected a JSON object with a 'weight_map' ({exc})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: names shard {f.name!r}, which is missing from {directory}")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    hint = " (*.bin checkpoints are not supported: convert them to safetensors)" if any(
        directory.glob("*.bin")) else ""
    raise ModelLoadError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file{hint}")


def iter_checkpoint(files: list[Path], select: Callable[[str, tuple[int, ...]], tuple[slice, ...] | None]
                    = lambda name, shape: None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint ``files``, each cut to ``select(name, shape)`` as it is read (a
    tensor-parallel rank's slice: only those bytes are read from the file; None: the whole tensor)."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    part = f.get_slice(name)
                    index = select(name, tuple(part.get_shape()))
                    yield name, f.get_tensor(name) if index is None else part[index]
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from None


def build_model(source: ModelSource, *, backend: AttentionBackend, dtype: torch.dtype, device: torch.device,
                load_format: str, max_positions: int, seed: int = 0, tp: TensorParallel = SINGLE) -> DecoderForCausalLM:
    """Materialise the model (``tp``: this rank's share of it) on ``device`` in ``dtype`` with real
    (``auto``) or random (``dummy``) weights."""
    with torch.device("meta"):
        model = source.model_class(source.spec, backend, tp)
    model = model.to_empty(device=device).to(dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        model.load_weights(iter_checkpoint(safetensors_files(source.directory), model.checkpoint_slice),
                           str(source.directory))
    model.build_rotary(max_positions)
    if backend.fused_layers:
        model.use_fused_kernels()
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: DecoderForCausalLM, seed: int) -> None:
    """Random weights of realistic scale: norms at 1, matrices ~N(0, 0.02), biases small."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.normal_(0.0, 0.01, generator=generator)
        else:
            param.normal_(0.0, 0.02, generator=generator)

"""The step-input buffers of a tensor-parallel rank past the first, kept on that rank's own GPU.

A CUDA graph captured on rank r's GPU reads its inputs from fixed addresses on that GPU, so each rank
past the first keeps a copy of every buffer of :class:`~pdserve.engine.step_inputs.StepInputs` (same
shapes, same layout). :class:`StepInputs` writes each step's inputs into every copy -- the same
host-to-device copies as for rank 0's buffers, and the ids the previous step sampled (on rank 0's GPU)
copied over to each rank -- on the rank GPU's current stream of the engine thread, the stream its graphs
are replayed on, so a replay reads finished inputs without any wait on the host.

Lifecycle: created once, when the engine captures graphs for a tensor-parallel model
(``StepInputs.add_rank``); lives as long as the engine. ``view_of`` and ``metadata`` give rank r the
views of its copy that correspond to views of rank 0's buffers (what the captured graph will read).
"""

from __future__ import annotations

import torch

from pdserve.engine.attention.metadata import AttentionMetadata


class RankInputs:
    def __init__(self, buffers: dict[str, torch.Tensor], device: torch.device) -> None:
        self.device = device
        self._source = buffers  # rank 0's device buffers
        self.dev = {key: torch.zeros_like(buffer, device=device) for key, buffer in buffers.items()}

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` -- a view of one of rank 0's buffers -- as the same view of this rank's copy.
        ``ValueError`` for a tensor that is not such a view."""
        storage = tensor.untyped_storage().data_ptr()
        for key, buffer in self._source.items():
            if buffer.untyped_storage().data_ptr() == storage:
                return self.dev[key].as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is not a view of a step-input buffer")

    def metadata(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """``metadata`` (over rank 0's buffers) with every tensor replaced by its view on this rank."""
        return metadata.map_tensors(self.view_of)

    def feed(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Write ``token_ids`` (on rank 0's GPU) into rows ``rows`` of this rank's input ids."""
        self.dev["input_ids"].index_copy_(0, rows.to(self.device), token_ids.to(self.device))

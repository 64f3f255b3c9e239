"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023).

Imported only when ``neftune_alpha > 0`` (it imports torch).

Each embedding vector of a training forward pass gets noise drawn uniformly from
``[-m, m]`` with ``m = alpha / sqrt(L * d)``: ``d`` is the embedding width and ``L``
the length of the example the token belongs to. That ``L`` follows the NEFTune
authors' code (per example, padding excluded, no noise on padding). In packed rows
each document is its own example: its length is read from ``position_ids``, which
restart at 0 at every document. Without batch information (a forward outside
``loss``), ``L`` is the row length, which is what Hugging Face's Trainer and
LLaMA-Factory use for every row; the two agree on unpadded, unpacked batches.
In eval mode the hook does nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch


def example_lengths(shape: tuple[int, int], position_ids: Optional[torch.Tensor] = None,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per token, the number of real tokens in its example (0 on padding); shape (batch, seq).

    Examples are the documents of a packed row (a new one starts wherever
    ``position_ids`` is 0), or the whole row without ``position_ids``; padding is
    where a 2-D ``attention_mask`` is 0.
    """
    batch, seq = shape
    device = position_ids.device if position_ids is not None else (
        attention_mask.device if attention_mask is not None else None)
    real = torch.ones(shape, dtype=torch.long, device=device)
    if attention_mask is not None and attention_mask.dim() == 2:
        real = (attention_mask != 0).long()
    if position_ids is None:
        return real * real.sum(dim=1, keepdim=True)
    position_ids = position_ids.expand(batch, seq)
    starts = (position_ids == 0).long()
    starts[:, 0] = 1  # a row always opens an example, even mid-document
    example = starts.cumsum(dim=1) - 1  # 0-based example index within the row
    counts = torch.zeros(shape, dtype=torch.long, device=real.device).scatter_add_(1, example, real)
    return counts.gather(1, example) * real


class NEFTuneNoise:
    """A forward hook for the input-embedding module; ``for_batch`` tells it the example lengths."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self._lengths: Optional[torch.Tensor] = None

    def attach(self, embedding: torch.nn.Module) -> Any:
        return embedding.register_forward_hook(self)

    @contextmanager
    def for_batch(self, batch: dict[str, Any]) -> Iterator[None]:
        """Use this batch's example lengths for the forward passes inside the block."""
        input_ids = batch.get("input_ids")
        if input_ids is None:
            yield
            return
        self._lengths = example_lengths(tuple(input_ids.shape), batch.get("position_ids"),
                                        batch.get("attention_mask"))
        try:
            yield
        finally:
            self._lengths = None

    def magnitude(self, embeds: torch.Tensor) -> torch.Tensor:
        """``alpha / sqrt(L * d)`` per token, shape (batch, seq, 1); 0 on padding."""
        batch, seq, width = embeds.shape
        lengths = self._lengths
        if lengths is None or tuple(lengths.shape) != (batch, seq):
            lengths = torch.full((batch, seq), seq, device=embeds.device)
        lengths = lengths.to(device=embeds.device, dtype=torch.float32)
        scale = self.alpha / torch.sqrt(lengths.clamp(min=1) * width)
        return torch.where(lengths > 0, scale, torch.zeros_like(scale)).unsqueeze(-1)

    def __call__(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.alpha <= 0:
            return output
        magnitude = self.magnitude(output).to(output.dtype)
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * magnitude

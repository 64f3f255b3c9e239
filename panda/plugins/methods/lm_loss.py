"""Next-token cross entropy summed in fp32, without a full-vocabulary fp32 copy of the logits.

Imported only when a language-modelling method computes a loss (it imports torch).

Labels are *not* shifted: ``logits[:, t]`` predicts ``labels[:, t + 1]``, and
``-100`` marks positions without loss. So ``labels[:, 0]`` is never a target, and
the number of targets is the count of ``labels[:, 1:] != -100``.

Memory: a model returns logits of shape (batch, seq, vocab) in its compute dtype
(bf16 under autocast). Upcasting them all to fp32 for the loss, and letting
autograd keep log-softmax's fp32 output for backward, would cost two more fp32
copies of that tensor (2 x 4 bytes x 128k vocab x 8k tokens = 8 GiB for a Llama-3
micro-batch). Instead the loss walks the flattened logits in chunks of about
``CHUNK_ELEMENTS`` values: each chunk is upcast, reduced, and wrapped in a
non-reentrant activation checkpoint, so backward recomputes one fp32 chunk at
a time and only the model's own logits stay alive. (Avoiding even those would
mean fusing the LM head into the loss, which needs a hook into each
architecture; the data that flows through DDP/FSDP wrappers stays as is here.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # ~32M logits per chunk: 128 MiB in fp32


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[:, t] = labels[:, t + 1]``; the last position gets no target."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions that carry loss (a 0-dim int64 tensor on the labels' device)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                       chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token cross entropy in fp32, number of target tokens).

    ``logits``: (batch, seq, vocab) in any float dtype; ``labels``: (batch, seq),
    unshifted, ``-100`` = no loss.
    """
    vocab = logits.size(-1)
    flat_logits = logits.reshape(-1, vocab)  # a view: logits are contiguous
    flat_targets = next_token_targets(labels).reshape(-1)
    rows_per_chunk = max(1, chunk_elements // vocab)
    # Checkpointing only pays when backward will run through the logits.
    recompute = torch.is_grad_enabled() and logits.requires_grad
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, flat_logits.size(0), rows_per_chunk):
        chunk = flat_logits[start:start + rows_per_chunk]
        targets = flat_targets[start:start + rows_per_chunk]
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, chunk, targets, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(chunk, targets)
    return total, count_targets(labels)

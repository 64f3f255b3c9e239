"""Log-probabilities of the labelled tokens of each row, without fp32 copies of the logits.

Imported only when a preference method computes a loss (it imports torch).

Labels are *not* shifted (the batch contract): ``logits[:, t]`` predicts
``labels[:, t + 1]``, and ``-100`` marks tokens without loss. ``row_logps``
returns, per row, the *sum* of ``log p(labels[t + 1] | tokens <= t)`` over the
labelled tokens and their count; each method decides whether to average.

Memory, as in :mod:`panda.plugins.methods.lm_loss`: ``log_softmax(logits.float())``
would keep fp32 copies of the (2B, T, V) logits for backward. Here the logits are
walked in chunks; while an fp32 chunk is at hand its gradient ``onehot - softmax``
is written into one buffer of the logits' dtype, and backward only scales that
buffer's rows in place by the incoming per-token gradient. A reference forward
(no grad) allocates no buffer at all.

The saved gradient is scaled in place, so a graph holding these log-probs can be
backpropagated once (a second ``backward`` raises instead of reusing it).
"""

from __future__ import annotations

import torch

from panda.plugins.methods.lm_loss import (CHUNK_ELEMENTS, IGNORE_INDEX, chunked_token_logps,
                                           next_token_targets)


def token_logps(logits: torch.Tensor, labels: torch.Tensor,
                chunk_elements: int = CHUNK_ELEMENTS, head: torch.Tensor | None = None
                ) -> torch.Tensor:
    """(rows, seq) fp32 log-probs: entry ``t`` is ``log p(labels[:, t + 1])``, 0 where unlabelled.

    ``logits``: (rows, seq, vocab) in any float dtype (or, with a frozen ``head``, the
    (rows, seq, hidden) final states); ``labels``: (rows, seq), unshifted.
    """
    rows, seq, width = logits.shape
    targets = next_token_targets(labels).reshape(-1)
    return chunked_token_logps(logits.reshape(-1, width), targets, chunk_elements,
                               head).view(rows, seq)


def row_logps(logits: torch.Tensor, labels: torch.Tensor,
              chunk_elements: int = CHUNK_ELEMENTS, head: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row sum of labelled tokens' log-probs in fp32, per-row count of those tokens)."""
    per_token = token_logps(logits, labels, chunk_elements, head)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    return per_token.sum(dim=1), counts


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """[rows, seq] bool: the positions whose logits predict a labelled token."""
    return next_token_targets(labels) != IGNORE_INDEX


def kept_row_logps(logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor,
                   chunk_elements: int = CHUNK_ELEMENTS, head: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_logps`` from the logits of the ``kept`` positions only ([N, vocab], row-major,
    N = kept.sum()), as ``model(..., logits_to_keep=kept)`` returns them (or their final
    states, [N, hidden], with a frozen ``head``)."""
    targets = next_token_targets(labels)[kept]
    per_token = chunked_token_logps(logits, targets, chunk_elements, head)
    row_of_token = kept.nonzero()[:, 0]
    sums = torch.zeros(kept.size(0), dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, row_of_token, per_token), kept.sum(dim=1)

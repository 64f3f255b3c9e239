"""Next-token cross entropy summed in fp32, without full-vocabulary fp32 copies of the logits.

Imported only when a language-modelling method computes a loss (it imports torch).

Labels are *not* shifted: ``logits[:, t]`` predicts ``labels[:, t + 1]``, and
``-100`` marks positions without loss. So ``labels[:, 0]`` is never a target, and
the number of targets is the count of ``labels[:, 1:] != -100``.

Memory: a model returns logits of shape (batch, seq, vocab) in its compute dtype
(bf16 under autocast). ``F.cross_entropy(logits.float(), ...)`` then costs about
three fp32 copies of that tensor at its peak (the upcast, log-softmax's saved
output, its gradient): 11.7 GiB on top of the 2 GiB of bf16 logits for a Llama-3
vocabulary and 8k tokens, measured on an H100. Here the loss walks the logits in
chunks of about ``CHUNK_ELEMENTS`` values and, while the fp32 chunk is at hand,
also writes its gradient ``softmax - onehot`` into one buffer of the logits'
dtype; backward only scales that buffer in place. Measured on one H100 (bf16
logits, 8192 tokens, vocabulary 128256, forward + backward): 2.3 GiB extra and
15.7 ms here, against 11.7 GiB and 19.9 ms for the plain loss, since it makes
3 passes over the logits instead of about 6. The extra memory is that one
buffer (half an fp32 copy for bf16 logits) plus one fp32 chunk. fp16 logits get
an fp32 buffer, because fp16 cannot hold the small probabilities before the loss
scale multiplies them. Not materialising the logits at all is possible where the LM
head is frozen: see the folded head below.

One kernel, ``ChunkedTokenLogProbs``, serves both this loss (minus the sum of the
targets' log-probs) and the preference methods' per-row log-probs
(:mod:`panda.plugins.methods.token_logps`).

With a frozen LM head (LoRA, QLoRA, a reference forward) the kernel can also take the
final hidden states and the head's weight instead of logits
(:mod:`panda.plugins.methods.lm_head`): each chunk's logits are projected, used and
dropped, and the saved gradient is the hidden states' ``(softmax - onehot) @ W``, a
(tokens, hidden) tensor instead of a (tokens, vocab) one. The FLOPs are the plain
head's (its input-gradient matmul moves from backward into forward); the (tokens,
vocab) logits and their gradient never exist.

The saved gradient is scaled in place, so a graph holding this loss can be
backpropagated once (a second ``backward`` raises instead of silently reusing it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # ~32M logits per chunk: 128 MiB in fp32


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[:, t] = labels[:, t + 1]``; the last position gets no target."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions that carry loss (a 0-dim int64 tensor on the labels' device)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 cannot hold the small probabilities before the loss scale multiplies them.
    return torch.float32 if dtype == torch.float16 else dtype


class ChunkedTokenLogProbs(torch.autograd.Function):
    """``log softmax(logits)[target]`` per row of 2-D logits (0 where the target is -100)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int,
                want_grad: bool, head: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs``: [N, vocab] logits, or with ``head`` ([vocab, hidden], frozen) the
        [N, hidden] states whose logits are ``inputs @ head.T`` (autocast applies)."""
        if head is not None and head.requires_grad:
            raise ValueError("the folded LM head must be frozen: its gradient is not computed")
        compute_dtype = torch.promote_types(inputs.dtype, torch.float32)  # fp64 stays fp64
        grad = (torch.empty(inputs.shape, dtype=_gradient_dtype(inputs.dtype),
                            device=inputs.device) if want_grad else None)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)  # -100 -> class 0, masked
        picked_all = torch.empty(inputs.size(0), dtype=compute_dtype, device=inputs.device)
        for start in range(0, inputs.size(0), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            logits = inputs[rows] if head is None else _project(inputs[rows], head)
            log_probs = torch.log_softmax(logits, dim=1, dtype=compute_dtype)
            del logits
            picked = log_probs.gather(1, safe_targets[rows]).squeeze(1)
            picked_all[rows] = picked
            if want_grad:
                # d log softmax[target] / d logits = onehot(target) - softmax. Stored negated
                # (softmax - onehot, the cross-entropy gradient); backward flips the sign.
                # The target column is computed in full precision: p - 1 cancels badly once
                # rounded.
                logits_grad = torch.exp(log_probs, out=grad[rows] if head is None else None)
                logits_grad.scatter_(1, safe_targets[rows],
                                     (picked.exp() - 1).unsqueeze(1).to(logits_grad.dtype))
                if head is not None:  # the states' gradient: through the head, now
                    grad[rows] = _project_back(logits_grad, head)
        if want_grad:
            ctx.save_for_backward(grad, valid)
        return torch.where(valid, picked_all, 0.0).float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, valid = ctx.saved_tensors
        # In place: the buffer becomes the logits' gradient without a second copy; rows
        # without a target get 0 in the same pass.
        row_scale = -(valid.to(grad.dtype) * grad_output.to(grad.dtype))
        grad.mul_(row_scale.unsqueeze(1))
        return grad, None, None, None, None


def _project(states: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """The head's logits for ``states``, as ``nn.Linear`` computes them (autocast applies;
    without it, the states take the head's dtype)."""
    if not torch.is_autocast_enabled(states.device.type):
        states = states.to(head.dtype)
    return F.linear(states, head)


def _project_back(logits_grad: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``logits_grad @ head``: the states' gradient, in the dtype the head's backward uses."""
    if not torch.is_autocast_enabled(logits_grad.device.type):
        logits_grad = logits_grad.to(head.dtype)
    return torch.matmul(logits_grad, head)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                       chunk_elements: int = CHUNK_ELEMENTS, head: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token cross entropy in fp32, number of target tokens).

    ``logits``: (batch, seq, vocab) in any float dtype, or with ``head`` (a frozen LM
    head's [vocab, hidden] weight) the (batch, seq, hidden) final states; ``labels``:
    (batch, seq), unshifted, ``-100`` = no loss.
    """
    flat_targets = next_token_targets(labels).reshape(-1)
    per_token = chunked_token_logps(logits.reshape(-1, logits.size(-1)), flat_targets,
                                    chunk_elements, head)
    return -per_token.sum(), count_targets(labels)


def chunked_token_logps(inputs: torch.Tensor, targets: torch.Tensor, chunk_elements: int,
                        head: torch.Tensor | None = None) -> torch.Tensor:
    """[N] fp32 log-probs of ``targets`` (0 where -100) from [N, vocab] logits, or from
    [N, hidden] states and a frozen ``head``; about ``chunk_elements`` logits at a time."""
    vocab = inputs.size(-1) if head is None else head.size(0)
    # Evaluation (no_grad) skips the gradient buffer entirely.
    want_grad = torch.is_grad_enabled() and inputs.requires_grad
    return ChunkedTokenLogProbs.apply(inputs, targets, max(1, chunk_elements // vocab),
                                      want_grad, head)

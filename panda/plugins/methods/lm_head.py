"""Folding a frozen LM head into the log-prob kernel, so no (tokens, vocab) logits exist.

Imported only when a method computes a loss (it imports torch).

A causal LM's forward ends with ``logits = lm_head(final_states)``. Inside
``folded_head(model)`` the head's forward is the identity, so ``model(...).logits``
are the final states (the model's own forward still runs, through DDP and every
hook), and the context yields the head's weight for
:class:`panda.plugins.methods.lm_loss.ChunkedTokenLogProbs` to project chunk by
chunk. For Llama-3-8B with 4096 tokens that is 1 GiB of bf16 logits and 1 GiB of
their gradient not allocated.

Only a head whose weight needs no gradient is folded (the kernel does not compute
one): LoRA and QLoRA bases, and reference forwards. A trainable head (full
fine-tuning), a head wrapped by peft (``modules_to_save``, LoRA on ``lm_head``), a
sharded one (FSDP's DTensor, a ZeRO-3 partition) or a model that scales or caps
its logits after the head keep the plain logits path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

# Families whose forward computes ``lm_head(states)`` and nothing after it (no scale, no
# soft-capping); others keep the logits path.
FOLDABLE_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3",
                                  "phi3"})
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def foldable_head(model: Any) -> Optional[torch.nn.Linear]:
    """The LM head of ``model`` (bare, peft- or DDP-wrapped) when it can be folded, else None."""
    bare = getattr(model, "module", model)  # DDP and similar wrappers
    config = getattr(bare, "config", None)
    if config is None or not hasattr(bare, "get_output_embeddings"):
        return None
    if getattr(config, "model_type", None) not in FOLDABLE_MODEL_TYPES:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = bare.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if weight.requires_grad or type(weight) is not torch.nn.Parameter or weight.is_meta:
        return None  # trainable, a DTensor shard (FSDP), or not materialised
    if hasattr(weight, "ds_id") or weight.dim() != 2:
        return None  # a ZeRO-3 partition: gathered only inside the head's own forward
    return head


@contextmanager
def folded_head(model: Any) -> Iterator[Optional[torch.Tensor]]:
    """Inside, ``model(...).logits`` are the final states and the context yields the head's
    weight, when the head can be folded; otherwise nothing changes and it yields None."""
    head = foldable_head(model)
    if head is None:
        yield None
        return
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield head.weight
    finally:
        del head.forward


def _identity(states: torch.Tensor) -> torch.Tensor:
    return states

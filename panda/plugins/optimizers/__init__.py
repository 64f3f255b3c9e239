"""Built-in optimizers, and the weight-decay split every optimizer receives.

The trainer calls ``param_groups(model, recipe.optim.weight_decay)`` and hands the
result to the named plugin's ``build(param_groups, lr)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from panda.errors import PandaError

if TYPE_CHECKING:
    import torch

# Substrings of parameter names that never get weight decay. Names are lowercased
# first, so this matches Llama's `input_layernorm` / `post_attention_layernorm` /
# `model.norm`, GPT-2's `ln_1` (1-D anyway), BERT's `LayerNorm` and every `bias`.
NO_DECAY_NAME_PARTS = ("norm", "bias")


def decays(name: str, param: "torch.Tensor") -> bool:
    """Whether weight decay applies to this parameter.

    No decay for biases and normalization weights: every 1-D parameter (norm
    scales, biases) and any parameter whose name contains "norm" or "bias".
    Embeddings and the output head *are* decayed, as in Hugging Face's Trainer,
    LLaMA-Factory and torchtitan (nanoGPT decays every 2-D weight, too).
    """
    lowered = name.lower()
    return param.ndim >= 2 and not any(part in lowered for part in NO_DECAY_NAME_PARTS)


def param_groups(model: "torch.nn.Module", weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a no-decay group.

    Returns ``[{"params": [...], "weight_decay": weight_decay},
    {"params": [...], "weight_decay": 0.0}]`` without empty groups, in
    ``named_parameters`` order (tied weights appear once). Frozen parameters
    (``requires_grad=False``, e.g. a LoRA base) are left out.
    """
    decayed, not_decayed = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decayed if decays(name, param) else not_decayed).append(param)
    if not decayed and not not_decayed:
        raise PandaError("the model has no trainable parameters",
                         hint="check [lora] target_modules, or that the model is not frozen")
    groups = [{"params": decayed, "weight_decay": weight_decay},
              {"params": not_decayed, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]

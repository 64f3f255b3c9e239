"""Language-modelling methods: ``pretrain`` (every token) and ``sft`` (responses only).

Both minimise next-token cross entropy on the tokens whose label is not -100;
what differs is the data: pre-training sources label every token, instruction
sources mask the prompt. ``loss`` returns the fp32 *sum* over target tokens and
their count; the backend divides by the optimizer step's total ``units``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from pydantic import Field

from panda.plugins.api import MethodPlugin, Options

if TYPE_CHECKING:
    import torch


class LmOptions(Options):
    neftune_alpha: float = Field(0.0, ge=0, description="NEFTune noise scale on input "
                                 "embeddings during training; 0 = off (typical: 5).")


class CausalLm(MethodPlugin):
    """Next-token prediction on every labelled token."""

    Options = LmOptions

    def __init__(self, options: Any = None):
        super().__init__(options)
        self._neftune: Any = None
        self._neftune_hook: Any = None

    def prepare(self, model: "torch.nn.Module", ctx: Any) -> "torch.nn.Module":
        """Hook NEFTune noise onto the input embeddings when ``neftune_alpha > 0``."""
        if self.options.neftune_alpha > 0:
            from panda.plugins.methods.neftune import NEFTuneNoise

            if self._neftune_hook is not None:  # prepared again: one hook, not two
                self._neftune_hook.remove()
            self._neftune = NEFTuneNoise(self.options.neftune_alpha)
            self._neftune_hook = self._neftune.attach(model.get_input_embeddings())
        return model

    def units(self, batch: dict[str, Any]) -> int:
        """Target tokens of the batch: labels after the first position that are not -100."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model: "torch.nn.Module", batch: dict[str, Any]
             ) -> tuple["torch.Tensor", "torch.Tensor", dict[str, "torch.Tensor"]]:
        from panda.data.batches import model_inputs  # adds use_cache=False: packing needs it
        from panda.plugins.methods.lm_head import folded_head
        from panda.plugins.methods.lm_loss import causal_lm_loss_sum

        noise_context = self._neftune.for_batch(batch) if self._neftune else nullcontext()
        # A frozen head (LoRA, QLoRA) is folded into the loss: no (tokens, vocab) logits.
        with noise_context, folded_head(model) as head:
            outputs = model(**model_inputs(batch)).logits
        total, count = causal_lm_loss_sum(outputs, batch["labels"], head=head)
        return total, count, {}


class Pretrain(CausalLm):
    """Causal language modelling on every token (title + content, plain text)."""


class Sft(CausalLm):
    """Supervised fine-tuning: loss on response tokens only (prompts are masked)."""

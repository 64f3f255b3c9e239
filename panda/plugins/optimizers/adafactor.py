"""``adafactor``: transformers' Adafactor driven by panda's learning rate and schedule."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from panda.plugins.api import OptimizerPlugin, Options


class AdafactorOptions(Options):
    eps: tuple[float, float] = Field((1e-30, 1e-3), description="Regularizers of the squared "
                                     "gradient and of the parameter scale.")
    clip_threshold: float = Field(1.0, gt=0, description="Cap on the RMS of the final update.")
    decay_rate: float = Field(-0.8, lt=0, description="Second-moment decay: beta2_t = "
                              "1 - t^decay_rate.")
    beta1: Optional[float] = Field(None, ge=0, lt=1, description="First-moment coefficient; "
                                   "unset = no first moment (the memory-saving default).")


class Adafactor(OptimizerPlugin):
    """Adafactor: factored second moments, sub-linear optimizer memory (transformers)."""

    Options = AdafactorOptions

    def build(self, param_groups: list[dict[str, Any]], lr: float):
        from transformers.optimization import Adafactor as HFAdafactor

        options = self.options
        # relative_step and scale_parameter off: the recipe's lr and schedule drive
        # the step size, exactly like every other optimizer in panda.
        return HFAdafactor(param_groups, lr=lr, eps=tuple(options.eps),
                           clip_threshold=options.clip_threshold, decay_rate=options.decay_rate,
                           beta1=options.beta1, scale_parameter=False, relative_step=False,
                           warmup_init=False)

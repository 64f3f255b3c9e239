"""``adamw8bit``: bitsandbytes' AdamW with 8-bit optimizer states (CUDA)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from panda.errors import require
from panda.plugins.api import OptimizerPlugin, Options


class AdamW8bitOptions(Options):
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam beta1, beta2.")
    eps: float = Field(1e-6, gt=0, description="Adam epsilon.")


class AdamW8bit(OptimizerPlugin):
    """AdamW keeping its moments in 8 bits (block-wise quantized): ~75% less optimizer memory."""

    Options = AdamW8bitOptions

    def build(self, param_groups: list[dict[str, Any]], lr: float):
        bnb = require("bitsandbytes", what="optimizer 'adamw8bit'", package="bitsandbytes",
                      extra="quant")
        return bnb.optim.AdamW8bit(param_groups, lr=lr, betas=tuple(self.options.betas),
                                   eps=self.options.eps)

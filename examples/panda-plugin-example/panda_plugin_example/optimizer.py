"""``sgd-momentum``: ``torch.optim.SGD`` with momentum, as an optimizer plugin.

``[optim] lr``, ``weight_decay`` and ``max_grad_norm`` are shared by every
optimizer and handled by panda; this plugin adds only its own keys.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from panda.plugins.api import OptimizerPlugin, Options


class SgdMomentumOptions(Options):
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum factor.")
    nesterov: bool = Field(False, description="Use Nesterov momentum (needs momentum > 0).")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "SgdMomentumOptions":
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class SgdMomentum(OptimizerPlugin):
    """Stochastic gradient descent with (optionally Nesterov) momentum."""

    Options = SgdMomentumOptions

    def build(self, param_groups: list[dict[str, Any]], lr: float):
        import torch  # here, not at module level: validation must not import torch

        return torch.optim.SGD(param_groups, lr=lr, momentum=self.options.momentum,
                               nesterov=self.options.nesterov)

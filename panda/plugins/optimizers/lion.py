"""``lion``: the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from panda.plugins.api import OptimizerPlugin, Options


class LionOptions(Options):
    betas: tuple[float, float] = Field((0.9, 0.99), description="beta1 mixes the gradient "
                                       "into the sign of the update; beta2 is the momentum decay.")

    @field_validator("betas")
    @classmethod
    def _in_unit_interval(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class Lion(OptimizerPlugin):
    """Lion: sign of interpolated momentum; one state tensor. Use ~3-10x smaller lr than AdamW."""

    Options = LionOptions

    def build(self, param_groups: list[dict[str, Any]], lr: float):
        from panda.plugins.optimizers.lion_optimizer import LionOptimizer

        return LionOptimizer(param_groups, lr=lr, betas=tuple(self.options.betas))

"""``adamw``: torch.optim.AdamW, fused on CUDA."""

from __future__ import annotations

from pydantic import Field

from panda.plugins.api import OptimizerPlugin, Options


class AdamWOptions(Options):
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam beta1, beta2.")
    eps: float = Field(1e-6, gt=0, description="Adam epsilon.")


class AdamW(OptimizerPlugin):
    """AdamW (decoupled weight decay); torch's fused kernel on CUDA."""

    Options = AdamWOptions

"""``adamw``: torch.optim.AdamW, fused on CUDA."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from panda.plugins.api import OptimizerPlugin, Options


class AdamWOptions(Options):
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam beta1, beta2.")
    eps: float = Field(1e-6, gt=0, description="Adam epsilon.")


class AdamW(OptimizerPlugin):
    """AdamW (decoupled weight decay); torch's fused kernel on CUDA."""

    Options = AdamWOptions

    def build(self, param_groups: list[dict[str, Any]], lr: float):
        import torch

        # The fused kernel handles every parameter in one launch, but exists only
        # for CUDA tensors; elsewhere torch picks its foreach implementation.
        on_cuda = all(p.is_cuda for group in param_groups for p in group["params"])
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(self.options.betas),
                                 eps=self.options.eps, fused=True if on_cuda else None)

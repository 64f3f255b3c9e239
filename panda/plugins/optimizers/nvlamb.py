"""``nvlamb``: NVIDIA's LAMB (layer-wise adaptive moments) for large-batch training."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from panda.plugins.api import OptimizerPlugin, Options


class NVLAMBOptions(Options):
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam beta1, beta2 "
                                       "(apex FusedLAMB defaults).")
    eps: float = Field(1e-6, gt=0, description="Added to sqrt(v) in the Adam step.")
    bias_correction: bool = Field(True, description="Divide the moments by 1 - beta^t.")
    grad_pre_normalization: bool = Field(True, description="Scale all gradients by their "
                                         "global norm before the moments, as NVLAMB does.")
    prenorm_max_norm: float = Field(1.0, gt=0, description="Pre-normalization divides "
                                    "gradients by max(global_norm / this, 1) (apex "
                                    "FusedLAMB max_grad_norm).")
    adapt_all: bool = Field(True, description="Apply the trust ratio to every tensor (apex "
                            "use_nvlamb=True); false = only to tensors with weight decay.")
    max_trust_ratio: Optional[float] = Field(None, gt=0, description="Clamp the per-tensor "
                                             "trust ratio; NVIDIA's apex does not clamp.")


class NVLAMB(OptimizerPlugin):
    """NVLAMB: Adam moments on globally pre-normalized gradients, per-tensor trust ratio."""

    Options = NVLAMBOptions

    def build(self, param_groups: list[dict[str, Any]], lr: float):
        from panda.plugins.optimizers.nvlamb_optimizer import NVLAMBOptimizer

        options = self.options
        return NVLAMBOptimizer(param_groups, lr=lr, betas=tuple(options.betas), eps=options.eps,
                               bias_correction=options.bias_correction,
                               grad_pre_normalization=options.grad_pre_normalization,
                               prenorm_max_norm=options.prenorm_max_norm,
                               adapt_all=options.adapt_all,
                               max_trust_ratio=options.max_trust_ratio)

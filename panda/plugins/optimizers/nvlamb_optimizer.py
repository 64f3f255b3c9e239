"""NVIDIA's NVLAMB as a ``torch.optim.Optimizer`` (imported only when ``nvlamb`` is built).

Follows apex ``FusedLAMB`` (csrc/multi_tensor_lamb.cu), the optimizer of NVIDIA's
BERT pre-training recipes, step for step:

1. Pre-normalization: ``g <- g / max(||G|| / prenorm_max_norm, 1)`` where ``||G||``
   is the L2 norm over *all* gradients of *all* groups (apex: ``max_grad_norm=1``).
2. Adam moments ``m, v`` with ``1 - beta1`` gradient averaging and, optionally,
   bias correction ``m / (1 - beta1^t)``, ``v / (1 - beta2^t)``.
3. ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` (decoupled decay, added to
   the update so the trust ratio sees it).
4. Per tensor: ``ratio = ||w|| / ||u||``, or 1 when either norm is 0; applied to every
   tensor (apex ``use_nvlamb=True``) or only to decayed ones (``adapt_all=False``).
   apex does not clamp the ratio; ``max_trust_ratio`` optionally does.
5. ``w <- w - lr * ratio * u``.

Norms of DTensor-sharded parameters (FSDP2) are reduced over their shards with
``full_tensor()`` so every rank sees the whole tensor's norm.
"""

from __future__ import annotations

from typing import Optional

import torch


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of the *whole* tensor (at least fp32), even when it is a sharded DTensor."""
    wide = torch.promote_types(tensor.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
    norm = torch.linalg.vector_norm(tensor, dtype=wide)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NVLAMBOptimizer(torch.optim.Optimizer):
    """LAMB with global gradient pre-normalization, as in apex FusedLAMB."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True,
                 grad_pre_normalization: bool = True, prenorm_max_norm: float = 1.0,
                 adapt_all: bool = True, max_trust_ratio: Optional[float] = None):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, adapt_all=adapt_all,
                        max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults)
        self.grad_pre_normalization = grad_pre_normalization
        self.prenorm_max_norm = prenorm_max_norm

    def _grad_divisor(self) -> torch.Tensor | float:
        """max(global grad norm / prenorm_max_norm, 1), or 1 when pre-normalization is off."""
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not self.grad_pre_normalization or not grads:
            return 1.0
        global_norm = torch.linalg.vector_norm(torch.stack([_norm(g) for g in grads]))
        return torch.clamp(global_norm / self.prenorm_max_norm, min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisor = self._grad_divisor()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, param.grad / divisor, group)
        return loss

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        correction1 = correction2 = 1.0
        if group["bias_correction"]:
            correction1 = 1 - beta1 ** state["step"]
            correction2 = 1 - beta2 ** state["step"]
        update = (exp_avg / correction1) / ((exp_avg_sq / correction2).sqrt_() + group["eps"])
        if group["weight_decay"] != 0:
            update.add_(param, alpha=group["weight_decay"])

        ratio: torch.Tensor | float = 1.0
        if group["adapt_all"] or group["weight_decay"] != 0:
            param_norm, update_norm = _norm(param), _norm(update)
            # torch.where keeps this on the device: no host sync per tensor.
            ratio = torch.where((param_norm > 0) & (update_norm > 0),
                                param_norm / update_norm, torch.ones_like(param_norm))
            if group["max_trust_ratio"] is not None:
                ratio = ratio.clamp(max=group["max_trust_ratio"])
            ratio = ratio.to(update.dtype)
        param.sub_(update * (group["lr"] * ratio))

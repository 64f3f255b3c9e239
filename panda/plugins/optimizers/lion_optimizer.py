"""The Lion update rule as a ``torch.optim.Optimizer`` (imported only when ``lion`` is built).

Chen et al. 2023, Algorithm 2 (decoupled weight decay)::

    update = sign(beta1 * m + (1 - beta1) * g)
    w      = w - lr * (update + weight_decay * w)
    m      = beta2 * m + (1 - beta2) * g
"""

from __future__ import annotations

import torch


class LionOptimizer(torch.optim.Optimizer):
    """Lion with per-group ``lr``, ``betas`` and ``weight_decay``; one momentum tensor per param."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                momentum = state["exp_avg"]
                # The update uses the momentum *before* this step's decay (beta1),
                # and the momentum is then refreshed with beta2: two betas, one state.
                update = momentum.lerp(grad, 1 - beta1).sign_()
                if group["weight_decay"] != 0:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"])
                momentum.lerp_(grad, 1 - beta2)
        return loss

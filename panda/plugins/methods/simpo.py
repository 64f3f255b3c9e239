"""``simpo``: Simple Preference Optimization (Meng et al. 2024), no reference model.

The reward of a reply is its log-probability *averaged over the reply's labelled
tokens*, times beta (the paper's Eq. 4); the loss (Eq. 6) asks the chosen
reward to beat the rejected one by the target margin gamma:

    z = beta * avg log pi(y_w|x) - beta * avg log pi(y_l|x) - gamma
    loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)

with ``label_smoothing`` = eps (0 in the paper; the SimPO code and TRL's CPO
trainer offer it). ``gamma`` is the absolute margin of Eq. 6, what TRL calls
``simpo_gamma``; the SimPO code's ``gamma_beta_ratio`` is gamma / beta.

Normalisation: log-probs are averaged per reply (over its tokens); each pair's
loss is one unit, so the step's loss is the mean over its pairs across
micro-batches and ranks. Logged: ``rewards/chosen`` (beta * average log-prob of
the chosen reply), ``rewards/rejected``, ``rewards/accuracy``, ``rewards/margin``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from panda.plugins.api import Options
from panda.plugins.methods.preference import (PreferenceMethod, policy_pair_logps,
                                              reward_metrics, where_real)


class SimPOOptions(Options):
    beta: float = Field(2.0, gt=0, description="Reward scale on the length-averaged "
                        "log-probs (the paper uses 2.0-2.5; TRL's default is 0.1).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin (absolute, Eq. 6 of the "
                         "paper; TRL's simpo_gamma). The SimPO code's gamma_beta_ratio is "
                         "gamma / beta.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed probability that "
                                   "a preference label is flipped (0 in the paper).")


def simpo_losses(chosen_avg: Any, rejected_avg: Any, *, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> Any:
    """Per-pair SimPO loss from length-averaged log-probs (each [B], fp32)."""
    import torch.nn.functional as F

    z = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


class SimPO(PreferenceMethod):
    """SimPO: length-normalised log-prob rewards with a target margin; no reference model."""

    Options = SimPOOptions

    def pair_losses(self, model: Any, batch: dict[str, Any], real: Any) -> Any:
        chosen_avg, rejected_avg = policy_pair_logps(model, batch).average()
        options = self.options
        losses = simpo_losses(where_real(real, chosen_avg, 0.0),
                              where_real(real, rejected_avg, 0.0), beta=options.beta,
                              gamma=options.gamma, label_smoothing=options.label_smoothing)
        return losses, reward_metrics(options.beta * chosen_avg, options.beta * rejected_avg)

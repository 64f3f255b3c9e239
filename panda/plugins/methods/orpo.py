"""``orpo``: Odds Ratio Preference Optimization (Hong et al. 2024), no reference model.

Per pair, with log-probs *averaged over each reply's labelled tokens*
(avg_w, avg_l; the paper's P(y|x) is the length-normalised likelihood):

    nll       = -avg_w                     (SFT loss: mean NLL over the chosen reply's tokens)
    log_odds  = (avg_w - avg_l) - (log(1 - exp(avg_w)) - log(1 - exp(avg_l)))
    loss      = nll - beta * log sigmoid(log_odds)

``beta`` is the paper's lambda (Eq. 6), named as in TRL's ORPOConfig (default 0.1).

Normalisation: each pair's loss is one unit, so the step's loss is the mean over
its pairs across micro-batches and ranks. The SFT term is the mean over the
chosen reply's tokens *per pair*, then averaged over pairs like the rest. (The
ORPO code and TRL take the token mean over the whole batch's chosen tokens,
which weighs long replies more and depends on how pairs are grouped into
batches; the two agree when every chosen reply has the same length, or one
pair per batch.) Logged: ``rewards/chosen`` (beta * avg_w), ``rewards/rejected``
(beta * avg_l), ``rewards/accuracy``, ``rewards/margin``, ``nll`` and
``log_odds_ratio``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from panda.plugins.api import Options
from panda.plugins.methods.preference import (PreferenceMethod, policy_pair_logps,
                                              reward_metrics, where_real)


class OrpoOptions(Options):
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (lambda in "
                        "the ORPO paper; beta in TRL's ORPOConfig).")


def log1mexp(x: Any) -> Any:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def odds_ratio_terms(chosen_avg: Any, rejected_avg: Any) -> tuple[Any, Any]:
    """(log odds ratio, log sigmoid of it) per pair, from length-averaged log-probs."""
    import torch.nn.functional as F

    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return log_odds, F.logsigmoid(log_odds)


class Orpo(PreferenceMethod):
    """ORPO: SFT on the chosen reply plus an odds-ratio preference term; no reference model."""

    Options = OrpoOptions

    def pair_losses(self, model: Any, batch: dict[str, Any], real: Any) -> Any:
        chosen_avg, rejected_avg = policy_pair_logps(model, batch).average()
        # A padding pair has no reply tokens (average 0, where log(1 - e^0) is -inf): give it
        # a harmless value; its loss is dropped anyway.
        chosen_avg = where_real(real, chosen_avg, -1.0)
        rejected_avg = where_real(real, rejected_avg, -1.0)
        log_odds, log_sigmoid_odds = odds_ratio_terms(chosen_avg, rejected_avg)
        nll = -chosen_avg
        beta = self.options.beta
        metrics = reward_metrics(beta * chosen_avg, beta * rejected_avg)
        metrics.update(nll=nll.detach(), log_odds_ratio=log_odds.detach())
        return nll - beta * log_sigmoid_odds, metrics

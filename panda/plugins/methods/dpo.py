"""``dpo``: Direct Preference Optimization (Rafailov et al. 2023), its conservative
label-smoothed form (cDPO), and IPO (Azar et al. 2023).

Per pair, with sequence log-probs summed over the reply's labelled tokens
(prompt, system, history and padding carry no label):

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

* ``loss_type = "sigmoid"`` (DPO, Eq. 7; cDPO with ``label_smoothing`` = eps):
  ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
* ``loss_type = "ipo"`` (IPO, Eq. 17, tau = beta): ``(h' - 1 / (2 beta))^2``
  where h' uses log-probs *averaged* over each reply's tokens: TRL does so, and
  its authors report the IPO paper's results are for this normalised form.

Normalisation: each pair's loss is one unit; the step's loss is the sum over
its pairs divided by the number of pairs in the step (over micro-batches and
ranks). Logged per step (means over real pairs): ``rewards/chosen`` =
beta (log pi - log ref) of the chosen reply (summed log-probs, as TRL logs it),
``rewards/rejected``, ``rewards/accuracy`` (chosen reward > rejected) and
``rewards/margin`` (their difference).

The reference model is described in :mod:`panda.plugins.methods.reference`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from panda.plugins.api import Options
from panda.plugins.methods.preference import (PreferenceMethod, policy_pair_logps,
                                              reward_metrics)
from panda.recipe_schema import InvalidKey


class DpoOptions(Options):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference "
                        "(DPO's beta; IPO's tau).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: the assumed "
                                   "probability that a pair's preference label is flipped "
                                   "(sigmoid loss only).")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO/cDPO; "
                                                 "ipo = IPO (length-averaged log-ratios).")
    precompute_ref: bool = Field(False, description="Compute every pair's reference "
                                 "log-probs in one pass before training (cached beside the "
                                 "token cache) and keep no reference model in memory.")

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> "DpoOptions":
        if self.loss_type == "ipo" and self.label_smoothing > 0:
            raise InvalidKey("label_smoothing", "applies to loss_type = \"sigmoid\" (cDPO) "
                             "only; IPO has no label smoothing: remove it")
        return self


def dpo_losses(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any,
               *, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> Any:
    """Per-pair DPO/cDPO or IPO loss from sequence log-probs (each [B], fp32)."""
    import torch.nn.functional as F

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h)
            - label_smoothing * F.logsigmoid(-beta * h))


class Dpo(PreferenceMethod):
    """Direct Preference Optimization (sigmoid / cDPO / IPO) against a frozen reference."""

    Options = DpoOptions

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.reference: Any = None
        self._collecting = False

    def prepare(self, model: Any, ctx: Any) -> Any:
        """Pick the reference: precomputed, the LoRA base (adapter off), or a frozen copy."""
        from panda.plugins.methods.reference import choose_reference

        recipe = getattr(ctx, "recipe", None)
        self.reference = choose_reference(model, recipe, self.options.precompute_ref)
        return model

    def before_training(self, job: Any) -> None:
        """With precompute_ref: score every pair with the starting policy, once, and attach
        the numbers to the train and eval batches."""
        if not self.options.precompute_ref:
            return
        from panda.plugins.methods.reference import (WithReferenceLogps,
                                                     precompute_reference_logps)

        for name in ("train_batches", "eval_batches"):
            batches = getattr(job, name)
            if batches is None:
                continue
            tables = precompute_reference_logps(job, batches, self._collect_with(job.backend))
            setattr(job, name, WithReferenceLogps(batches, tables))

    def _collect_with(self, backend: Any) -> Any:
        """``batch -> (chosen, rejected)`` reference log-probs, computed in ``eval_step``."""
        def collect(batch: dict[str, Any]) -> Any:
            self._collecting, self._collected = True, None
            try:
                backend.eval_step(batch)
            finally:
                self._collecting = False
            return self._collected
        return collect

    def _starting_policy_logps(self, model: Any, batch: dict[str, Any]) -> Any:
        from panda.plugins.methods.reference import StartingPolicy

        return StartingPolicy(require_adapter=False).pair_logps(model, batch)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        if self._collecting:  # the precompute pass: record the reference, train nothing
            import torch

            logps = self._starting_policy_logps(model, batch)
            self._collected = (logps.chosen.double().cpu(), logps.rejected.double().cpu())
            zero = torch.zeros((), device=batch["chosen_input_ids"].device)
            return zero, zero.long(), {}
        return super().loss(model, batch)

    def pair_losses(self, model: Any, batch: dict[str, Any], real: Any) -> Any:
        from panda.plugins.methods.preference import where_real

        # Reference first: its logits are freed before the policy's graph is built.
        ref = self.reference.pair_logps(model, batch)
        policy = policy_pair_logps(model, batch)
        if self.options.loss_type == "ipo":
            (pc, pr), (rc, rr) = policy.average(), ref.average()
        else:
            pc, pr, rc, rr = policy.chosen, policy.rejected, ref.chosen, ref.rejected
        losses = dpo_losses(where_real(real, pc, 0.0), where_real(real, pr, 0.0), rc, rr,
                            beta=self.options.beta, label_smoothing=self.options.label_smoothing,
                            loss_type=self.options.loss_type)
        beta = self.options.beta
        return losses, reward_metrics(beta * (policy.chosen - ref.chosen),
                                      beta * (policy.rejected - ref.rejected))

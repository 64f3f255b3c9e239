"""DPO's loss and gradient equal an independent reference: log-probs from a plain forward of
each sequence alone (explicit loop), the paper's formula, and TRL's own loss code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from align_helpers import (assert_same_grads, grads, job_context, pair_batch, pair_logps,
                           perturb, random_pairs, tiny_llama)
from panda.plugins.methods.dpo import Dpo

PAIRS = random_pairs(4, seed=5)


def panda_dpo(options: dict, pairs=PAIRS):
    """(mean loss over pairs, metrics, gradients) from panda's dpo on one batch."""
    policy = tiny_llama(0)
    method = Dpo(Dpo.Options(**options))
    method.prepare(policy, job_context())  # the reference is the starting weights
    perturb(policy)  # then training moves the policy away from it
    total, count, metrics = method.loss(policy, pair_batch(pairs))
    (total / count).backward()
    return (total / count).item(), int(count), metrics, grads(policy)


def reference_dpo(options: dict, pairs=PAIRS):
    """The paper's formula per pair, from sequence log-probs computed one sequence at a time."""
    beta, eps = options.get("beta", 0.1), options.get("label_smoothing", 0.0)
    reference = tiny_llama(0)
    policy = tiny_llama(0)
    perturb(policy)
    with torch.no_grad():
        ref = pair_logps(reference, pairs)
    pol = pair_logps(policy, pairs)
    losses = []
    for i in range(len(pairs)):
        if options.get("loss_type") == "ipo":  # log-ratios averaged over each reply's tokens
            h = ((pol["chosen_avg"][i] - ref["chosen_avg"][i])
                 - (pol["rejected_avg"][i] - ref["rejected_avg"][i]))
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            h = (pol["chosen"][i] - ref["chosen"][i]) - (pol["rejected"][i] - ref["rejected"][i])
            p = torch.sigmoid(beta * h)  # the model's probability that chosen beats rejected
            losses.append(-(1 - eps) * torch.log(p) - eps * torch.log(1 - p))
    loss = torch.stack(losses).mean()
    loss.backward()
    rewards = {side: beta * (pol[side] - ref[side]).detach() for side in ("chosen", "rejected")}
    return loss.item(), rewards, grads(policy)


@pytest.mark.parametrize("options", [
    {"beta": 0.1},
    {"beta": 0.5, "label_smoothing": 0.2},
    {"beta": 0.1, "loss_type": "ipo"},
], ids=["sigmoid", "cdpo", "ipo"])
def test_dpo_loss_and_gradient_equal_the_papers_formula(options):
    loss, count, metrics, panda_grads = panda_dpo(options)
    expected, rewards, expected_grads = reference_dpo(options)
    assert count == len(PAIRS)  # one unit per pair
    assert math.isclose(loss, expected, rel_tol=1e-5), (loss, expected)
    assert_same_grads(panda_grads, expected_grads)
    chosen, rejected = rewards["chosen"], rewards["rejected"]
    torch.testing.assert_close(metrics["rewards/chosen"], chosen.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected.mean(), rtol=1e-5, atol=1e-7)
    # a difference of two rewards of size ~1: fp32 rounding of each shows at ~1e-7
    torch.testing.assert_close(metrics["rewards/margin"], (chosen - rejected).mean(),
                               rtol=1e-5, atol=1e-6)
    assert metrics["rewards/accuracy"].item() == (chosen > rejected).float().mean().item()


def test_at_the_start_policy_equals_reference_and_the_loss_is_log_2():
    method = Dpo(Dpo.Options(beta=0.1))
    policy = tiny_llama(0)
    method.prepare(policy, job_context())
    total, count, metrics = method.loss(policy, pair_batch(PAIRS))
    assert math.isclose(total.item() / int(count), math.log(2), rel_tol=1e-6)
    assert metrics["rewards/margin"].item() == 0.0


def test_a_padding_pair_adds_nothing():
    """A rank without pairs in an epoch's last step gets one padding pair (_num_pairs = 0)."""
    method = Dpo(Dpo.Options(beta=0.1))
    policy = tiny_llama(0)
    method.prepare(policy, job_context())
    perturb(policy)
    batch = pair_batch(PAIRS[:1])
    batch["_num_pairs"] = torch.tensor(0)
    total, count, metrics = method.loss(policy, batch)
    total.backward()
    assert total.item() == 0.0 and int(count) == 0 and method.units(batch) == 0
    assert all(torch.isfinite(p.grad).all() and not p.grad.any()
               for p in policy.parameters() if p.grad is not None)
    assert all(value.item() == 0.0 for value in metrics.values())


# -- TRL ------------------------------------------------------------------------------------

def trl_dpo_loss(pol: dict, ref: dict, pairs, beta: float, loss_type: str) -> float:
    """TRL's DPOTrainer._compute_loss on the same per-token log-probs (its model stubbed out)."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl is not installed")
    per_token, completion = [], []
    for index, (prompt, chosen, rejected) in enumerate(pairs):
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            row = torch.zeros(20)
            mask = torch.zeros(21, dtype=torch.long)
            row[len(prompt) - 1:len(prompt) - 1 + len(reply)] = pol[f"{side}_tokens"][index]
            mask[len(prompt):len(prompt) + len(reply)] = 1
            per_token.append(row)
            completion.append(mask)
    order = list(range(0, len(per_token), 2)) + list(range(1, len(per_token), 2))
    log_probs = torch.stack([per_token[i] for i in order])  # [chosen rows; rejected rows]
    completion_mask = torch.stack([completion[i] for i in order])
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                              mean_logits=torch.zeros_like(log_probs),
                              is_top1=torch.zeros_like(log_probs, dtype=torch.bool))
    fake_trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "completion_mask": completion_mask,
              "attention_mask": torch.ones_like(completion_mask),
              "ref_chosen_logps": ref["chosen"], "ref_rejected_logps": ref["rejected"]}
    loss = trl_dpo.DPOTrainer._compute_loss(fake_trainer, lambda **kw: outputs, inputs, False)
    return float(loss)


def per_token_logps(model, pairs) -> dict[str, list[torch.Tensor]]:
    """Each reply's per-token log-probs (plain forward of the sequence alone)."""
    out: dict[str, list] = {"chosen_tokens": [], "rejected_tokens": []}
    with torch.no_grad():
        for prompt, chosen, rejected in pairs:
            for side, reply in (("chosen", chosen), ("rejected", rejected)):
                ids = torch.tensor([prompt + reply])
                logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(reply))
                out[f"{side}_tokens"].append(logp[positions, torch.tensor(reply)])
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trls(loss_type):
    pairs = [(p, c[:8], r[:8]) for p, c, r in PAIRS]  # TRL's stub rows hold 20 positions
    policy = tiny_llama(0)
    perturb(policy)
    with torch.no_grad():
        ref = pair_logps(tiny_llama(0), pairs)
    pol = per_token_logps(policy, pairs)
    expected = trl_dpo_loss(pol, ref, pairs, beta=0.1, loss_type=loss_type)
    loss, *_ = panda_dpo({"beta": 0.1, "loss_type": loss_type}, pairs)
    assert math.isclose(loss, expected, rel_tol=1e-5), (loss, expected)


def test_cdpo_label_smoothing_equals_trls_conservative_form():
    """TRL 1.x's DPO "sigmoid" has no label smoothing; its CPO "sigmoid" keeps cDPO's form,
    -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z). Fed z = h, it must agree."""
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer",
                                  reason="trl is not installed")
    h = torch.tensor([-3.0, -0.2, 0.0, 0.7, 4.0])
    fake = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.5, label_smoothing=0.2,
                           accelerator=SimpleNamespace(device="cpu"))
    expected, _, _ = trl_cpo.CPOTrainer.cpo_loss(fake, h, torch.zeros_like(h))
    from panda.plugins.methods.dpo import dpo_losses

    zero = torch.zeros_like(h)
    actual = dpo_losses(h, zero, zero, zero, beta=0.5, label_smoothing=0.2)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
